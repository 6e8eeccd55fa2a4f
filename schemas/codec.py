"""The one codec of every diana-star topic: Avro single-object encoding, no registry needed.

A message value is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint (little
endian) + the Avro binary body. The reader finds the writer schema by fingerprint among the
``.avsc`` files shipped in this folder (older versions stay here when a schema evolves), and
resolves it against the current version of the same record.

Python values: records are dicts; ``timestamp-millis`` fields are timezone-aware datetimes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import avro.errors
import avro.io
import avro.schema

__all__ = ["Codec", "DecodeError", "EncodeError", "default_codec"]

MAGIC = b"\xc3\x01"
_HEADER_LEN = len(MAGIC) + 8
# The .avsc files are package data beside this module (read through importlib.resources, so an
# installed wheel finds them as a checkout does).
_SCHEMA_DIR = resources.files("diana.schemas")


class DecodeError(ValueError):
    """Bytes that are not a single-object-encoded record of a known schema."""


class EncodeError(ValueError):
    """A record that does not fit its schema; the message names the schema."""


@dataclass(frozen=True)
class _Entry:
    name: str
    schema: avro.schema.RecordSchema
    fingerprint: bytes
    writer: avro.io.DatumWriter


class Codec:
    def __init__(self, schema_dir: Path | Traversable = _SCHEMA_DIR):
        self._by_name: dict[str, _Entry] = {}
        self._by_fingerprint: dict[bytes, _Entry] = {}
        self._readers: dict[tuple[bytes, str], avro.io.DatumReader] = {}
        for path in sorted((p for p in schema_dir.iterdir() if p.name.endswith(".avsc")), key=lambda p: p.name):
            schema = avro.schema.parse(path.read_text())
            if not isinstance(schema, avro.schema.RecordSchema):
                raise ValueError(f"{path.name}: a topic's schema must be an Avro record")
            fp = schema.fingerprint("CRC-64-AVRO")
            entry = _Entry(schema.fullname, schema, fp, avro.io.DatumWriter(schema))
            self._by_fingerprint[fp] = entry
            # A versioned file (name.v1.avsc) is a former writer schema; the plain file is current.
            if ".v" not in path.name.removesuffix(".avsc"):
                self._by_name[schema.fullname] = entry
                self._by_name[schema.name] = entry

    def schema(self, name: str) -> avro.schema.RecordSchema:
        return self._entry(name).schema

    def _entry(self, name: str) -> _Entry:
        try:
            return self._by_name[name]
        except KeyError:
            raise EncodeError(f"no schema named {name!r}; known: {sorted(self._by_name)}") from None

    def encode(self, schema_name: str, record: dict[str, Any]) -> bytes:
        entry = self._entry(schema_name)
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(entry.fingerprint)
        try:
            entry.writer.write(record, avro.io.BinaryEncoder(buf))
        except avro.errors.AvroTypeException as exc:
            raise EncodeError(f"record does not fit {entry.name}: {exc}") from None
        return buf.getvalue()

    def decode(self, data: bytes, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """Return (schema full name, record). ``expect`` rejects other record types."""
        if data is None or len(data) < _HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object encoded message (missing C3 01 marker)")
        writer = self._by_fingerprint.get(bytes(data[2:_HEADER_LEN]))
        if writer is None:
            raise DecodeError(f"unknown writer schema fingerprint {bytes(data[2:_HEADER_LEN]).hex()}")
        reader_entry = self._by_name.get(writer.schema.fullname, writer)
        if expect is not None and reader_entry.name != self._entry(expect).name:
            raise DecodeError(f"expected {expect}, got {reader_entry.name}")
        key = (writer.fingerprint, reader_entry.name)
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = avro.io.DatumReader(writer.schema, reader_entry.schema)
        try:
            record = reader.read(avro.io.BinaryDecoder(io.BytesIO(data[_HEADER_LEN:])))
        except (avro.errors.AvroException, EOFError, UnicodeDecodeError, ValueError, TypeError, OverflowError) as exc:
            # OverflowError: a timestamp-millis beyond what a datetime holds (hostile or corrupt bytes)
            raise DecodeError(f"corrupt {reader_entry.name} body: {exc}") from None
        if not isinstance(record, dict):
            raise DecodeError(f"{reader_entry.name} is not a record schema")
        return reader_entry.name, record


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    return Codec()


def schema_json(name: str) -> dict[str, Any]:
    """The schema as JSON, e.g. for docs."""
    return json.loads(str(default_codec().schema(name)))
