"""Unit: the fastavro codec path (schemas/projection.py) agrees with the reference codec byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from diana.schemas.codec import Codec, DecodeError
from diana.schemas.projection import AGGREGATES_INSTANCE_FIELDS, FastCodec
from diana.stream_apps.aggregates import _new_series, _new_study, series_record, study_record
from diana.stream_apps.completeness import QuietTimes


def _instance(**over):
    rec = {
        "sop_instance_uid": "1.2.3.4",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 1234,
        "sha256": "ab" * 32,
        "landing_path": "ab/abab.dcm",
        "received_at": datetime(2024, 3, 15, 10, 0, 0, 123000, tzinfo=UTC),
        "source": "C_STORE",
        "patient_id": "P1",
        "instance_number": 7,
        "modality": "CT",
        "header_json": '{"00100010": {"vr": "PN"}}' * 100,
    }
    rec.update(over)
    return rec


def test_encoding_is_byte_identical_to_the_reference_codec():
    fast, ref = FastCodec(), Codec()
    event = _instance()
    assert fast.encode("InstanceArrived", event) == ref.encode("InstanceArrived", event)
    series = _new_series(event, 1_700_000_000_000, QuietTimes.parse("*=30").default)
    study = _new_study(event, 1_700_000_000_000)
    for name, record in (("SeriesAggregate", series_record(series)), ("StudyAggregate", study_record(study))):
        assert fast.encode(name, record) == ref.encode(name, record)
        assert fast.decode(ref.encode(name, record)) == ref.decode(ref.encode(name, record))


def test_a_projection_keeps_the_fields_named_and_skips_the_rest():
    fast = FastCodec({"InstanceArrived": AGGREGATES_INSTANCE_FIELDS})
    name, record = fast.decode(Codec().encode("InstanceArrived", _instance()), expect="InstanceArrived")
    assert name == "org.dianastar.dicom.InstanceArrived"
    assert set(record) == set(AGGREGATES_INSTANCE_FIELDS)  # header_json, landing_path... not built
    full = Codec().decode(Codec().encode("InstanceArrived", _instance()))[1]
    assert all(record[k] == full[k] for k in AGGREGATES_INSTANCE_FIELDS)


def test_bad_bytes_and_unknown_fields_give_clear_errors():
    fast = FastCodec()
    for bad in (b"not avro", b"\xc3\x01" + b"\x00" * 8 + b"x"):
        with pytest.raises(DecodeError):
            fast.decode(bad)
    with pytest.raises(DecodeError, match="expected SeriesAggregate"):
        fast.decode(Codec().encode("InstanceArrived", _instance()), expect="SeriesAggregate")
    with pytest.raises(ValueError, match="no_such_field"):
        FastCodec({"InstanceArrived": ["no_such_field"]})
