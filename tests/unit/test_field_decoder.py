"""Unit: the generated field decoder (schemas/field_decoder.py) gives exactly what the full codec gives.

Cross-checked on random records of every current schema (every field kept, then random subsets),
on the aggregates worker's own projection of InstanceArrived, on events of every former
InstanceArrived version, and on corrupt bytes (a DecodeError, never another exception).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import avro.schema as s
import pytest

from diana.schemas.codec import Codec, DecodeError
from diana.schemas.field_decoder import FieldDecoder
from diana.stream_apps.aggregates import INSTANCE_FIELDS_READ

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TEXTS = ["", "x", "1.2.840.10008.Ünïcode", "é" * 40, "1.2.826.0.1.3680043.10.1234." + "9" * 120]
NUMBERS = [0, 1, -1, 63, 64, -65, 127, 128, 300, -300, 2**31 - 1, -(2**31)]


def _random(schema: s.Schema, rnd: random.Random, depth: int = 0) -> Any:
    if isinstance(schema, s.UnionSchema):
        return _random(rnd.choice(schema.schemas), rnd, depth)
    if isinstance(schema, s.RecordSchema):
        return {f.name: _random(f.type, rnd, depth + 1) for f in schema.fields}
    if isinstance(schema, s.ArraySchema):
        return [_random(schema.items, rnd, depth + 1) for _ in range(rnd.randint(0, 3 if depth < 3 else 0))]
    if isinstance(schema, s.MapSchema):
        return {f"k{i}": _random(schema.values, rnd, depth + 1) for i in range(rnd.randint(0, 2))}
    if isinstance(schema, s.EnumSchema):
        return rnd.choice(schema.symbols)
    if getattr(schema, "logical_type", None) == "timestamp-millis":
        return EPOCH + timedelta(milliseconds=rnd.choice([0, 1, 1_764_390_000_123, 253_402_300_799_999]))
    kind = schema.type
    if kind == "null":
        return None
    if kind == "string":
        return rnd.choice(TEXTS)
    if kind == "bytes":
        return bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 70)))
    if kind == "int":
        return rnd.choice(NUMBERS)
    if kind == "long":
        return rnd.choice([*NUMBERS, 2**40 + 7, -(2**62), 2**63 - 1])
    if kind in ("double", "float"):
        return rnd.choice([0.0, -0.125, 1.5, 1e300 if kind == "double" else 2.5])
    if kind == "boolean":
        return rnd.choice([True, False])
    raise AssertionError(kind)


def _expected(codec: Codec, data: bytes, name: str, fields: frozenset[str]) -> dict[str, Any]:
    """The full codec's record cut to ``fields``, timestamps as milliseconds (the decoder's contract)."""
    _, record = codec.decode(data, expect=name)
    out = {}
    for field in fields:
        value = record[field]
        out[field] = (value - EPOCH) // timedelta(milliseconds=1) if isinstance(value, datetime) else value
    return out


def _current_records(codec: Codec) -> list[str]:
    return sorted({entry.name for entry in codec._by_name.values()})


@pytest.mark.parametrize("name", _current_records(Codec()))
def test_every_schema_every_field_and_random_subsets_equal_the_full_codec(name: str) -> None:
    codec = Codec()
    schema = codec.schema(name)
    all_fields = [f.name for f in schema.fields]
    rnd = random.Random(name)
    decoders = [FieldDecoder(codec, name, all_fields)]
    decoders += [FieldDecoder(codec, name, rnd.sample(all_fields, rnd.randint(1, len(all_fields)))) for _ in range(6)]
    for _ in range(150):
        data = codec.encode(name, _random(schema, rnd))
        for decoder in decoders:
            assert decoder.decode(data) == _expected(codec, data, name, decoder.keep)


def test_the_aggregates_projection_is_generated_and_equals_the_full_codec() -> None:
    codec = Codec()
    decoder = FieldDecoder(codec, "InstanceArrived", INSTANCE_FIELDS_READ)
    assert decoder._generated is not None  # the fast path, not the codec fallback
    rnd = random.Random(20)
    schema = codec.schema("InstanceArrived")
    for _ in range(2000):
        data = codec.encode("InstanceArrived", _random(schema, rnd))
        got = decoder.decode(data)
        assert got == _expected(codec, data, "InstanceArrived", decoder.keep)
        assert set(got) == set(INSTANCE_FIELDS_READ)


@pytest.mark.parametrize(
    "version_file",
    ["instance_arrived.v1.avsc", "instance_arrived.v2.avsc", "instance_arrived.v3.avsc", "instance_arrived.v4.avsc"],
)
def test_former_writer_versions_go_through_the_codec_with_its_defaults(version_file: str) -> None:
    from tests.support.schema_versions import write_with

    codec = Codec()
    decoder = FieldDecoder(codec, "InstanceArrived", INSTANCE_FIELDS_READ)
    rnd = random.Random(version_file)
    schema = codec.schema("InstanceArrived")
    for _ in range(50):
        record = _random(schema, rnd)
        record["source"] = "C_STORE"  # a symbol every version has
        data = write_with(version_file, record)
        assert decoder.decode(data) == _expected(codec, data, "InstanceArrived", decoder.keep)


def test_corrupt_bytes_are_a_decode_error_and_a_valid_decode_agrees_with_the_codec() -> None:
    codec = Codec()
    decoder = FieldDecoder(codec, "InstanceArrived", INSTANCE_FIELDS_READ)
    rnd = random.Random(7)
    schema = codec.schema("InstanceArrived")
    for _ in range(40):
        data = codec.encode("InstanceArrived", _random(schema, rnd))
        for cut in range(len(data)):  # every truncation
            with pytest.raises(DecodeError):
                decoder.decode(data[:cut])
        for _ in range(60):  # random byte changes in the body
            where = rnd.randrange(10, len(data))
            bad = data[:where] + bytes([rnd.randrange(256)]) + data[where + 1 :]
            try:
                got = decoder.decode(bad)
            except DecodeError:
                continue
            try:
                expected = _expected(codec, bad, "InstanceArrived", decoder.keep)
            except DecodeError:
                continue  # the codec refused a field the decoder steps over (invalid UTF-8, say)
            assert got == expected
    with pytest.raises(DecodeError, match="expected"):
        decoder.decode(codec.encode("SeriesAggregate", _random(codec.schema("SeriesAggregate"), rnd)))
    with pytest.raises(DecodeError):
        decoder.decode(b"not avro")


def test_a_field_the_record_does_not_have_is_refused() -> None:
    with pytest.raises(ValueError, match="no fields"):
        FieldDecoder(Codec(), "InstanceArrived", ["sop_instance_uid", "no_such_field"])
