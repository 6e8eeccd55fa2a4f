"""A decoder of one record type that builds only the fields its reader names, generated per writer schema.

Why: the aggregates worker reads 25 of InstanceArrived's 40 fields and spent about a third of its
CPU in the codec's full decode (fastavro builds every string, and a timezone-aware datetime for
``received_at``, which the worker turned straight back into milliseconds). A fastavro projection
(a reader schema) measured slower than the full decode, because fastavro resolves the two schemas
on every call (codec.py). Here the resolution happens once: for the current writer schema of the
record, Python source is generated that walks the Avro binary body field by field, builds the named
fields and only steps over the others (their length prefix; a string is not decoded). Measured with
``python -m bench.codec_cost`` (docs/PERFORMANCE.md, issue 20).

What it returns: a dict of the named fields with the values the codec gives, except that
top-level ``timestamp-millis`` fields stay integers (milliseconds since the epoch), which is what the worker
computes with. A body written with a former version of the schema (``name.vN.avsc``) is decoded by
the codec (schema resolution, defaults for fields the writer lacks) and cut down the same way, so
the result never depends on the path. ``tests/unit/test_field_decoder.py`` checks the result
against the full codec on every version and on corrupt bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from diana.schemas.codec import MAGIC, Codec, DecodeError

__all__ = ["FieldDecoder"]

_HEADER_LEN = len(MAGIC) + 8
_DOUBLE = struct.Struct("<d").unpack_from
_FLOAT = struct.Struct("<f").unpack_from
# Types the generated code builds; any other needed field makes that writer go through the codec.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_BUILT = {"null", "boolean", "int", "long", "float", "double", "string", "bytes"}


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint (Avro int and long) from ``pos``: (value, next position)."""
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise ValueError("varint longer than 10 bytes")
    return (n >> 1) ^ -(n & 1), pos


def _skip(buf: bytes, pos: int, schema: Any, names: dict[str, Any]) -> int:
    """Step over one value of ``schema`` (a field the reader does not want); its next position."""
    if isinstance(schema, str):
        if schema in names:
            return _skip(buf, pos, names[schema], names)
        if schema == "null":
            return pos
        if schema == "boolean":
            return pos + 1
        if schema in ("int", "long"):
            return _read_long(buf, pos)[1]
        if schema == "float":
            return pos + 4
        if schema == "double":
            return pos + 8
        if schema in ("string", "bytes"):
            n, pos = _read_long(buf, pos)
            if n < 0:
                raise ValueError("negative length")
            return pos + n
        raise ValueError(f"unknown type {schema!r}")
    if isinstance(schema, list):
        index, pos = _read_long(buf, pos)
        if not 0 <= index < len(schema):
            raise ValueError(f"union index {index} out of range")
        return _skip(buf, pos, schema[index], names)
    kind = schema["type"]
    if kind == "record":
        for field in schema["fields"]:
            pos = _skip(buf, pos, field["type"], names)
        return pos
    if kind == "enum":
        return _read_long(buf, pos)[1]
    if kind == "fixed":
        return pos + int(schema["size"])
    if kind in ("array", "map"):
        while True:
            count, pos = _read_long(buf, pos)
            if count == 0:
                return pos
            if count < 0:  # a block with its byte size: skip it whole
                size, pos = _read_long(buf, pos)
                pos += size
                continue
            for _ in range(count):
                if kind == "map":
                    pos = _skip(buf, pos, "string", names)
                pos = _skip(buf, pos, schema["items"] if kind == "array" else schema["values"], names)
    return _skip(buf, pos, kind, names)  # {"type": "long", "logicalType": ...} and the like


def _collect_names(schema: Any, names: dict[str, Any], namespace: str = "") -> None:
    """Named types (record, enum, fixed) by short and full name, for references and skipping."""
    if isinstance(schema, list):
        for branch in schema:
            _collect_names(branch, names, namespace)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "enum", "fixed"):
            space = schema.get("namespace", namespace)
            names[schema["name"]] = schema
            names[f"{space}.{schema['name']}" if space else schema["name"]] = schema
            namespace = space
        for field in schema.get("fields", ()):
            _collect_names(field["type"], names, namespace)
        for key in ("items", "values"):
            if key in schema:
                _collect_names(schema[key], names, namespace)
        if isinstance(kind, (dict, list)):
            _collect_names(kind, names, namespace)


class _Unsupported(Exception):
    """A needed field of a type the generator does not build: that writer goes through the codec."""


def _value_code(schema: Any, names: dict[str, Any], target: str | None, indent: str) -> list[str]:
    """Lines reading one value of ``schema`` into ``target``, or stepping over it (``target`` None)."""
    keep = target is not None
    if isinstance(schema, str) and schema in names:
        schema = names[schema]
    if isinstance(schema, dict):
        kind = schema["type"]
        logical = schema.get("logicalType")
        if kind == "enum":
            symbols = tuple(schema["symbols"])
            lines = [
                f"{indent}n, pos = read_long(buf, pos)",
                f"{indent}if not 0 <= n < {len(symbols)}:",
                f"{indent}    raise ValueError('enum index out of range')",
            ]
            return lines + ([f"{indent}{target} = {symbols!r}[n]"] if keep else [])
        if kind in ("int", "long") and logical in (None, "timestamp-millis"):
            schema = kind  # timestamp-millis stays an integer of milliseconds (the module's contract)
        elif isinstance(kind, str) and logical is None and kind in _BUILT:
            schema = kind
        else:
            raise _Unsupported(f"type {schema!r}")
    if isinstance(schema, list):
        if len(schema) > 63:
            raise _Unsupported("a union of more than 63 branches")
        lines = [f"{indent}branch = buf[pos]", f"{indent}pos += 1"]
        for index, branch in enumerate(schema):
            # A union index below 64 is one varint byte: zig-zag 2 * index.
            lines.append(f"{indent}{'if' if index == 0 else 'elif'} branch == {2 * index}:")
            lines += _value_code(branch, names, target, indent + "    ") or [f"{indent}    pass"]
        return lines + [f"{indent}else:", f"{indent}    raise ValueError('union index out of range')"]
    if schema == "null":
        return [f"{indent}{target} = None"] if keep else []
    if schema == "boolean":
        return ([f"{indent}{target} = buf[pos] == 1"] if keep else []) + [f"{indent}pos += 1"]
    if schema in ("int", "long"):
        into = target if keep else "n"
        return [
            f"{indent}b = buf[pos]",
            f"{indent}if b < 128:",  # one byte, most of them: no call
            f"{indent}    {into} = (b >> 1) ^ -(b & 1)",
            f"{indent}    pos += 1",
            f"{indent}else:",
            f"{indent}    {into}, pos = read_long(buf, pos)",
        ]
    if schema in ("double", "float"):
        size, unpack = (8, "unpack_double") if schema == "double" else (4, "unpack_float")
        return ([f"{indent}{target} = {unpack}(buf, pos)[0]"] if keep else []) + [f"{indent}pos += {size}"]
    if schema in ("string", "bytes"):
        build = ".decode()" if schema == "string" else ""
        return [
            *_value_code("long", names, "n", indent),
            f"{indent}if n < 0:",
            f"{indent}    raise ValueError('negative length')",
            *([f"{indent}{target} = buf[pos:pos + n]{build}"] if keep else []),
            f"{indent}pos += n",
        ]
    raise _Unsupported(f"type {schema!r}")


def _generate(writer: dict[str, Any], keep: frozenset[str]) -> Callable[[bytes], dict[str, Any]]:
    names: dict[str, Any] = {}
    _collect_names(writer, names)
    lines = ["def decode(buf):", "    pos = 0", "    out = {}"]
    for index, field in enumerate(writer["fields"]):
        if field["name"] in keep:
            lines += _value_code(field["type"], names, f"out[{field['name']!r}]", "    ")
        else:
            try:  # stepped over inline (a length, a union branch)...
                lines += _value_code(field["type"], names, None, "    ")
            except _Unsupported:  # ...or by the interpreter (arrays, maps, records)
                lines.append(f"    pos = skip(buf, pos, fields[{index}], names)")
    lines += ["    if pos > len(buf):", "        raise ValueError('body shorter than its lengths')", "    return out"]
    scope: dict[str, Any] = {
        "read_long": _read_long,
        "unpack_double": _DOUBLE,
        "unpack_float": _FLOAT,
        "skip": _skip,
        "fields": [f["type"] for f in writer["fields"]],
        "names": names,
    }
    # The source comes from our own .avsc files only (names and symbols quoted with repr), never from input.
    exec(compile("\n".join(lines), f"<field_decoder {writer['name']}>", "exec"), scope)
    decode: Callable[[bytes], dict[str, Any]] = scope["decode"]
    return decode


class FieldDecoder:
    """``decode(message_value)``: only the ``fields`` of records ``record`` (short or full name).

    Raises DecodeError as the codec does (not single-object encoded, unknown fingerprint, another
    record type, a corrupt body).
    """

    def __init__(self, codec: Codec, record: str, fields: Iterable[str]) -> None:
        self.codec = codec
        entry = codec._entry(record)
        self.name = entry.name
        self.keep = frozenset(fields)
        unknown = self.keep - {f.name for f in entry.schema.fields}
        if unknown:
            raise ValueError(f"{entry.name} has no fields {sorted(unknown)}")
        self._fingerprint = entry.fingerprint
        try:
            self._generated: Callable[[bytes], dict[str, Any]] | None = _generate(entry.raw, self.keep)
        except _Unsupported:
            self._generated = None

    def decode(self, data: bytes) -> dict[str, Any]:
        if self._generated is not None and data is not None and data[2:_HEADER_LEN] == self._fingerprint:
            if data[:2] == MAGIC:
                try:
                    return self._generated(data[_HEADER_LEN:])
                except Exception as exc:  # bytes from the wire: each error is the message's fault
                    raise DecodeError(f"corrupt {self.name} body: {type(exc).__name__}: {exc}") from None
        return self._through_codec(data)

    def _through_codec(self, data: bytes) -> dict[str, Any]:
        """A former writer schema (or no generated reader): the codec resolves it, then the same cut."""
        _, record = self.codec.decode(data, expect=self.name)
        out = {name: record.get(name) for name in self.keep}
        for name, value in out.items():
            if isinstance(value, datetime):  # a timestamp-millis field (or union with one)
                out[name] = (value - _EPOCH) // _MS  # exact, unlike a float timestamp
        return out
