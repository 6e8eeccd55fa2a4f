"""Read the identifying and descriptive header of a Part-10 object, without its pixel data.

Everything that later becomes a path, a key or a log field is validated here first:
UIDs must be digits and dots with no empty component, at most 64 characters (schemas/uid.py), so
that ``../`` or a slash can never reach a file name; a leading zero in a component (not PS3.5 9.1
conformant, but found in the wild) is counted, not refused. Descriptive values are returned as data only.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from datetime import date
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pydicom
import structlog
from pydicom.datadict import tag_for_keyword
from pydicom.uid import DeflatedExplicitVRLittleEndian

from diana.producers import metrics
from diana.producers.header_model import HeaderModel, build_header_model
from diana.producers.inflate import DEFAULT_MAX_INFLATED_BYTES, InflateError, file_meta, inflated_copy, is_deflated
from diana.producers.raw_element_json import element_json
from diana.schemas.uid import is_conformant_uid, is_valid_uid

__all__ = [
    "HeaderError",
    "InvalidIdentifiers",
    "InstanceHeader",
    "Truncated",
    "patient_age_years",
    "read_header",
    "read_header_file",
]

log = structlog.get_logger("diana.ingest")

# The event's header budget when none is given (tests, tools): [kafka] max_message_bytes less room.
DEFAULT_HEADER_BUDGET = 8 * 1024 * 1024 - 256 * 1024
# pydicom's defer_size for the header read: values longer than this are not read unless needed.
_DEFER_BYTES = 64 << 10


class HeaderError(ValueError):
    """The bytes cannot be parsed as a DICOM data set."""


class Truncated(HeaderError):
    """The file ends before its content does: an element's length runs past the end (a copy cut short)."""


class InvalidIdentifiers(ValueError):
    """The data set parses but lacks, or has malformed, identifying UIDs."""


@dataclass(frozen=True)
class InstanceHeader:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    fields: dict[str, Any]


_UNKNOWN = object()


def _rendered_value(entry: dict[str, Any], kinds: tuple[type, ...]) -> Any:
    """The value pydicom gives an element, read from its rendering: None when it is empty, its one
    value when that is of ``kinds``, else ``_UNKNOWN`` (pydicom's own reading decides)."""
    values = entry.get("Value")
    if values is None:
        # Present, empty (pydicom's '' reads as absent too); a binary value is not told here.
        return _UNKNOWN if "InlineBinary" in entry or "BulkDataURI" in entry else None
    if len(values) == 1 and isinstance(values[0], kinds):
        return values[0]
    return _UNKNOWN


class _Values:
    """Top-level values by keyword: from the header's DICOM JSON when it holds the element with one
    value of the kind asked for (the value pydicom gives, converted no second time), else pydicom's."""

    def __init__(self, ds: pydicom.Dataset, elements: dict[str, Any]):
        self.ds = ds
        self.elements = elements

    def get(self, keyword: str, kinds: tuple[type, ...]) -> Any:
        """The value, or None when absent or undecodable (the header model says which and why)."""
        tag = tag_for_keyword(keyword)
        entry = self.elements.get(f"{tag:08X}") if tag is not None else None
        if entry is not None and entry["vr"] != "PN":
            value = _rendered_value(entry, kinds)
            if value is not _UNKNOWN:
                return value
        try:
            return self.ds.get(keyword)
        except Exception:  # pydicom raises many kinds on odd values
            return None


def _text(values: _Values, keyword: str) -> str | None:
    value = values.get(keyword, (str,))
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text or None


_FLOAT32_MAX = 3.4028234663852886e38


def _number(values: _Values, keyword: str, kind: type[int] | type[float]) -> int | float | None:
    """The value as ``kind``, or None when absent or unusable (out of int32 or float32, NaN)."""
    # From the model only a value pydicom's JSON keeps as it was: IS is rendered through int(), so
    # "72.5" under VR IS would read 72 there, where float(pydicom's value) is 72.5.
    value = values.get(keyword, (str, int, float) if kind is int else (str, float))
    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if kind is int:
        return number if -(2**31) <= number < 2**31 else None
    # Finite and within a 32-bit float: the index maps these as `float` and refuses the whole document
    # for a value it cannot hold (a weight of 1e39 is infinite there).
    return number if number == number and abs(number) <= _FLOAT32_MAX else None


def _int(values: _Values, keyword: str) -> int | None:
    value = _number(values, keyword, int)
    return None if value is None else int(value)


def _float(values: _Values, keyword: str) -> float | None:
    return _number(values, keyword, float)


def _iso_date(values: _Values, keyword: str) -> str | None:
    text = _text(values, keyword)
    if not (text and len(text) == 8 and text.isdigit()):
        return None
    try:  # a real calendar date: 20240231 is absent, not an error later on
        return date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
    except ValueError:
        return None


def _iso_time(values: _Values, keyword: str) -> str | None:
    text = _text(values, keyword)
    if not text:
        return None
    digits, _, fraction = text.partition(".")
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return None
    parts = [digits[i : i + 2] for i in range(0, len(digits), 2)] + ["00"] * (3 - len(digits) // 2)
    hh, mm, ss = (int(p) for p in parts)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    out = ":".join(parts)
    return f"{out}.{fraction}" if fraction.isdigit() else out


_UNDEFINED_LENGTH = 0xFFFFFFFF


_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def patient_age_years(age: str | None, birth_date: str | None, study_date: str | None) -> float | None:
    """PatientAge (nnnY/M/W/D) in years; else whole years from ISO birth and study dates."""
    if age and len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_UNITS:
        return round(int(age[:3]) * _AGE_UNITS[age[3]], 3)
    if birth_date and study_date:
        born, seen = date.fromisoformat(birth_date), date.fromisoformat(study_date)
        years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        return float(years) if 0 <= years < 150 else None
    return None


def _header_model(ds: pydicom.Dataset, uids: dict[str, str], has_pixels: bool, budget: int) -> HeaderModel:
    """The DICOM JSON model of the header; large binary values point into the stored object."""
    base = (
        f"studies/{uids['study_instance_uid']}/series/{uids['series_instance_uid']}"
        f"/instances/{uids['sop_instance_uid']}/bulk"
    )
    pixel_vr = None
    if has_pixels:
        pixel_vr = "OB" if pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed else "OW"
    return build_header_model(ds, base, budget, pixel_vr)


def _check_lengths(ds: pydicom.Dataset, total: int) -> None:
    """pydicom silently shortens an element whose length runs past the end: we call it truncated."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements, not tags
        raw = ds.get_item(tag, keep_deferred=True)  # a deferred value's length and offset, not the value
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        if length is None or tell is None or length == _UNDEFINED_LENGTH:
            continue
        if tell + length > total:
            raise Truncated(f"element {tag} claims {length} bytes, only {max(total - tell, 0)} follow: truncated")


def read_header_file(
    path: Path,
    header_budget_bytes: int = DEFAULT_HEADER_BUDGET,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    scratch_dir: Path | None = None,
) -> InstanceHeader:
    """Parse the header of a Part-10 file without reading its pixel data.

    A deflated data set is inflated as a stream into a temporary file in ``scratch_dir`` (default:
    beside ``path``), up to ``max_inflated_bytes`` (inflate.py); the header then describes the
    object as stored (deflated).
    """
    with open(path, "rb") as fh:
        # pydicom's own parse, not a scan of the group length's bytes: a file whose (0002,0000) is too
        # small would pass such a scan and have pydicom inflate it whole, past max_inflated_bytes.
        meta = file_meta(fh)
        if meta is None or not is_deflated(meta):
            fh.seek(0)
            return _read(fh, os.fstat(fh.fileno()).st_size, header_budget_bytes)
        try:
            with (
                inflated_copy(fh, meta, scratch_dir or Path(path).parent, max_inflated_bytes) as plain,
                open(plain, "rb") as ih,
            ):
                header = _read(ih, os.fstat(ih.fileno()).st_size, header_budget_bytes)
        except InflateError as exc:
            raise HeaderError(str(exc)) from None
    return dataclasses.replace(header, transfer_syntax_uid=DeflatedExplicitVRLittleEndian)


def read_header(part10: bytes, header_budget_bytes: int = DEFAULT_HEADER_BUDGET) -> InstanceHeader:
    """Parse the header of a Part-10 byte string; raise HeaderError or InvalidIdentifiers."""
    if is_deflated(file_meta(BytesIO(part10))):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "object.dcm"
            path.write_bytes(part10)
            return read_header_file(path, header_budget_bytes)
    return _read(BytesIO(part10), len(part10), header_budget_bytes)


_PIXEL_TAGS = {0x7FE00010: "pixel data", 0x7FE00008: "float pixel data", 0x7FE00009: "double float pixel data"}
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
# Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _pixel_data(fh: BinaryIO, ds: pydicom.Dataset, total: int) -> bool:
    """Whether the file has Pixel Data (stop_before_pixels leaves it at the tag), and that all of it is there.

    pydicom, asked to stop before the pixel data, never looks at it: a file cut in its pixel data
    parsed as whole. Each pixel data element (Pixel Data, Float and Double Float Pixel Data) is
    checked from its header: a defined length must fit in the file; an undefined one starting with
    an item (encapsulated) is followed item by item, by the items' lengths, to its Sequence
    Delimitation Item, without reading the fragments; native pixel data of undefined length (no item
    first) is scanned for its Sequence Delimitation Item, as pydicom reads it. Raises Truncated or
    HeaderError.
    """
    implicit, little = ds.original_encoding
    if implicit is None:  # no data set read: nothing past it to check
        implicit, little = False, True
    order: Literal["little", "big"] = "little" if little else "big"
    found = False
    while True:
        start = fh.tell()
        head = fh.read(8)
        if len(head) < 4:
            return found
        tag = _tag_of(head, order)
        name = _PIXEL_TAGS.get(tag)
        if name is None:
            return found  # elements after the pixel data are not checked
        found = found or tag == 0x7FE00010
        if len(head) < 8:
            raise Truncated(f"{name} element header cut short: truncated")
        if implicit:
            length, value_at = int.from_bytes(head[4:8], order), start + 8
        elif head[4:6] in _LONG_VRS:
            more = fh.read(4)
            if len(more) < 4:
                raise Truncated(f"{name} element header cut short: truncated")
            length, value_at = int.from_bytes(more, order), start + 12
        else:
            length, value_at = int.from_bytes(head[6:8], order), start + 8
        if length != _UNDEFINED_LENGTH:
            if value_at + length > total:
                raise Truncated(f"{name} claims {length} bytes, only {max(total - value_at, 0)} follow: truncated")
            fh.seek(value_at + length)
            continue
        fh.seek(value_at)
        if _tag_at(fh, order) in (_ITEM, _SEQUENCE_DELIMITER):
            fh.seek(_fragments_end(fh, value_at, total, order, name))
        else:  # native pixel data of undefined length: its bytes run to a Sequence Delimitation Item
            fh.seek(_delimiter_end(fh, value_at, order, name))


def _tag_at(fh: BinaryIO, order: Literal["little", "big"]) -> int | None:
    """The tag at the file's position (None when fewer than 4 bytes are left)."""
    head = fh.read(4)
    return _tag_of(head, order) if len(head) == 4 else None


def _tag_of(head: bytes, order: Literal["little", "big"]) -> int:
    """The tag (group << 16 | element) in the first four bytes of ``head``."""
    return (int.from_bytes(head[0:2], order) << 16) | int.from_bytes(head[2:4], order)


_SCAN_CHUNK = 1 << 20


def _delimiter_end(fh: BinaryIO, offset: int, order: Literal["little", "big"], name: str) -> int:
    """Where native pixel data of undefined length ends: after the first Sequence Delimitation Item.

    pydicom reads such a value (read_undefined_length_value) up to the first occurrence of the
    delimiter's tag bytes, wherever it falls; this finds the same one, a chunk at a time.
    """
    marker = (0xFFFE).to_bytes(2, order) + (0xE0DD).to_bytes(2, order)
    fh.seek(offset)
    chunk_at, carry = offset, b""
    while True:
        chunk = fh.read(_SCAN_CHUNK)
        if not chunk:
            raise Truncated(f"{name} ends before its sequence delimitation item: truncated")
        window = carry + chunk
        found = window.find(marker)
        if found >= 0:
            end = chunk_at - len(carry) + found + 8
            fh.seek(end - 4)
            if len(fh.read(4)) < 4:  # its item length cut off
                raise Truncated(f"{name} sequence delimitation item cut short: truncated")
            return end
        carry = window[-(len(marker) - 1) :]
        chunk_at += len(chunk)


def _fragments_end(fh: BinaryIO, offset: int, total: int, order: Literal["little", "big"], name: str) -> int:
    """Where encapsulated pixel data ends: after its Sequence Delimitation Item, reached by item lengths."""
    while True:
        fh.seek(offset)
        item = fh.read(8)
        if len(item) < 8:
            raise Truncated(f"{name} ends before its sequence delimitation item: truncated")
        tag, length = _tag_of(item, order), int.from_bytes(item[4:8], order)
        if tag == _SEQUENCE_DELIMITER:
            return offset + 8
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            raise HeaderError(f"{name}: malformed fragment item at offset {offset}")
        if offset + 8 + length > total:
            raise Truncated(
                f"{name} fragment claims {length} bytes, only {max(total - offset - 8, 0)} follow: truncated"
            )
        offset += 8 + length


_UIDS = {
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
}


def _uid(ds: pydicom.Dataset, keyword: str) -> Any:
    """A UID as pydicom reads it, from the raw bytes when it is one plain value (raw_element_json.py)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    rendered = element_json(ds.get_item(tag), True, lambda _tag: "", 0) if tag in ds else None
    if rendered is not None and rendered["vr"] == "UI":
        value = _rendered_value(rendered, (str,))
        if value is not _UNKNOWN:
            return value
    return ds.get(keyword)


def _read(fh: BinaryIO, total: int, header_budget_bytes: int) -> InstanceHeader:
    try:
        # Values over _DEFER_BYTES stay in the file until used: a large top-level binary one (an
        # encapsulated document, a private blob) is referenced by its BulkDataURI and never read. Text,
        # sequences and values of undefined length are still read whole (producers/README.md).
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=_DEFER_BYTES)
        # A deferred value is read from this open file, not by opening its path again (pydicom's way for
        # a file opened by name): the landed file may be archived and removed meanwhile.
        ds.buffer = fh
        _check_lengths(ds, total)
        has_pixels = _pixel_data(fh, ds, total)
        # Values stay undecoded until used: one that cannot be decoded is left out of the
        # event's header (header_model.py), the object itself is stored as it came.
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        uids = {name: _uid(ds, keyword) for name, keyword in _UIDS.items()}
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises many kinds (struct.error, ...) on malformed input
        raise HeaderError(f"cannot parse data set: {type(exc).__name__}") from None
    missing = sorted(k for k, v in uids.items() if v is None or str(v) == "")
    if len(missing) == len(uids):
        raise HeaderError("no identifying attribute: not a DICOM composite object")
    if missing:
        raise InvalidIdentifiers(f"missing {', '.join(missing)}")
    uids = {k: str(v) for k, v in uids.items()}
    invalid = sorted(k for k, v in uids.items() if not is_valid_uid(v))
    if invalid or not is_valid_uid(transfer_syntax):
        raise InvalidIdentifiers(f"not a valid DICOM UID: {', '.join(invalid) or 'transfer_syntax_uid'}")
    # Leading zeros in a component (1.2.03.4) break PS3.5 9.1 but exist in the wild: counted, not refused.
    for name, value in uids.items():
        if not is_conformant_uid(value):
            metrics.NONCONFORMANT_UIDS.labels(name).inc()
            log.debug("uid.nonconformant", field=name, reason="leading zero in a component")
    try:
        # The model first: it renders most elements from their bytes, and the fields read them there.
        header = _header_model(ds, uids, has_pixels, header_budget_bytes)
        values = _Values(ds, header.elements)
        fields: dict[str, Any] = {
            "patient_id": _text(values, "PatientID"),
            "patient_name": _text(values, "PatientName"),
            "patient_birth_date": _iso_date(values, "PatientBirthDate"),
            "patient_sex": _text(values, "PatientSex"),
            "study_id": _text(values, "StudyID"),
            "accession_number": _text(values, "AccessionNumber"),
            "study_date": _iso_date(values, "StudyDate"),
            "study_time": _iso_time(values, "StudyTime"),
            "study_description": _text(values, "StudyDescription"),
            "referring_physician_name": _text(values, "ReferringPhysicianName"),
            "series_number": _int(values, "SeriesNumber"),
            "series_description": _text(values, "SeriesDescription"),
            "series_date": _iso_date(values, "SeriesDate"),
            "modality": _text(values, "Modality"),
            "body_part_examined": _text(values, "BodyPartExamined"),
            "protocol_name": _text(values, "ProtocolName"),
            "instance_number": _int(values, "InstanceNumber"),
            "station_name": _text(values, "StationName"),
            "manufacturer": _text(values, "Manufacturer"),
            "manufacturer_model_name": _text(values, "ManufacturerModelName"),
            "institution_name": _text(values, "InstitutionName"),
            "patient_size_m": _float(values, "PatientSize"),
            "patient_weight_kg": _float(values, "PatientWeight"),
            "number_of_frames": _int(values, "NumberOfFrames"),
            "images_in_acquisition": _int(values, "ImagesInAcquisition"),
            "number_of_temporal_positions": _int(values, "NumberOfTemporalPositions"),
        }
        fields["patient_age_years"] = patient_age_years(
            _text(values, "PatientAge"), fields["patient_birth_date"], fields["study_date"]
        )
        fields["header_json"] = header.json
        fields["header_omitted"] = [o.as_record() for o in header.omitted]
    except (ValueError, TypeError, AttributeError, OverflowError, KeyError) as exc:
        raise HeaderError(f"cannot read descriptive attributes: {type(exc).__name__}") from None
    return InstanceHeader(transfer_syntax_uid=transfer_syntax, fields=fields, **uids)
