"""The OpenSearch sink's documents: the event's header goes in as the receiver wrote it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from diana.sinks.opensearch import _document, identifiers_only, rejection_reason

# Spacing json.dumps would never write: it survives only if the header is not parsed and re-serialised.
HEADER = '{"00080060":{"vr":"CS","Value":["CT"]},   "00100010":{"vr":"PN"}}'


def test_the_header_is_spliced_verbatim_as_dicom() -> None:
    record = {
        "sop_instance_uid": "1.2.3",
        "received_at": datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        "size_bytes": 524288,
        "header_json": HEADER,
    }
    text = _document(record)
    assert text.endswith(f'"dicom":{HEADER}}}'.encode())
    assert json.loads(text) == {
        "sop_instance_uid": "1.2.3",
        "received_at": "2026-11-28T12:00:00+00:00",
        "size_bytes": 524288,
        "dicom": json.loads(HEADER),
    }


def test_a_document_without_header_has_no_dicom_member() -> None:
    for header in (None, ""):
        assert json.loads(_document({"sop_instance_uid": "1.2.3", "header_json": header})) == {
            "sop_instance_uid": "1.2.3"
        }


def test_a_header_alone_makes_a_valid_document() -> None:
    assert json.loads(_document({"header_json": HEADER})) == {"dicom": json.loads(HEADER)}


def test_a_header_with_line_breaks_is_written_on_one_line_and_cannot_add_a_bulk_action() -> None:
    pretty = '{\n  "00100020": {"vr": "LO", "Value": ["P1"]}\n}'
    doc = _document({"sop_instance_uid": "1.2", "header_json": pretty})
    assert b"\n" not in doc and json.loads(doc)["dicom"] == json.loads(pretty)
    smuggled = '{"a": 1}}\n{"delete": {"_index": "diana-instances", "_id": "9.9"}}\n{"b": {'
    with pytest.raises(json.JSONDecodeError):  # the sink dead-letters a message whose handling raises
        _document({"sop_instance_uid": "1.2", "header_json": smuggled})


def test_values_json_has_no_type_for_are_written_as_text_and_timestamps_in_iso_8601() -> None:
    from datetime import date
    from decimal import Decimal

    moment = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    document = json.loads(
        _document({"at": moment, "on": date(2026, 11, 30), "dose": Decimal("1.5"), "later": [{"at": moment}]})
    )
    assert document == {
        "at": "2026-11-30T07:00:00+00:00",
        "on": "2026-11-30",
        "dose": "1.5",
        "later": [{"at": "2026-11-30T07:00:00+00:00"}],
    }


def test_a_value_json_cannot_hold_is_null_and_text_stays_unescaped_utf8() -> None:
    # json.dumps wrote NaN, which is not JSON: OpenSearch refused the whole document.
    document = _document({"patient_weight_kg": float("nan"), "institution_name": "Hôpital Saint-Louis"})
    assert json.loads(document) == {"patient_weight_kg": None, "institution_name": "Hôpital Saint-Louis"}
    assert "Hôpital".encode() in document


# OpenSearch 2.19's own answers (bulk items' error, filter_path items.*.error.type/reason), captured
# from a real node for documents of the instances template.
_REFUSED = [
    (
        {
            "type": "mapper_parsing_exception",
            "reason": "failed to parse field [patient_birth_date] of type [date] in document with id 'a1'. "
            "Preview of field's value: '1980-13-45'",
        },
        "1980-13-45",
        "patient_birth_date",
    ),
    (
        {
            "type": "illegal_argument_exception",
            "reason": 'Document contains at least one immense term in field="patient_id" (whose UTF8 encoding is '
            "longer than the max length 32766), all of which were skipped.  Please correct the analyzer to not "
            "produce such terms.  The prefix of the first immense term is: '[83, 69, 67, 82, 69, 84]...', "
            "original message: bytes can be at most 32766 in length; got 36000",
        },
        "83, 69, 67",
        'field="patient_id"',
    ),
    (
        {
            "type": "mapper_parsing_exception",
            "reason": "failed to parse field [patient_age_years] of type [float] in document with id 'a3'. "
            "Preview of field's value: 'SMITH^JOHN'",
        },
        "SMITH",
        "patient_age_years",
    ),
]


@pytest.mark.parametrize(("error", "value", "field"), _REFUSED)
def test_a_refusal_names_the_field_and_its_type_but_not_the_value(error, value, field) -> None:
    reason = rejection_reason(error)
    assert value not in reason
    assert reason.startswith(error["type"] + ": ") and field in reason and "(value withheld)" in reason


def test_quoted_text_of_an_unknown_reason_is_withheld_and_a_long_reason_cut() -> None:
    reason = rejection_reason({"type": "x_exception", "reason": "cannot use 'DOE^JANE' here " + "y" * 1000})
    assert "DOE" not in reason and "'…'" in reason and len(reason) < 330
    assert rejection_reason({"type": "x_exception"}) == "x_exception"
    assert rejection_reason({}) == "error"


def test_a_refused_instance_is_indexed_again_by_what_the_index_cannot_refuse() -> None:
    """Its strings and the receiver's own numbers stay (found by UID, patient, accession); the header and
    the numbers and dates read from it go, and header_omitted says why."""
    record = {
        "sop_instance_uid": "1.2.3",
        "patient_id": "P1",
        "accession_number": "A1",
        "study_date": "2024-03-15",
        "patient_birth_date": "1970-01-01",
        "series_date": None,
        "instance_number": 5,
        "series_number": 2,
        "patient_weight_kg": 1e39,
        "number_of_frames": 3,
        "received_at": datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        "size_bytes": 524288,
        "header_json": HEADER,
        "header_omitted": [{"path": "7FE00010", "reason": "too large"}],
    }
    kept = json.loads(_document(identifiers_only(record, "mapper_parsing_exception: failed to parse field")))
    assert kept == {
        "sop_instance_uid": "1.2.3",
        "patient_id": "P1",
        "accession_number": "A1",
        "received_at": "2026-11-28T12:00:00+00:00",
        "size_bytes": 524288,
        "header_omitted": [
            {"path": "7FE00010", "reason": "too large"},
            {"path": "", "reason": "refused by the index: mapper_parsing_exception: failed to parse field"},
        ],
    }


@pytest.mark.parametrize(
    "name",
    ["Smith^Anna", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Wang^XiaoDong==", "Hong^Gildong==홍^길동", "", None],
    ids=["plain", "three groups", "trailing empty groups", "no ideographic", "empty", "absent"],
)
def test_an_older_event_gets_its_referring_physician_from_its_header_as_the_receiver_reads_it(tmp_path, name):
    """Events written before InstanceArrived v5 have no referring_physician_name: a reindex fills it from
    the event's header, with the text the receiver gives a newer event of the same object."""
    from pydicom.uid import generate_uid

    from diana.producers.header import read_header
    from tests.support.dicomgen import make_instance

    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="REF1", study_date="20240101")
    ds.SpecificCharacterSet = ["ISO_IR 192"]
    if name is not None:
        ds.ReferringPhysicianName = name
    elif "ReferringPhysicianName" in ds:
        del ds.ReferringPhysicianName
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    fields = read_header(path.read_bytes()).fields
    older = {"sop_instance_uid": "1.2.3", "referring_physician_name": None, "header_json": fields["header_json"]}
    document = json.loads(_document(older))
    assert document["referring_physician_name"] == fields["referring_physician_name"]
    assert (fields["referring_physician_name"] is None) == (not name)
    # A newer event keeps its own value; one without the field at all gets none.
    newer = {**older, "referring_physician_name": "Given^Value"}
    assert json.loads(_document(newer))["referring_physician_name"] == "Given^Value"
    assert "referring_physician_name" not in json.loads(_document({"header_json": fields["header_json"]}))


def test_a_referring_physician_inside_a_sequence_is_not_taken_for_the_top_level_one(tmp_path):
    """The top-level element empty or absent, a copy in a referenced study's item or in the Original
    Attributes Sequence: the receiver reads none, and so does the sink (it once took the first one found)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from diana.producers.header import read_header
    from tests.support.dicomgen import make_instance

    for top_level in ("", None):
        ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="REF2", study_date="20240101")
        item = Dataset()
        item.ReferringPhysicianName = "Nested^Doctor"
        ds.ReferencedStudySequence = [item]
        ds.OriginalAttributesSequence = [Dataset()]
        ds.OriginalAttributesSequence[0].ModifiedAttributesSequence = [Dataset()]
        ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].ReferringPhysicianName = "Old^Name"
        if top_level is None:
            if "ReferringPhysicianName" in ds:
                del ds.ReferringPhysicianName
        else:
            ds.ReferringPhysicianName = top_level
        path = tmp_path / "nested.dcm"
        ds.save_as(path, enforce_file_format=True)
        fields = read_header(path.read_bytes()).fields
        assert fields["referring_physician_name"] is None
        older = {"sop_instance_uid": "1.2.3", "referring_physician_name": None, "header_json": fields["header_json"]}
        assert json.loads(_document(older))["referring_physician_name"] is None
