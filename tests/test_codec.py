"""Unit: the Avro single-object codec shared by every topic."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from diana.schemas.codec import Codec, DecodeError, EncodeError, MAGIC
from diana.schemas.topics import ALL_TOPICS


def _instance(**over):
    rec = {
        "sop_instance_uid": "1.2.3.4", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "size_bytes": 1234, "sha256": "ab" * 32,
        "landing_path": "ab/abab.dcm", "received_at": datetime(2024, 3, 15, 10, 0, 0, 123000, tzinfo=timezone.utc),
        "source": "C_STORE", "patient_id": "P1", "instance_number": 7, "study_date": "2024-03-15",
    }
    rec.update(over)
    return rec


def test_round_trip_keeps_every_field_and_fills_defaults():
    codec = Codec()
    data = codec.encode("InstanceArrived", _instance())
    assert data[:2] == MAGIC
    name, rec = codec.decode(data)
    assert name == "org.dianastar.dicom.InstanceArrived"
    assert rec["instance_number"] == 7 and rec["patient_id"] == "P1"
    assert rec["received_at"] == datetime(2024, 3, 15, 10, 0, 0, 123000, tzinfo=timezone.utc)
    assert rec["modality"] is None  # optional field absent on write, default on read


def test_decode_rejects_foreign_and_truncated_bytes():
    codec = Codec()
    with pytest.raises(DecodeError, match="marker"):
        codec.decode(b'{"json": true}')
    with pytest.raises(DecodeError, match="fingerprint"):
        codec.decode(MAGIC + b"\x00" * 8 + b"\x02")
    data = codec.encode("InstanceArrived", _instance())
    with pytest.raises(DecodeError, match="corrupt"):
        codec.decode(data[:20])


def test_decode_checks_the_expected_record_type():
    codec = Codec()
    data = codec.encode("InstanceArrived", _instance())
    with pytest.raises(DecodeError, match="expected SeriesAggregate"):
        codec.decode(data, expect="SeriesAggregate")


def test_encode_names_the_schema_when_a_record_does_not_fit():
    with pytest.raises(EncodeError, match="InstanceArrived"):
        Codec().encode("InstanceArrived", _instance(size_bytes="big"))


def test_every_topic_with_a_schema_has_its_avsc():
    codec = Codec()
    for topic in ALL_TOPICS:
        if topic.schema:
            assert codec.schema(topic.schema).name == topic.schema
