"""The prepared metadata file format: an instance line read back with a base URL is the JSON WADO-RS
answers per instance (BulkDataURIs made absolute), and the header round-trips."""

from __future__ import annotations

import io
import json

import pytest

from diana.schemas.layout import series_metadata_path
from diana.schemas.series_metadata import (
    BASE_MARKER,
    PreparedHeader,
    absolute_bulk_uris,
    encode_entry,
    read_entries,
    read_header,
    with_base,
)

MODEL = {
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": 'Name "with" "BulkDataURI":"@@DICOMWEB-BASE@@/'}]},
    "7FE00010": {"vr": "OW", "BulkDataURI": "studies/1.2/series/3.4/instances/5.6/bulk/7FE00010"},
    "00400275": {"vr": "SQ", "Value": [{"00420011": {"vr": "OB", "BulkDataURI": "studies/1.2/bulk/00420011"}}]},
    "00091001": {"vr": "UN", "BulkDataURI": "https://elsewhere.example/bulk"},
    "00280010": {"vr": "US", "Value": [64]},
}


@pytest.mark.parametrize("base", ["http://127.0.0.1:8080", "https://host.example/dicomweb", 'http://h/"quoted"'])
def test_an_entry_read_with_a_base_is_what_the_per_instance_answer_says(base):
    fh = io.BytesIO(encode_entry("1.2.3", absolute_bulk_uris(MODEL, BASE_MARKER)))
    ((sop, model),) = list(read_entries(fh))
    assert sop == "1.2.3"
    expected = json.dumps(absolute_bulk_uris(MODEL, base), separators=(",", ":")).encode()
    assert list(with_base([model], base)) == [expected]


def test_the_header_round_trips_and_a_foreign_file_is_refused():
    header = PreparedHeader("1.2", "1.2.3", 7, 40, 1764326400123.0)
    fh = io.BytesIO(header.encode() + encode_entry("1.2.3.4", {}))
    assert read_header(fh) == header
    assert header.same_index_state(40, 1764326400123.0) and not header.same_index_state(41, 1764326400123.0)
    assert list(read_entries(fh)) == [("1.2.3.4", b"{}")]
    with pytest.raises(ValueError, match="not a prepared metadata file"):
        read_header(io.BytesIO(b"DICM\x00\x01"))


def test_the_path_is_a_dot_file_in_the_series_folder_and_only_uids_name_it():
    assert series_metadata_path("1.2", "1.2.3") == "1.2/1.2.3/.wado-metadata"
    with pytest.raises(ValueError):
        series_metadata_path("1.2", "../../etc")


def test_a_flat_uri_of_a_nested_value_is_written_as_its_path():
    """Headers stored before BulkDataURI paths name a nested value by its tag alone: answered as its path."""
    out = absolute_bulk_uris(MODEL, "http://h")
    item = out["00400275"]["Value"][0]
    assert item["00420011"]["BulkDataURI"] == "http://h/studies/1.2/bulk/00400275/0/00420011"
    assert out["7FE00010"]["BulkDataURI"] == "http://h/studies/1.2/series/3.4/instances/5.6/bulk/7FE00010"
    assert out["00091001"]["BulkDataURI"] == "https://elsewhere.example/bulk"  # absolute: as it is
    path = {
        "00400275": {"vr": "SQ", "Value": [{"00420011": {"vr": "OB", "BulkDataURI": "s/bulk/00400275/0/00420011"}}]}
    }
    assert (
        absolute_bulk_uris(path, "b")["00400275"]["Value"][0]["00420011"]["BulkDataURI"]
        == "b/s/bulk/00400275/0/00420011"
    )
