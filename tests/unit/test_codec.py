"""Unit: the Avro single-object codec shared by every topic."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from diana.schemas.codec import MAGIC, Codec, DecodeError, EncodeError
from diana.schemas.topics import ALL_TOPICS
from tests.support.schema_versions import DOSE_ALERT, SCHEMAS, read_as, write_with


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
        "study_date": "2024-03-15",
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
    assert rec["received_at"] == datetime(2024, 3, 15, 10, 0, 0, 123000, tzinfo=UTC)
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


def _sample(schema):
    """A value for any Avro schema (fields without defaults get one), to exercise resolution."""
    from datetime import datetime

    import avro.schema as s

    if isinstance(schema, s.UnionSchema):
        return None if any(b.type == "null" for b in schema.schemas) else _sample(schema.schemas[0])
    if isinstance(schema, s.RecordSchema):
        return {f.name: _sample(f.type) for f in schema.fields}
    if isinstance(schema, s.ArraySchema):
        return [_sample(schema.items)]
    if isinstance(schema, s.EnumSchema):
        return schema.symbols[0]
    if getattr(schema, "logical_type", None) == "timestamp-millis":
        return datetime(2024, 1, 1, tzinfo=UTC)
    return {"string": "1.2.3", "int": 1, "long": 1, "double": 1.5, "float": 1.5, "boolean": True, "bytes": b"x"}[
        schema.type
    ]


def test_every_former_writer_schema_is_still_readable():
    """Messages written with a kept former version (name.vN.avsc) decode with the current one."""
    import io

    import avro.io
    import avro.schema

    codec = Codec()
    old_versions = sorted(SCHEMAS.glob("*.v*.avsc"))
    assert old_versions, "no former schema versions kept"
    for path in old_versions:
        writer = avro.schema.parse(path.read_text())
        buf = io.BytesIO()
        buf.write(MAGIC + writer.fingerprint("CRC-64-AVRO"))
        avro.io.DatumWriter(writer).write(_sample(writer), avro.io.BinaryEncoder(buf))
        name, record = codec.decode(buf.getvalue())
        assert name == writer.fullname, path.name
        current = {f.name for f in codec.schema(writer.name).fields}
        assert set(record) == current, path.name


def test_a_timestamp_beyond_any_datetime_is_a_decode_error_not_a_crash():
    import io
    import json

    import avro.io
    import avro.schema

    codec = Codec()
    raw_schema = json.loads(str(codec.schema("InstanceArrived")))
    for f in raw_schema["fields"]:
        if f["name"] == "received_at":
            f["type"] = "long"  # the same bytes, written without the logical type
    record = _instance(received_at=2**62)
    body = io.BytesIO()
    avro.io.DatumWriter(avro.schema.parse(json.dumps(raw_schema))).write(record, avro.io.BinaryEncoder(body))
    header = codec.encode("InstanceArrived", _instance())[:10]
    with pytest.raises(DecodeError, match="corrupt"):
        codec.decode(header + body.getvalue())


def _rich_sample(schema, depth: int = 0):
    """Like _sample, but a union takes its non-null branch: every field carries a value."""
    import avro.schema as s

    if isinstance(schema, s.UnionSchema):
        branches = [b for b in schema.schemas if b.type != "null"]
        return _rich_sample(branches[0], depth) if branches else None
    if isinstance(schema, s.RecordSchema):
        return {f.name: _rich_sample(f.type, depth + 1) for f in schema.fields}
    if isinstance(schema, s.ArraySchema):
        return [_rich_sample(schema.items, depth + 1), _rich_sample(schema.items, depth + 1)]
    if isinstance(schema, s.MapSchema):
        return {"k": _rich_sample(schema.values, depth + 1)}
    if isinstance(schema, s.EnumSchema):
        return schema.symbols[-1]
    if getattr(schema, "logical_type", None) == "timestamp-millis":
        return datetime(2024, 2, 29, 23, 59, 58, 765000, tzinfo=UTC)
    return {
        "string": "1.2.840.10008.Ünïcode",
        "int": -123456,
        "long": 2**40 + 7,
        "double": -0.125,
        "float": 1.5,
        "boolean": True,
        "bytes": b"\x00\xffx",
    }[schema.type]


def test_fastavro_writes_the_same_bytes_as_the_avro_package_for_every_schema():
    """The wire format cannot drift: for every .avsc (current and former), the codec's bytes equal
    the avro package's, and each side reads what the other wrote."""
    import io

    import avro.io
    import avro.schema

    codec = Codec()
    paths = sorted(SCHEMAS.glob("*.avsc"))
    assert len(paths) >= 10
    for path in paths:
        schema = avro.schema.parse(path.read_text())
        for record in (_rich_sample(schema), _sample(schema)):
            reference = io.BytesIO()
            reference.write(MAGIC + schema.fingerprint("CRC-64-AVRO"))
            avro.io.DatumWriter(schema).write(record, avro.io.BinaryEncoder(reference))
            if ".v" not in path.name.removesuffix(".avsc"):  # the codec writes current versions only
                ours = codec.encode(schema.name, record)
                assert ours == reference.getvalue(), path.name
                back = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(ours[10:])))
                assert back == record, path.name
            name, decoded = codec.decode(reference.getvalue())
            assert name == schema.fullname, path.name
            if ".v" not in path.name.removesuffix(".avsc"):
                assert decoded == record, path.name


def test_encode_refuses_what_fastavro_would_silently_coerce():
    with pytest.raises(EncodeError, match="InstanceArrived"):
        Codec().encode("InstanceArrived", _instance(instance_number=7.5))
    with pytest.raises(EncodeError, match="InstanceArrived"):
        Codec().encode("InstanceArrived", {k: v for k, v in _instance().items() if k != "sha256"})
    with pytest.raises(EncodeError, match="size_bytes"):
        Codec().encode("InstanceArrived", _instance(size_bytes=7.5))


@pytest.mark.parametrize(
    "version_file", ["instance_arrived.v1.avsc", "instance_arrived.v2.avsc", "instance_arrived.v3.avsc"]
)
def test_instance_arrived_before_v4_keeps_its_host_relative_landing_path(version_file):
    old = _instance(landing_path="ab/" + "ab" * 32 + ".dcm")
    _, record = Codec().decode(write_with(version_file, old), expect="InstanceArrived")
    assert record["landing_path"] == "ab/" + "ab" * 32 + ".dcm"
    assert record["landing_uri"] is None
    assert record["sha256"] == "ab" * 32 and record["source"] == "C_STORE"


def test_instance_arrived_v4_carries_a_storage_uri_and_the_stow_source():
    codec = Codec()
    event = _instance(landing_uri="s3://diana/landing/ab/" + "ab" * 32 + ".dcm", source="STOW_RS")
    _, record = codec.decode(codec.encode("InstanceArrived", event))
    assert record["landing_uri"] == event["landing_uri"] and record["landing_path"] == event["landing_path"]
    assert record["source"] == "STOW_RS"


@pytest.mark.parametrize(
    "version_file",
    ["instance_arrived.v1.avsc", "instance_arrived.v2.avsc", "instance_arrived.v3.avsc", "instance_arrived.v4.avsc"],
)
def test_instance_arrived_before_v5_has_no_referring_physician_name(version_file):
    old = _instance(referring_physician_name="Smith^Anna", patient_name="Doe^Jane")
    _, record = Codec().decode(write_with(version_file, old), expect="InstanceArrived")
    assert record["referring_physician_name"] is None  # the writer had no such field: the default
    assert record["patient_name"] == "Doe^Jane"


def test_instance_arrived_v5_carries_the_referring_physician_name():
    codec = Codec()
    event = _instance(referring_physician_name="Müller^Jürgen", patient_name="Doe^Jane")
    _, record = codec.decode(codec.encode("InstanceArrived", event))
    assert record["referring_physician_name"] == "Müller^Jürgen"


def test_a_v4_reader_reads_a_v5_event_without_the_referring_physician_name():
    """Readers not yet upgraded (v5 only adds an optional field): the name is dropped, the rest is read."""
    codec = Codec()
    data = codec.encode("InstanceArrived", _instance(referring_physician_name="Smith^Anna", patient_name="Doe^Jane"))
    old = read_as(data, "instance_arrived.avsc", "instance_arrived.v4.avsc")
    assert "referring_physician_name" not in old and old["patient_name"] == "Doe^Jane"


def test_study_aggregate_v2_decodes_without_the_referring_physician_name():
    study = {
        "study_instance_uid": "1.2.3",
        "revision": 4,
        "patient_name": "Doe^Jane",
        "referring_physician_name": "Smith^Anna",
        "modalities": ["CT"],
        "series_instance_uids": ["1.2.3.1"],
        "series_count": 1,
        "instance_count": 2,
        "total_bytes": 10,
        "first_received_at": datetime(2024, 3, 15, tzinfo=UTC),
        "last_received_at": datetime(2024, 3, 15, tzinfo=UTC),
        "status": "COMPLETED",
        "version": 1,
        "completed_series_count": 1,
    }
    codec = Codec()
    _, old = codec.decode(write_with("study_aggregate.v2.avsc", study), expect="StudyAggregate")
    assert old["referring_physician_name"] is None and old["patient_name"] == "Doe^Jane"
    _, new = codec.decode(codec.encode("StudyAggregate", study), expect="StudyAggregate")
    assert new["referring_physician_name"] == "Smith^Anna"


def test_a_v3_reader_reads_a_v4_stow_event_as_c_store():
    """Readers not yet upgraded (v4 only adds): the new symbol falls back to the enum's default, the
    URI is dropped, the landing key is still there."""
    codec = Codec()
    event = _instance(landing_uri="file:///var/landing/ab/x.dcm", source="STOW_RS")
    data = codec.encode("InstanceArrived", event)
    old = read_as(data, "instance_arrived.avsc", "instance_arrived.v3.avsc")
    assert old["source"] == "C_STORE" and "landing_uri" not in old and old["landing_path"] == "ab/abab.dcm"


def _withdrawal() -> dict:
    return {
        **DOSE_ALERT,
        "revision": 2,
        "message": "m",
        "superseded_by": "1.2.3.9",
        "withdrawn_reason": "under_limit",
        "replaced_value": 800.0,
        "window_study_uids": [],
    }


@pytest.mark.parametrize("version_file", ["dose_alert.v1.avsc", "dose_alert.v2.avsc"])
def test_dose_alert_before_v3_has_no_withdrawal_reason_or_replaced_value(version_file):
    _, record = Codec().decode(write_with(version_file, _withdrawal()), expect="DoseAlert")
    assert record["withdrawn_reason"] is None and record["replaced_value"] is None
    assert record["superseded_by"] == ("1.2.3.9" if version_file.endswith("v2.avsc") else None)


def test_v3_resolves_against_v2_given_both_schemas():
    """Schema resolution only: a deployed reader of the release before finds writers by fingerprint and
    cannot decode a v3 record at all (test_dose_alert_upgrade_order.py), so the dose worker writes v2
    whenever the v3 fields are null."""
    codec = Codec()
    data = codec.encode("DoseAlert", _withdrawal())
    old = read_as(data, "dose_alert.avsc", "dose_alert.v2.avsc")
    assert old["superseded_by"] == "1.2.3.9" and "replaced_value" not in old
