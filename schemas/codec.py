"""The one codec of every diana-star topic: Avro single-object encoding, no registry needed.

A message value is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint (little
endian) + the Avro binary body. The reader finds the writer schema by fingerprint among the
``.avsc`` files shipped in this folder (older versions stay here when a schema evolves), and
resolves it against the current version of the same record.

Python values: records are dicts; ``timestamp-millis`` fields are timezone-aware datetimes.

Bytes are written and read with ``fastavro`` (about ten times faster than the pure-Python ``avro``
package, which the receiver, the aggregator and reindex each spent most of their encoding time in);
``avro`` still parses the ``.avsc`` files for ``schema()`` (fields, defaults) and the fingerprints.
``tests/unit/test_codec.py`` cross-checks the two packages on every schema both ways, so the wire
format cannot drift.

A reader may name a *projection* per record: the current schema cut down to the fields it reads.
fastavro's schema resolution then skips the other fields' bytes without building them. fastavro
resolves the two schemas on every call, so this pays only on large headers (bench/codec_cost.py,
docs/PERFORMANCE.md: slower below about 9 KB). The aggregates worker reads events through
field_decoder.py instead, which resolves once.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import avro.schema
import fastavro

__all__ = ["Codec", "DecodeError", "EncodeError", "default_codec", "MAGIC"]

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
    parsed: Any  # fastavro's parsed form of the same .avsc
    raw: dict[str, Any]  # the .avsc as JSON
    # Plain int/long fields: the one misfit fastavro's writer lets through (it truncates a float).
    integral_fields: tuple[str, ...]


class Codec:
    """``encode(name, record)`` and ``decode(data, expect)``; ``projections`` maps a record name (short
    or full) to the only fields its decoded records keep."""

    def __init__(
        self, projections: dict[str, Iterable[str]] | None = None, schema_dir: Path | Traversable = _SCHEMA_DIR
    ) -> None:
        self._by_name: dict[str, _Entry] = {}
        self._by_fingerprint: dict[bytes, _Entry] = {}
        self._by_version: dict[tuple[str, int], _Entry] = {}  # (full name, N) -> name.vN.avsc
        for path in sorted((p for p in schema_dir.iterdir() if p.name.endswith(".avsc")), key=lambda p: p.name):
            text = path.read_text()
            schema = avro.schema.parse(text)
            if not isinstance(schema, avro.schema.RecordSchema):
                raise ValueError(f"{path.name}: a topic's schema must be an Avro record")
            fp = schema.fingerprint("CRC-64-AVRO")
            # Each file on its own: a former version (name.vN.avsc) redefines the same names.
            raw = json.loads(text)
            parsed = fastavro.parse_schema(raw, named_schemas={})
            integral = tuple(f.name for f in schema.fields if f.type.type in ("int", "long"))
            entry = _Entry(schema.fullname, schema, fp, parsed, raw, integral)
            self._by_fingerprint[fp] = entry
            # A versioned file (name.v1.avsc) is a former writer schema; the plain file is current.
            version = re.fullmatch(r".+\.v(\d+)", path.name.removesuffix(".avsc"))
            if version is None:
                self._by_name[schema.fullname] = entry
                self._by_name[schema.name] = entry
            else:
                self._by_version[(schema.fullname, int(version.group(1)))] = entry
        self._projections: dict[str, Any] = {}  # full name -> fastavro's parsed reader schema
        for name, fields in (projections or {}).items():
            self._projections[self._entry(name).name] = self._projection(name, set(fields))

    def _projection(self, name: str, keep: set[str]) -> Any:
        entry = self._entry(name)
        unknown = keep - {f.name for f in entry.schema.fields}
        if unknown:
            raise ValueError(f"projection of {entry.name} names fields it does not have: {sorted(unknown)}")
        cut = {**entry.raw, "fields": [f for f in entry.raw["fields"] if f["name"] in keep]}
        return fastavro.parse_schema(cut, named_schemas={})

    def schema(self, name: str) -> avro.schema.RecordSchema:
        return self._entry(name).schema

    def _entry(self, name: str) -> _Entry:
        try:
            return self._by_name[name]
        except KeyError:
            raise EncodeError(f"no schema named {name!r}; known: {sorted(self._by_name)}") from None

    def encode(self, schema_name: str, record: dict[str, Any], version: int | None = None) -> bytes:
        """``version``: write with the former schema ``name.v<version>.avsc`` instead of the current one,
        so a reader not yet upgraded (which knows writers by fingerprint) still reads the record; the
        record's fields that version lacks are not written (the caller chooses it only when they are
        null)."""
        entry = self._entry(schema_name)
        if version is not None:
            try:
                entry = self._by_version[(entry.name, version)]
            except KeyError:
                raise EncodeError(f"no former version v{version} of {entry.name}") from None
        # fastavro's writer refuses misfits itself (TypeError, ValueError), except a float in a plain
        # int/long field, which it truncates; fastavro.validate would catch it too, at 10x the cost
        # of the write (it parses the schema again on every call).
        for name in entry.integral_fields:
            if isinstance(record.get(name), float):
                raise EncodeError(f"record does not fit {entry.name}: {name} must be an integer")
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(entry.fingerprint)
        try:
            fastavro.schemaless_writer(buf, entry.parsed, record)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
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
        body = io.BytesIO(memoryview(data)[_HEADER_LEN:])
        reader = self._projections.get(reader_entry.name)
        if reader is None and reader_entry is not writer:
            reader = reader_entry.parsed
        try:
            record = fastavro.schemaless_reader(body, writer.parsed, reader)
        except Exception as exc:
            # Bytes from the wire: truncated (EOFError), a timestamp-millis beyond what a datetime
            # holds (OverflowError), junk lengths or union indexes (ValueError, IndexError)...
            # fastavro raises many kinds; each is the message's fault, and it goes to dead letters.
            raise DecodeError(f"corrupt {reader_entry.name} body: {type(exc).__name__}: {exc}") from None
        if not isinstance(record, dict):
            raise DecodeError(f"{reader_entry.name} is not a record schema")
        return reader_entry.name, record


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    return Codec()


def schema_json(name: str) -> dict[str, Any]:
    """The schema as JSON, e.g. for docs."""
    return json.loads(str(default_codec().schema(name)))
