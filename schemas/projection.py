"""The codec's fast path for the stream workers: fastavro, and reader schemas that skip what a worker does not read.

Same wire format as codec.py (``C3 01`` + the writer schema's CRC-64-AVRO fingerprint + the Avro
binary body), byte for byte (tested against ``Codec``). Two differences, both for speed:
- encoding and decoding run in fastavro (C) instead of the pure-Python ``avro`` package: about
  15 times faster per record here;
- a record can be read through a *projection*: the current schema cut down to the fields a reader
  names. fastavro's schema resolution then skips the other fields' bytes without building them.
  Measured (CPU per InstanceArrived, bench/codec_cost.py, docs/PERFORMANCE.md): whole record
  41/44/460 us, projection 58/51/310 us, codec.py 258/299/804 us for events of 0.3/9/183 KB.
  fastavro resolves the two schemas on every call, so a projection pays only on large headers (a
  dose report, a multi-frame object); the aggregates worker decodes whole records.

Parsed schemas keep fastavro's parse marker: parsed with ``_write_hint=False`` they were parsed
again on every call, and decoding took 3 times as long.

Writers of older schema versions (``name.vN.avsc``) are read as codec.py reads them: resolved
against the current schema, limited to the projection.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import avro.schema
import fastavro

from diana.schemas.codec import MAGIC, DecodeError, EncodeError

__all__ = ["FastCodec", "AGGREGATES_INSTANCE_FIELDS"]

_HEADER_LEN = len(MAGIC) + 8
_SCHEMA_DIR = resources.files("diana.schemas")

# What the aggregates worker reads of an InstanceArrived event (stream_apps/aggregates.py).
AGGREGATES_INSTANCE_FIELDS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "transfer_syntax_uid",
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_date",
    "study_description",
    "series_number",
    "series_description",
    "modality",
    "body_part_examined",
    "instance_number",
    "station_name",
    "manufacturer",
    "size_bytes",
    "sha256",
    "received_at",
    "number_of_frames",
    "images_in_acquisition",
    "number_of_temporal_positions",
)


class FastCodec:
    """``encode(name, record)`` and ``decode(data, expect)`` as in ``Codec``; ``projections`` maps a
    record name (short or full) to the fields its decoded records keep."""

    def __init__(
        self, projections: dict[str, Iterable[str]] | None = None, schema_dir: Path | Traversable = _SCHEMA_DIR
    ) -> None:
        self._writers: dict[bytes, tuple[str, Any]] = {}  # fingerprint -> (full name, parsed writer schema)
        self._current: dict[str, tuple[str, bytes, Any, dict[str, Any]]] = {}  # name -> (full, fp, parsed, json)
        for path in sorted((p for p in schema_dir.iterdir() if p.name.endswith(".avsc")), key=lambda p: p.name):
            text = path.read_text()
            fingerprint = avro.schema.parse(text).fingerprint("CRC-64-AVRO")
            raw = json.loads(text)
            full = f"{raw['namespace']}.{raw['name']}" if raw.get("namespace") else raw["name"]
            parsed = fastavro.parse_schema(raw)
            self._writers[fingerprint] = (full, parsed)
            if ".v" not in path.name.removesuffix(".avsc"):
                self._current[full] = self._current[raw["name"]] = (full, fingerprint, parsed, raw)
        # Reader schema per record name: the projection, or the whole current schema.
        self._readers: dict[str, Any] = {full: parsed for full, _, parsed, _ in self._current.values()}
        for name, fields in (projections or {}).items():
            full, _, _, raw = self._entry(name)
            keep = set(fields)
            unknown = keep - {f["name"] for f in raw["fields"]}
            if unknown:
                raise ValueError(f"projection of {full} names fields it does not have: {sorted(unknown)}")
            cut = {**raw, "fields": [f for f in raw["fields"] if f["name"] in keep]}
            self._readers[full] = fastavro.parse_schema(cut)

    def _entry(self, name: str) -> tuple[str, bytes, Any, dict[str, Any]]:
        try:
            return self._current[name]
        except KeyError:
            raise EncodeError(f"no schema named {name!r}; known: {sorted(self._current)}") from None

    def encode(self, schema_name: str, record: dict[str, Any]) -> bytes:
        full, fingerprint, parsed, _ = self._entry(schema_name)
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(fingerprint)
        try:
            fastavro.schemaless_writer(buf, parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise EncodeError(f"record does not fit {full}: {exc}") from None
        return buf.getvalue()

    def decode(self, data: bytes, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """(schema full name, record), the record limited to its projection if it has one."""
        if data is None or len(data) < _HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object encoded message (missing C3 01 marker)")
        writer = self._writers.get(bytes(data[2:_HEADER_LEN]))
        if writer is None:
            raise DecodeError(f"unknown writer schema fingerprint {bytes(data[2:_HEADER_LEN]).hex()}")
        full, writer_schema = writer
        if expect is not None and full != self._entry(expect)[0]:
            raise DecodeError(f"expected {expect}, got {full}")
        reader = self._readers.get(full, writer_schema)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(data[_HEADER_LEN:]), writer_schema, reader)
        except (EOFError, UnicodeDecodeError, ValueError, TypeError, OverflowError, IndexError, KeyError) as exc:
            raise DecodeError(f"corrupt {full} body: {type(exc).__name__}: {exc}") from None
        if not isinstance(record, dict):
            raise DecodeError(f"{full} is not a record schema")
        return full, record
