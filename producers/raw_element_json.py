"""The DICOM JSON of a raw element straight from its bytes, for the common cases; None for the rest.

pydicom turns every raw element into a ``DataElement`` (value conversion, validation, a Python type
per VR) before ``to_json_dict`` renders it: about 17 µs an element, most of what the receiver's header
reader cost beyond pydicom's own parse (docs/PERFORMANCE.md, issue 19). For the VRs headers are
mostly made of, the same JSON is built here from the bytes. Whatever this module is not sure to
render exactly as pydicom does returns None, and the caller takes pydicom's path for that element:
big-endian or deferred values, an implicit VR the dictionary does not give, UN, AT, SQ, LUT
descriptors (pydicom amends their first value), non-ASCII
text, an escape sequence, a text VR under a character set outside ``_ASCII_SUPERSETS``, a number
written in a way pydicom might read otherwise, a length that does not fit its VR, NaN and infinity.
``tests/unit/test_raw_element_json.py`` holds the two paths equal on pydicom's test files, its
character-set files, the vendor dose reports and crafted edge cases.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement

__all__ = ["element_json", "text_is_ascii_compatible"]

# Fixed-size binary numbers: struct format and bytes per value.
_NUMBERS = {
    "US": ("H", 2),
    "SS": ("h", 2),
    "UL": ("L", 4),
    "SL": ("l", 4),
    "UV": ("Q", 8),
    "SV": ("q", 8),
    "FL": ("f", 4),
    "FD": ("d", 8),
}
_FLOATS = {"FL", "FD"}
# Binary values: inline base64 or a BulkDataURI (UN is not here: pydicom may give it a known VR).
_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW"}
# pydicom's multi_string: padding stripped from the whole value, then split (AS, CS, DA, DT, TM).
_SPLIT_WHOLE = {"AS", "CS", "DA", "DT", "TM"}
# Decoded with the data set's character set (values.py CUSTOMIZABLE_CHARSET_VR).
_SPLIT_EACH = {"SH", "LO", "UC"}  # split, then each value's padding stripped
_SINGLE = {"ST", "LT", "UT"}  # one value, backslashes kept
# Character sets whose decoding of 7-bit bytes without ESC is plain ASCII, as pydicom maps them.
_ASCII_SUPERSETS = frozenset(
    {"", "ISO_IR 6", "ISO_IR 192", "GB18030", "GBK"}
    | {f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166)}
    | {f"ISO 2022 IR {n}" for n in (6, 100, 101, 109, 110, 126, 127, 138, 144, 148, 166)}
)
# pydicom reads IS through a float: past 15 digits its value is the float's, not the text's.
_INTEGER = re.compile(r"[+-]?[0-9]{1,15}\Z")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_ESC = 0x1B
# pydicom's raw_element_value hook adds 65536 to a negative first value of these (hooks.py, tag.py
# _LUT_DESCRIPTOR_TAGS): their rendering is its own.
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})


def text_is_ascii_compatible(charsets: object) -> bool:
    """Whether text values of a data set with this SpecificCharacterSet value (None, a string or a
    list) decode as ASCII when their bytes are ASCII without ESC."""
    if charsets is None:
        return True
    values = [charsets] if isinstance(charsets, str) else list(charsets)  # type: ignore[call-overload]
    return all(isinstance(v, str) and v.strip() in _ASCII_SUPERSETS for v in values)


def _vr(raw: RawDataElement) -> str | None:
    if raw.VR is not None:
        return str(raw.VR)
    try:  # implicit VR: the dictionary's, as pydicom does; private and unknown tags are not ours
        vr = dictionary_VR(raw.tag)
    except KeyError:
        return None
    return None if " or " in vr else vr


def _ascii(value: bytes) -> str | None:
    if not value.isascii() or _ESC in value:
        return None
    return value.decode("ascii")


def _strings(vr: str, value: bytes, text_ok: bool) -> list[str] | None:
    """The values as pydicom's converters leave them (an empty list: no value), or None."""
    if vr in _SPLIT_EACH or vr in _SINGLE or vr == "PN":
        if not text_ok:
            return None
    text = _ascii(value)
    if text is None:
        return None
    if vr in _SPLIT_WHOLE:
        values = text.rstrip(" \x00").split("\\")
    elif vr in _SPLIT_EACH:
        values = [v.rstrip("\x00 ") for v in text.split("\\")]
    elif vr in _SINGLE:
        values = [text.rstrip("\x00 ")]
    elif vr == "UI":
        values = [v.strip() for v in text.rstrip("\x00 ").split("\\")]
    elif vr == "AE":
        values = [v.strip() for v in text.split("\\")]
    elif vr == "UR":
        values = [text.rstrip()]
    elif vr == "PN":
        values = text.rstrip("\x00 ").split("\\")
    else:
        return None
    # One empty value is no value (VM 0); several keep their empty ones.
    return [] if values == [""] else values


def _numbers_from_text(vr: str, values: list[str]) -> list[int | float] | None:
    pattern, kind = (_INTEGER, int) if vr == "IS" else (_DECIMAL, float)
    out: list[int | float] = []
    for value in values:
        value = value.strip()
        if not pattern.match(value):
            return None  # empty, or a form pydicom may read otherwise: its path decides
        number = kind(value)
        if not math.isfinite(number):
            return None  # "1e999": pydicom's path leaves it out of the header, with its reason
        out.append(number)
    return out


def _person_names(values: list[str]) -> list[dict[str, str]] | None:
    """Alphabetic names only: pydicom's reading of component groups ("=") and of empty names among
    several (it raises) is its own."""
    if any("=" in value or not value for value in values):
        return None
    return [{"Alphabetic": value} for value in values]


def _binary_numbers(vr: str, value: bytes) -> list[int | float] | None:
    fmt, size = _NUMBERS[vr]
    if len(value) % size:
        return None  # pydicom raises BytesLengthException: the omission and its reason are its path's
    numbers = list(struct.unpack(f"<{len(value) // size}{fmt}", value))
    if vr in _FLOATS and not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


def element_json(
    raw: object, text_ok: bool, bulk_uri: Callable[[int], str], bulk_threshold: int
) -> dict[str, Any] | None:
    """The element's DICOM JSON as pydicom's ``to_json_dict(bulk_uri, bulk_threshold)`` renders it,
    or None when this element must take pydicom's path. ``text_ok``: the data set's character set is
    one of ``_ASCII_SUPERSETS`` (``text_is_ascii_compatible``)."""
    if not isinstance(raw, RawDataElement) or not raw.is_little_endian or raw.value is None:
        return None
    if raw.tag in _LUT_DESCRIPTORS:
        return None
    vr = _vr(raw)
    if vr is None:
        return None
    value: bytes = raw.value
    model: dict[str, Any] = {"vr": vr}
    if vr in _BINARY:
        if value:
            # As pydicom's to_json_dict: the threshold is in base64 characters, 4 for every 3 bytes.
            if len(value) > (bulk_threshold // 4) * 3:
                model["BulkDataURI"] = bulk_uri(int(raw.tag))
            else:
                model["InlineBinary"] = base64.b64encode(value).decode("ascii")
        return model
    if vr in _NUMBERS:
        numbers = _binary_numbers(vr, value)
        if numbers is None:
            return None
        if numbers:
            model["Value"] = numbers
        return model
    strings = _strings("CS" if vr in ("IS", "DS") else vr, value, text_ok)
    if strings is None:
        return None
    if not strings:
        return model
    if vr in ("IS", "DS"):
        numbers_from_text = _numbers_from_text(vr, strings)
        if numbers_from_text is None:
            return None
        model["Value"] = numbers_from_text
    elif vr == "PN":
        names = _person_names(strings)
        if names is None:
            return None
        model["Value"] = names
    else:
        model["Value"] = strings
    return model
