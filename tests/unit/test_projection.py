"""Unit: the codec's projections (schemas/codec.py) keep the fields named and read what the whole record reads."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from diana.schemas.codec import Codec, DecodeError

# Some of the fields the aggregates worker reads; the header and the landing URI are not among them.
READ_FIELDS = (
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "instance_number",
    "received_at",
    "sha256",
)


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


def test_a_projection_keeps_the_fields_named_and_skips_the_rest():
    fast = Codec({"InstanceArrived": READ_FIELDS})
    name, record = fast.decode(Codec().encode("InstanceArrived", _instance()), expect="InstanceArrived")
    assert name == "org.dianastar.dicom.InstanceArrived"
    assert set(record) == set(READ_FIELDS)  # header_json, landing_path... not built
    full = Codec().decode(Codec().encode("InstanceArrived", _instance()))[1]
    assert all(record[k] == full[k] for k in READ_FIELDS)


def test_bad_bytes_and_unknown_fields_give_clear_errors():
    fast = Codec()
    for bad in (b"not avro", b"\xc3\x01" + b"\x00" * 8 + b"x"):
        with pytest.raises(DecodeError):
            fast.decode(bad)
    with pytest.raises(DecodeError, match="expected SeriesAggregate"):
        fast.decode(Codec().encode("InstanceArrived", _instance()), expect="SeriesAggregate")
    with pytest.raises(ValueError, match="no_such_field"):
        Codec({"InstanceArrived": ["no_such_field"]})
