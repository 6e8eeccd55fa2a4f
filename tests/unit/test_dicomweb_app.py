"""Unit: the DICOMweb application's answers (access/dicomweb/app.py) over a stand-in index and a real
archive folder: QIDO value lists, includefield=all per level, the base of the URLs answers carry, the
Warning headers, and the bulk data route."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from diana.access.dicomweb.app import build_app
from diana.access.dicomweb.auth import Credentials
from diana.access.dicomweb.qido import parse_qido
from diana.access.dicomweb.server import public_url
from diana.access.qr.identifier import IdentifierError, parse_identifier
from diana.access.qr.index_reader import Match
from diana.config import ConfigError
from diana.schemas.layout import archive_path
from diana.storage.filesystem import FilesystemStore
from tests.support.asgi import asgi_get

STUDY, SERIES = "1.2.3", "1.2.3.4"


class _Reader:
    """The index: ``find`` yields the given matches, ``documents``/``count`` the instance documents of a URL."""

    client = None
    index = "instances"

    def __init__(self, matches: list[Match] | None = None, docs: list[dict[str, Any]] | None = None):
        self.matches = matches or []
        self.docs = docs or []
        self.asked: list[tuple[Any, int, Any]] = []

    def find(self, query, limit, cancelled=lambda: False, header=None):
        self.asked.append((query, limit, header))
        yield from self.matches[:limit]

    def _of(self, query):
        wanted = {
            field: query.unique_values(level)
            for field, level in (
                ("study_instance_uid", "STUDY"),
                ("series_instance_uid", "SERIES"),
                ("sop_instance_uid", "IMAGE"),
            )
        }
        return [d for d in self.docs if all(not v or d[f] in v for f, v in wanted.items())]

    def documents(self, query, source, limit, page=500):
        return iter(self._of(query)[:limit])

    def count(self, query):
        return len(self._of(query))


def _call(app, path: str, query: str = "", headers: dict[str, str] | None = None):
    """(status, headers, body) of a GET through the ASGI app, as uvicorn on 127.0.0.1:8088 would pass it."""
    answer = asgi_get(app, path, query, headers)
    if answer.error is not None:
        raise answer.error
    head: dict[str, list[str]] = {}
    for name, value in answer.headers:
        head.setdefault(name, []).append(value)
    return answer.status, head, answer.body


def _app(reader: _Reader, archive: Path | None = None, **options: Any):
    store = FilesystemStore(archive or Path("/nonexistent"))
    return build_app(reader, store, "DIANA", options.pop("credentials", Credentials()), **options)


# ---------------------------------------------------------------- 1. value lists


def _query(params: list[tuple[str, str]], level: str = "STUDY"):
    return parse_identifier(parse_qido(params, level, {}, 1000).identifier, "STUDY", hierarchical=False)


def _values(query, keyword: str) -> tuple[str, ...]:
    return next(m.values for m in query.matchers if m.attribute.keyword == keyword)


def test_a_comma_makes_a_list_where_the_vr_cannot_hold_one_and_stays_in_names_and_text():
    query = _query([("ModalitiesInStudy", "CT,MR"), ("PatientName", "Doe,John"), ("AccessionNumber", "A,B")])
    assert _values(query, "ModalitiesInStudy") == ("CT", "MR")  # OHIF's worklist, dicomweb-client's join
    assert _values(query, "PatientName") == ("Doe,John",)  # a PN's comma is part of the name
    assert _values(query, "AccessionNumber") == ("A,B",)  # SH may hold a comma
    assert _values(_query([("SeriesNumber", "1,2")], "SERIES"), "SeriesNumber") == ("1", "2")
    assert _values(_query([("StudyInstanceUID", "1.2,1.3")]), "StudyInstanceUID") == ("1.2", "1.3")
    with pytest.raises(IdentifierError, match="one value or one range, not a list"):
        _query([("StudyDate", "20240101,20240102")])  # said as such, not "not a date"


def test_the_list_reaches_the_index_as_any_of():
    reader = _Reader()
    status, _, _ = _call(_app(reader), "/studies", "ModalitiesInStudy=CT,MR")
    assert status == 204
    (query, _, _), *_ = reader.asked
    assert [(m.how, m.values) for m in query.matchers] == [("list", ("CT", "MR"))]


# ---------------------------------------------------------------- 2. includefield=all


def _header(**values: Any) -> dict[str, Any]:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds.to_json_dict()


def _doc(sop: str, series: str = SERIES, **values: Any) -> dict[str, Any]:
    header = _header(
        StudyInstanceUID=STUDY,
        SeriesInstanceUID=series,
        SOPInstanceUID=sop,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
        Modality="MR",
        Rows=64,
        ImageType=["ORIGINAL", "PRIMARY"],
        PatientName="Doe^Jane",
        **values,
    )
    return {"study_instance_uid": STUDY, "series_instance_uid": series, "sop_instance_uid": sop, "dicom": header}


def test_includefield_all_answers_each_match_its_own_attributes_of_the_level_and_above():
    first = _doc("1.2.3.4.5", StudyDescription="Knee", PatientComments="x")
    second = _doc("1.2.3.5.5", series="1.2.3.5", StationName="CT1")
    second["study_instance_uid"] = "1.2.4"
    reader = _Reader([Match(first, {"ModalitiesInStudy": ["MR"]}), Match(second, {"ModalitiesInStudy": ["MR"]})])
    status, _, body = _call(_app(reader), "/studies", "includefield=all")
    assert status == 200
    one, two = json.loads(body)
    assert one["00081190"]["Value"] == [f"http://127.0.0.1:8088/studies/{STUDY}"]  # the study's, not an instance's
    assert two["00081190"]["Value"] == ["http://127.0.0.1:8088/studies/1.2.4"]
    for model in (one, two):
        for instance_or_series in ("00080018", "00280010", "00080008", "0020000E", "00080060", "00081010"):
            assert instance_or_series not in model
    assert one["00081030"]["Value"] == ["Knee"] and one["00104000"]["Value"] == ["x"]
    # The second match does not carry empty copies of the first one's attributes.
    assert "00081030" not in two and "00104000" not in two
    assert reader.asked[0][2] is None  # the whole header read, then filtered per match


def test_includefield_all_at_series_and_instance_level_and_their_retrieve_urls():
    doc = _doc("1.2.3.4.5", StationName="CT1")
    status, _, body = _call(_app(_Reader([Match(doc, {})])), f"/studies/{STUDY}/series", "includefield=all")
    assert status == 200
    (series,) = json.loads(body)
    assert series["00081190"]["Value"] == [f"http://127.0.0.1:8088/studies/{STUDY}/series/{SERIES}"]
    assert series["00081010"]["Value"] == ["CT1"] and series["00080060"]["Value"] == ["MR"]
    assert "00080018" not in series and "00280010" not in series
    status, _, body = _call(_app(_Reader([Match(doc, {})])), "/instances", "includefield=all")
    (instance,) = json.loads(body)
    assert instance["00081190"]["Value"] == [
        f"http://127.0.0.1:8088/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.5"
    ]
    assert instance["00280010"]["Value"] == [64] and instance["00080008"]["Value"] == ["ORIGINAL", "PRIMARY"]


def test_the_retrieve_url_follows_the_level_with_or_without_includefields():
    doc = _doc("1.2.3.4.5")
    status, _, body = _call(_app(_Reader([Match(doc, {})])), "/studies", "includefield=SOPInstanceUID,00280010")
    assert status == 200
    assert json.loads(body)[0]["00081190"]["Value"] == [f"http://127.0.0.1:8088/studies/{STUDY}"]


# ---------------------------------------------------------------- 3. the base of the URLs


@pytest.mark.parametrize(
    "headers, base",
    [
        # no port in Host (Python's dicomweb-client): the port the request came in on, unless the default
        ({"host": "pacs.example.org"}, "http://pacs.example.org:8088"),
        ({"host": "pacs.example.org:8443"}, "http://pacs.example.org:8443"),
        ({"host": "[::1]:8088"}, "http://[::1]:8088"),
        ({"host": "evil.org/<x>"}, "http://127.0.0.1:8088"),  # no host: the address the request came in on
        ({}, "http://127.0.0.1:8088"),
    ],
)
def test_without_public_url_the_base_is_the_host_header_and_the_port_reached(headers, base):
    app = _app(_Reader([Match(_doc("1.2.3.4.5"), {})]))
    _, _, body = _call(app, "/studies", "", headers)
    assert json.loads(body)[0]["00081190"]["Value"] == [f"{base}/studies/{STUDY}"]


def test_public_url_is_the_base_of_retrieve_and_bulk_data_urls(tmp_path):
    public = "https://pacs.example.org/dicom-web"
    doc = _doc("1.2.3.4.5")
    doc["dicom"]["7FE00010"] = {
        "vr": "OW",
        "BulkDataURI": f"studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.5/bulk/7FE00010",
    }
    app = _app(_Reader([Match(doc, {})], [doc]), public_url=public + "/")
    host = {"host": "pacs.example.org"}
    _, _, body = _call(app, "/studies", "", host)
    assert json.loads(body)[0]["00081190"]["Value"] == [f"{public}/studies/{STUDY}"]
    status, _, body = _call(app, f"/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.5/metadata", "", host)
    assert status == 200
    assert json.loads(body)[0]["7FE00010"]["BulkDataURI"] == (
        f"{public}/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.5/bulk/7FE00010"
    )


def test_public_url_is_checked_at_start():
    assert public_url("") == ""
    assert public_url("https://pacs.example.org/dicom-web/") == "https://pacs.example.org/dicom-web"
    assert public_url("http://10.0.0.5:8088") == "http://10.0.0.5:8088"
    for bad in [
        "pacs.example.org",
        "/dicom-web",
        "ftp://pacs.example.org",
        "https://pacs.example.org/?x=1",
        "https://pacs.example.org/#top",
        "https://user:pw@pacs.example.org",
        "https://pacs.example.org:99999",
        "https:///dicom-web",
        "https://pacs.example.org/dicom web",
    ]:
        with pytest.raises(ConfigError, match="public_url"):
            public_url(bad)


# ---------------------------------------------------------------- 4. Warning headers


def _matches(count: int) -> list[Match]:
    return [Match(_doc(f"1.2.3.4.{n}"), {}) for n in range(count)]


def test_results_cut_by_the_servers_maximum_say_so_in_a_warning():
    status, head, body = _call(_app(_Reader(_matches(3)), max_results=2), "/instances")
    assert status == 200 and len(json.loads(body)) == 2
    assert head["warning"] == [
        '299 127.0.0.1:8088 "The number of results exceeded the maximum supported by the server. '
        'Additional results can be requested."'
    ]
    status, head, body = _call(_app(_Reader(_matches(3)), max_results=2), "/instances", "limit=50")
    assert len(json.loads(body)) == 2 and "warning" in head
    # A page the client asked for is no cut: no warning, and no more read than asked.
    reader = _Reader(_matches(3))
    status, head, body = _call(_app(reader, max_results=5), "/instances", "limit=2&offset=1")
    assert len(json.loads(body)) == 2 and "warning" not in head
    assert reader.asked[0][1] == 3
    # All of them, within the maximum: no warning.
    status, head, body = _call(_app(_Reader(_matches(2)), max_results=2), "/instances")
    assert len(json.loads(body)) == 2 and "warning" not in head


def test_query_keys_the_index_cannot_match_are_named_in_a_warning():
    app = _app(_Reader(_matches(1)))
    status, head, _ = _call(app, "/studies", "PhysiciansOfRecord=Smith&00081080=x&PatientName=Doe")
    assert status == 200
    assert head["warning"] == [
        '299 127.0.0.1:8088 "The following query keys are not supported and matched every value: '
        'PhysiciansOfRecord, 00081080"'
    ]
    status, head, _ = _call(app, "/studies", "PhysiciansOfRecord=&PatientName=Doe&includefield=StationName")
    assert "warning" not in head  # empty: a return key, as asked


def test_referring_physician_name_is_a_matching_key_of_studies():
    """PS3.18 Table 10.6.1-5 requires it: matched as PatientName is (a person name), no Warning."""
    reader = _Reader(_matches(1))
    status, head, _ = _call(_app(reader), "/studies", "ReferringPhysicianName=smith*&fuzzymatching=false")
    assert status == 200 and "warning" not in head
    (matcher,) = reader.asked[0][0].matchers
    assert (matcher.attribute.keyword, matcher.attribute.kind, matcher.how, matcher.values) == (
        "ReferringPhysicianName",
        "pn",
        "wildcard",
        ("smith*",),
    )
    # fuzzy matching applies to it as to every person name: each given name a prefix
    reader = _Reader(_matches(1))
    _call(_app(reader), "/studies", "ReferringPhysicianName=Smith&fuzzymatching=true")
    assert reader.asked[0][0].matchers[0].values == ("Smith*",)


# ---------------------------------------------------------------- 5. bulk data


def _archive(tmp_path: Path, ds: Dataset, sop: str) -> dict[str, Any]:
    key = archive_path(STUDY, SERIES, sop)
    (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(tmp_path / key, enforce_file_format=True)
    return {"study_instance_uid": STUDY, "series_instance_uid": SERIES, "sop_instance_uid": sop}


def _parts(head: dict[str, list[str]], body: bytes) -> list[tuple[str, bytes]]:
    boundary = head["content-type"][0].split("boundary=")[1]
    out = []
    for chunk in body.split(f"--{boundary}".encode())[1:-1]:
        headers, _, content = chunk.partition(b"\r\n\r\n")
        out.append((headers.decode().strip().split(": ", 1)[1], content[:-2]))
    assert body.endswith(f"--{boundary}--\r\n".encode())
    return out


def _with_documents(tmp_path: Path) -> tuple[list[dict[str, Any]], bytes, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    docs = [_archive(tmp_path, mr, "1.2.3.4.1"), _archive(tmp_path, rle, "1.2.3.4.2")]
    pdf = b"%PDF-1.4" + bytes(range(256)) * 8  # of even length: as stored, without padding
    other = b"\x01\x02" * 1500
    doc = Dataset()
    doc.file_meta = FileMetaDataset()
    doc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    doc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    doc.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.3"
    doc.SOPClassUID, doc.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", "1.2.3.4.3"
    doc.EncapsulatedDocument = pdf
    item = Dataset()
    item.IconImageSequence = Sequence()
    item.add_new(0x60003000, "OB", other)  # Overlay Data, inside an item only
    twice_a, twice_b = Dataset(), Dataset()
    twice_a.PixelPaddingRangeLimit = 1
    twice_a.RedPaletteColorLookupTableData = b"\x00\x01" * 600
    twice_b.RedPaletteColorLookupTableData = b"\x02\x03" * 600
    doc.ReferencedImageSequence = Sequence([item])
    doc.ContentSequence = Sequence([twice_a, twice_b])
    docs.append(_archive(tmp_path, doc, "1.2.3.4.3"))
    return docs, pdf, other


def _bulk(sop: str, path: str) -> str:
    return f"/studies/{STUDY}/series/{SERIES}/instances/{sop}/bulk/{path}"


def test_bulk_data_uris_answer_the_value_as_stored(tmp_path):
    docs, pdf, other = _with_documents(tmp_path)
    app = _app(_Reader(docs=docs), tmp_path)
    mr = pydicom.dcmread(tmp_path / archive_path(STUDY, SERIES, "1.2.3.4.1"))
    status, head, body = _call(app, _bulk("1.2.3.4.1", "7FE00010"))
    assert status == 200, body
    assert head["content-type"][0].startswith('multipart/related; type="application/octet-stream"; boundary=')
    assert _parts(head, body) == [("application/octet-stream", mr.PixelData)]
    # dicomweb-client's Accept, and a single part asked first.
    accept = {"accept": 'multipart/related; type="application/octet-stream"'}
    assert _parts(*_call(app, _bulk("1.2.3.4.3", "00420011"), "", accept)[1:]) == [("application/octet-stream", pdf)]
    status, head, body = _call(app, _bulk("1.2.3.4.3", "00420011"), "", {"accept": "application/octet-stream"})
    assert status == 200 and head["content-type"] == ["application/octet-stream"] and body == pdf
    # Inside a sequence: by its path.
    assert _parts(*_call(app, _bulk("1.2.3.4.3", "00081140/0/60003000"))[1:]) == [("application/octet-stream", other)]
    assert _parts(*_call(app, _bulk("1.2.3.4.3", "0040A730/1/00281201"))[1:])[0][1] == b"\x02\x03" * 600


def test_encapsulated_pixel_data_is_sent_frame_by_frame(tmp_path):
    docs, _, _ = _with_documents(tmp_path)
    app = _app(_Reader(docs=docs), tmp_path)
    status, head, body = _call(app, _bulk("1.2.3.4.2", "7FE00010"))
    assert status == 200
    ((kind, frame),) = _parts(head, body)
    assert kind == "application/octet-stream" and len(frame) == 64 * 64 * 2  # decoded, as frames are by default
    accept = {"accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    status, head, body = _call(app, _bulk("1.2.3.4.2", "7FE00010"), "", accept)
    assert _parts(head, body)[0][0] == "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"


def test_a_multi_frame_object_is_served_frame_by_frame_on_both_routes(tmp_path):
    """Five RLE frames: one frame asked by the frames route, all of them by the bulk route (streamed from the
    open file one by one), decoded by default and as stored with transfer-syntax=*."""
    import numpy as np
    from pydicom.encaps import generate_frames
    from pydicom.uid import RLELossless

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    native = np.stack([(ds.pixel_array + 100 * n).astype("<u2") for n in range(5)])
    ds.NumberOfFrames = 5
    ds.PixelRepresentation = 0
    ds.compress(RLELossless, native)
    docs = [_archive(tmp_path, ds, "1.2.3.4.6")]
    stored = list(generate_frames(ds.PixelData, number_of_frames=5))
    app = _app(_Reader(docs=docs), tmp_path)
    as_stored = {"accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    frames_path = f"/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.6/frames/4"
    status, head, body = _call(app, frames_path)
    assert status == 200 and [part for _, part in _parts(head, body)] == [native[3].tobytes()]
    status, head, body = _call(app, frames_path, "", as_stored)
    assert status == 200 and [part for _, part in _parts(head, body)] == [stored[3]]
    status, head, body = _call(app, _bulk("1.2.3.4.6", "7FE00010"))
    assert status == 200 and [part for _, part in _parts(head, body)] == [frame.tobytes() for frame in native]
    status, head, body = _call(app, _bulk("1.2.3.4.6", "7FE00010"), "", as_stored)
    assert status == 200 and [part for _, part in _parts(head, body)] == stored


@pytest.mark.parametrize(
    "sop, path, accept, status, says",
    [
        ("1.2.3.4.1", "00100010x", None, 400, "8 hexadecimal digits"),
        ("1.2.3.4.1", "0040A730/x/00281201", None, 400, "TAG/ITEM/TAG"),
        ("1.2.3.4.1", "00420011", None, 404, "has no 00420011"),
        ("1.2.3.4.9", "7FE00010", None, 404, "no such study, series or instance"),
        ("1.2.3.4.3", "00281201", None, 404, "no 00281201 at its top level, and 2 in its sequences"),
        ("1.2.3.4.1", "00100010", None, 404, "has VR PN: only bulk data values"),
        ("1.2.3.4.1", "00080008", None, 404, "has VR CS"),
        ("1.2.3.4.3", "00080016", None, 404, "has VR UI"),
        ("1.2.3.4.3", "0040A730/5/00281201", None, 404, "no item 5"),
        ("1.2.3.4.3", "0040A730", None, 404, "is a sequence"),
        ("1.2.3.4.1", "7FE00010", 'multipart/related; type="image/jpeg"', 406, "application/octet-stream"),
        ("1.2.3.4.1", "7FE00010", "application/dicom+json", 406, "application/dicom+json"),
        ("1.2.3.4.2", "7FE00010", 'multipart/related; type="image/jpeg"', 406, "image/dicom-rle"),
    ],
)
def test_bulk_data_refusals_say_why(tmp_path, sop, path, accept, status, says):
    docs, _, _ = _with_documents(tmp_path)
    app = _app(_Reader(docs=docs), tmp_path)
    got, _, body = _call(app, _bulk(sop, path), "", {"accept": accept} if accept else {})
    assert (got, says in body.decode()) == (status, True), body


def test_other_large_values_are_not_read(tmp_path, monkeypatch):
    """The object is read with defer_size: only the value asked for comes off the disk."""
    from diana.access.dicomweb import wado

    docs, pdf, _ = _with_documents(tmp_path)
    seen: list[Any] = []
    original = wado.read_archived

    def spy(path, **options):
        ds = original(path, **options)
        seen.append(ds)
        return ds

    monkeypatch.setattr(wado, "read_archived", spy)
    assert wado.read_bulk(tmp_path / archive_path(STUDY, SERIES, "1.2.3.4.3"), [0x00081140, 0, 0x60003000])
    raw = seen[0].get_item(0x00420011, keep_deferred=True)
    assert raw.value is None and raw.length == len(pdf)  # deferred: not read


def test_bulk_data_needs_the_credentials_as_the_other_routes(tmp_path):
    docs, _, _ = _with_documents(tmp_path)
    app = _app(_Reader(docs=docs), tmp_path, credentials=Credentials(token="a-long-token"))
    assert _call(app, _bulk("1.2.3.4.1", "7FE00010"))[0] == 401
    status, _, _ = _call(app, _bulk("1.2.3.4.1", "7FE00010"), "", {"authorization": "Bearer a-long-token"})
    assert status == 200


# ---------------------------------------------------------------- 6. bulk data: review fixes


def _with_icon(tmp_path: Path, big_endian: bool = False) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """An image with an icon (IconImageSequence) whose pixel data is also over the bulk data threshold;
    (its document with the header the receiver builds, image pixels, icon pixels, an OD value), little endian."""
    import struct

    from diana.producers.header_model import build_header_model

    order = ">" if big_endian else "<"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2" if big_endian else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.7"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.7"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 40, 40, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    image = list(range(1600))
    icon = [60000 + i for i in range(500)]
    doubles = [i / 3 for i in range(200)]
    ds.PixelData = struct.pack(f"{order}1600H", *image)
    ds["PixelData"].VR = "OW"
    item = Dataset()
    item.Rows, item.Columns, item.BitsAllocated, item.BitsStored, item.HighBit = 20, 25, 16, 16, 15
    item.SamplesPerPixel, item.PhotometricInterpretation, item.PixelRepresentation = 1, "MONOCHROME2", 0
    item.PixelData = struct.pack(f"{order}500H", *icon)
    item["PixelData"].VR = "OW"
    item.add_new(0x7FE00009, "OD", struct.pack(f"{order}200d", *doubles))  # Double Float Pixel Data
    ds.IconImageSequence = Sequence([item])
    key = archive_path(STUDY, SERIES, "1.2.3.4.7")
    (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(tmp_path / key, enforce_file_format=True, implicit_vr=False, little_endian=not big_endian)
    stored = pydicom.dcmread(tmp_path / key, stop_before_pixels=True)
    base = f"studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.7/bulk"
    model = build_header_model(stored, base, 1 << 20, "OW")
    doc = {"study_instance_uid": STUDY, "series_instance_uid": SERIES, "sop_instance_uid": "1.2.3.4.7"}
    doc["dicom"] = model.elements
    little = (struct.pack("<1600H", *image), struct.pack("<500H", *icon), struct.pack("<200d", *doubles))
    return doc, *little


@pytest.mark.parametrize("big_endian", [False, True])  # big endian: pydicom's path of the header builder
def test_a_value_inside_a_sequence_has_its_own_bulk_data_uri_and_bytes(tmp_path, big_endian):
    doc, image, icon, doubles = _with_icon(tmp_path, big_endian)
    header = doc["dicom"]
    main_uri = header["7FE00010"]["BulkDataURI"]
    icon_item = header["00880200"]["Value"][0]
    icon_uri, od_uri = icon_item["7FE00010"]["BulkDataURI"], icon_item["7FE00009"]["BulkDataURI"]
    assert main_uri.endswith("/bulk/7FE00010")
    assert icon_uri.endswith("/bulk/00880200/0/7FE00010") and od_uri.endswith("/bulk/00880200/0/7FE00009")
    app = _app(_Reader(docs=[doc]), tmp_path)
    for uri, value in ((main_uri, image), (icon_uri, icon), (od_uri, doubles)):
        status, head, body = _call(app, "/" + uri)
        assert status == 200, body
        assert _parts(head, body) == [("application/octet-stream", value)]  # little endian, whatever stored


def test_a_big_endian_value_is_sent_little_endian_by_its_vr():
    from diana.access.dicomweb.wado import little_endian

    assert little_endian(b"\x01\x02\x03\x04\x05", 2) == b"\x02\x01\x04\x03\x05"
    assert little_endian(b"\x01\x02\x03\x04\x05\x06\x07\x08", 4) == b"\x04\x03\x02\x01\x08\x07\x06\x05"
    assert little_endian(b"\x01\x02\x03", 0) == b"\x01\x02\x03"


def test_the_real_big_endian_test_file_pixel_data_is_sent_little_endian(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
        little = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    doc = _archive(tmp_path, big, "1.2.3.4.8")
    status, head, body = _call(_app(_Reader(docs=[doc]), tmp_path), _bulk("1.2.3.4.8", "7FE00010"))
    assert status == 200 and _parts(head, body) == [("application/octet-stream", little.PixelData)]


def test_the_accept_header_is_refused_before_the_value_is_read(tmp_path, monkeypatch):
    from diana.access.dicomweb import app as app_module
    from diana.access.dicomweb import wado

    docs, pdf, _ = _with_documents(tmp_path)
    reads: list[Any] = []
    original = wado.read_bulk

    def counting(path, steps):
        reads.append(steps)
        return original(path, steps)

    monkeypatch.setattr(app_module, "read_bulk", counting)
    app = _app(_Reader(docs=docs), tmp_path)
    status, _, body = _call(app, _bulk("1.2.3.4.3", "00420011"), "", {"accept": "application/dicom+json"})
    assert status == 406 and reads == [], body
    status, head, body = _call(app, _bulk("1.2.3.4.3", "00420011"), "", {"accept": "application/octet-stream"})
    assert status == 200 and body == pdf and len(reads) == 1


def test_a_top_level_value_is_streamed_from_its_offset_in_blocks(tmp_path):
    import io

    from diana.access.dicomweb.wado import BulkValue, bulk_chunks, read_bulk

    docs, pdf, _ = _with_documents(tmp_path)
    path = tmp_path / archive_path(STUDY, SERIES, "1.2.3.4.3")
    found = read_bulk(path, [0x00420011])
    assert isinstance(found, BulkValue) and found.data is None and found.length == len(pdf)
    with open(path, "rb") as stream:
        chunks = list(bulk_chunks(stream, found, block=1024))
    assert len(chunks) == -(-len(pdf) // 1024) and b"".join(chunks) == pdf
    swapped = b"".join(bulk_chunks(io.BytesIO(b"\x01\x02" * 9), BulkValue(offset=2, length=12, swap=2), block=4))
    assert swapped == b"\x02\x01" * 6


def test_includefield_all_gives_bulk_data_their_bulk_data_uri(tmp_path):
    doc, _, _, _ = _with_icon(tmp_path)
    match = Match(document=doc, computed={})
    app = _app(_Reader(matches=[match]), tmp_path)
    status, _, body = _call(app, f"/studies/{STUDY}/series/{SERIES}/instances", "includefield=all")
    assert status == 200, body
    (answer,) = json.loads(body)
    base = f"http://127.0.0.1:8088/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.7/bulk"
    assert answer["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{base}/7FE00010"}
    icon = answer["00880200"]["Value"][0]
    assert icon["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{base}/00880200/0/7FE00010"}


# ---------------------------------------------------------------- 7. bulk data: second review


def _deflated_copy(tmp_path: Path, sop: str, new_sop: str) -> Path:
    """The archived object ``sop`` archived again as ``new_sop``, Deflated Explicit VR Little Endian."""
    from tests.support.dicomgen import write_deflated

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(tmp_path / archive_path(STUDY, SERIES, sop))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_sop
    return write_deflated(ds, tmp_path / archive_path(STUDY, SERIES, new_sop))


def test_a_deflated_objects_values_are_its_own_bytes(tmp_path, monkeypatch):
    """A deferred value's offset is one in the inflated data set: the bytes are read through pydicom, not
    from that offset in the deflated file (which sent other bytes with a 200)."""
    from diana.access.dicomweb import wado

    docs, pdf, other = _with_documents(tmp_path)
    mr = pydicom.dcmread(tmp_path / archive_path(STUDY, SERIES, "1.2.3.4.1"))
    _deflated_copy(tmp_path, "1.2.3.4.3", "1.2.3.4.13")
    _deflated_copy(tmp_path, "1.2.3.4.1", "1.2.3.4.11")
    deflated = [dict(docs[0], sop_instance_uid=sop) for sop in ("1.2.3.4.13", "1.2.3.4.11")]
    app = _app(_Reader(docs=docs + deflated), tmp_path)
    single = {"accept": "application/octet-stream"}
    for sop, path, value in (
        ("1.2.3.4.13", "00420011", pdf),
        ("1.2.3.4.13", "00081140/0/60003000", other),
        ("1.2.3.4.13", "0040A730/1/00281201", b"\x02\x03" * 600),
        ("1.2.3.4.11", "7FE00010", mr.PixelData),
    ):
        status, _, body = _call(app, _bulk(sop, path), "", single)
        assert (status, body == value) == (200, True), (path, body[:200])
    # frame_bytes reads the object with defer_size too.
    deflated_mr = tmp_path / archive_path(STUDY, SERIES, "1.2.3.4.11")
    assert wado.frame_bytes(deflated_mr, [1]) == [mr.PixelData]
    # Held in memory: capped as a value inside a sequence is.
    monkeypatch.setattr(wado, "MAX_NESTED_BULK", 1000)
    status, _, body = _call(app, _bulk("1.2.3.4.13", "00420011"))
    assert status == 413 and b"deflated" in body, body


def test_the_bulk_route_reads_one_version_of_a_file_replaced_meanwhile(tmp_path, monkeypatch):
    """An archive REPLACE renames a new version over the path between reading where the value is and
    sending it: the old version's offset is never applied to the new file's bytes."""
    import builtins
    import os

    from diana.access.dicomweb import app as app_module
    from diana.access.dicomweb import wado

    docs, pdf, _ = _with_documents(tmp_path)
    path = tmp_path / archive_path(STUDY, SERIES, "1.2.3.4.3")
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "x" * 500  # the new version: the value further on, and other bytes
    ds.EncapsulatedDocument = b"%PDF-9.9" + bytes(reversed(range(256))) * 8
    newer = tmp_path / "newer.dcm"
    ds.save_as(newer, enforce_file_format=True)
    original = wado.read_bulk
    opened: list[Any] = []
    real_open = builtins.open

    def replaced_after(source, steps):
        found = original(source, steps)
        os.replace(newer, path)  # what the archive does on REPLACE
        return found

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(app_module, "read_bulk", replaced_after)
    monkeypatch.setattr(builtins, "open", counting_open)
    app = _app(_Reader(docs=docs), tmp_path)
    status, _, body = _call(app, _bulk("1.2.3.4.3", "00420011"), "", {"accept": "application/octet-stream"})
    assert status == 200 and body == pdf  # the version the request opened, whole
    assert len(opened) == 1  # meta, header and value through one open file


def test_flat_uris_of_nested_values_in_stored_headers_are_served_as_paths(tmp_path):
    """Headers stored before BulkDataURI paths keep their flat URIs (reindex re-uses them): the metadata
    answered writes a nested value's URI as its path; a flat one of a tag nested once is still served."""
    doc, image, icon, doubles = _with_icon(tmp_path)
    header = doc["dicom"]
    item = header["00880200"]["Value"][0]
    flat = f"studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.7/bulk"
    item["7FE00010"]["BulkDataURI"] = f"{flat}/7FE00010"  # as the builder wrote them before 999455f
    item["7FE00009"]["BulkDataURI"] = f"{flat}/7FE00009"
    app = _app(_Reader(docs=[doc], matches=[Match(document=doc, computed={})]), tmp_path)
    status, _, body = _call(app, f"/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.7/metadata")
    assert status == 200, body
    (answer,) = json.loads(body)
    base = f"http://127.0.0.1:8088/{flat}"
    assert answer["7FE00010"]["BulkDataURI"] == f"{base}/7FE00010"
    icon_item = answer["00880200"]["Value"][0]
    assert icon_item["7FE00010"]["BulkDataURI"] == f"{base}/00880200/0/7FE00010"
    assert icon_item["7FE00009"]["BulkDataURI"] == f"{base}/00880200/0/7FE00009"
    for uri, value in ((icon_item["7FE00010"]["BulkDataURI"], icon), (icon_item["7FE00009"]["BulkDataURI"], doubles)):
        status, head, got = _call(app, uri.removeprefix("http://127.0.0.1:8088"))
        assert status == 200 and _parts(head, got) == [("application/octet-stream", value)]
    # The flat URI a client kept: the top-level element of that tag if there is one, else the one nested value.
    assert _parts(*_call(app, f"/{flat}/7FE00010")[1:]) == [("application/octet-stream", image)]
    assert _parts(*_call(app, f"/{flat}/7FE00009")[1:]) == [("application/octet-stream", doubles)]
    # QIDO's includefield too.
    status, _, body = _call(app, f"/studies/{STUDY}/series/{SERIES}/instances", "includefield=all")
    (found,) = json.loads(body)
    assert found["00880200"]["Value"][0]["7FE00009"]["BulkDataURI"] == f"{base}/00880200/0/7FE00009"


def test_a_flat_uri_of_a_tag_nested_once_is_served(tmp_path):
    docs, _, other = _with_documents(tmp_path)
    app = _app(_Reader(docs=docs), tmp_path)
    assert _parts(*_call(app, _bulk("1.2.3.4.3", "60003000"))[1:]) == [("application/octet-stream", other)]


def test_the_server_reads_no_forwarded_headers(monkeypatch):
    """uvicorn's default reads X-Forwarded-Proto/-For from 127.0.0.1; public_url is the documented way."""
    from diana.access.dicomweb import server
    from diana.config import Config

    seen: dict[str, Any] = {}
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **options: seen.update(options))
    server.run_dicomweb(Config(), None, False)  # type: ignore[arg-type]
    assert seen["proxy_headers"] is False


class _ReplacedAt:
    """The object's file whose reads of its pixel data (``length`` bytes at ``at``) fail, as a read pinned to
    one version on S3 fails once the object was replaced (If-Match, 412)."""

    def __init__(self, path: str, at: int, length: int):
        import io

        self._file = io.FileIO(path, "r")
        self._at, self._end = at, at + length

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _ReplacedAt:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def read(self, size: int = -1) -> bytes:
        from diana.storage import ObjectChanged

        position = self._file.tell()
        if position < self._end and (size < 0 or position + size > self._at):  # overlaps the pixel data
            raise ObjectChanged("object store: get x: the object was replaced while it was read")
        return self._file.read(size)


class _Replacing(FilesystemStore):
    def open_seekable(self, key: str) -> Any:
        path = self.entry_path(key)
        pixels = pydicom.dcmread(path, defer_size=1024).get_item("PixelData", keep_deferred=True)
        return _ReplacedAt(path, pixels.value_tell, pixels.length)


def test_an_object_replaced_while_it_is_read_is_a_503_saying_retry(tmp_path):
    """A read of the archived object that fails because the object changed (ObjectChanged, from S3's
    If-Match) is 503 "retry" before the status is sent, on the frames route as stored and decoded and on the
    bulk route: not taken for a frame that cannot be decoded (406) or an object that cannot be read (500)."""
    from diana.storage import ObjectChanged

    docs, _, _ = _with_documents(tmp_path)
    app = build_app(_Reader(docs=docs), _Replacing(tmp_path), "DIANA", Credentials())
    frames = f"/studies/{STUDY}/series/{SERIES}/instances/{{}}/frames/1"
    for path in (frames.format("1.2.3.4.1"), frames.format("1.2.3.4.2"), _bulk("1.2.3.4.2", "7FE00010")):
        status, _, body = _call(app, path)
        assert (status, body) == (503, b"the archived object changed while it was read; retry\n"), path
    # A top-level value is read as the body is sent: its status has gone out, the body is cut.
    with pytest.raises(ObjectChanged):
        _call(app, _bulk("1.2.3.4.1", "7FE00010"))
