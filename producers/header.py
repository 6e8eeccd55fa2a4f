"""Read the identifying and descriptive header of a Part-10 object, without its pixel data.

Everything that later becomes a path, a key or a log field is validated here first:
UIDs must be valid DICOM UIDs (PS3.5 9.1), so that ``../`` or a slash can never reach a
file name. Descriptive values are returned as data only.
"""
from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from diana.schemas.uid import is_valid_uid

__all__ = ["HeaderError", "InvalidIdentifiers", "InstanceHeader", "read_header"]

class HeaderError(ValueError):
    """The bytes cannot be parsed as a DICOM data set."""


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


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text or None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def _iso_date(ds: pydicom.Dataset, keyword: str) -> str | None:
    text = _text(ds, keyword)
    if text and len(text) == 8 and text.isdigit():
        year, month, day = int(text[:4]), int(text[4:6]), int(text[6:])
        if 1 <= month <= 12 and 1 <= day <= 31:
            return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return None


def _iso_time(ds: pydicom.Dataset, keyword: str) -> str | None:
    text = _text(ds, keyword)
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


def _check_lengths(ds: pydicom.Dataset, total: int) -> None:
    """pydicom silently shortens an element whose length runs past the end: we call it truncated."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        if length is None or tell is None or length == _UNDEFINED_LENGTH:
            continue
        if tell + length > total:
            raise HeaderError(f"element {tag} claims {length} bytes, only {max(total - tell, 0)} follow: truncated")


def read_header(part10: bytes) -> InstanceHeader:
    """Parse the header of a Part-10 byte string; raise HeaderError or InvalidIdentifiers."""
    try:
        ds = pydicom.dcmread(BytesIO(part10), stop_before_pixels=True)
        _check_lengths(ds, len(part10))
        # Force the lazy conversion of every element now, so a malformed value fails here.
        ds.walk(lambda _ds, _elem: None)
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        uids = {
            "sop_instance_uid": ds.get("SOPInstanceUID"),
            "sop_class_uid": ds.get("SOPClassUID"),
            "study_instance_uid": ds.get("StudyInstanceUID"),
            "series_instance_uid": ds.get("SeriesInstanceUID"),
        }
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError,
            OverflowError, IndexError, NotImplementedError) as exc:
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
    try:
        fields = {
            "patient_id": _text(ds, "PatientID"),
            "patient_name": _text(ds, "PatientName"),
            "patient_birth_date": _iso_date(ds, "PatientBirthDate"),
            "patient_sex": _text(ds, "PatientSex"),
            "study_id": _text(ds, "StudyID"),
            "accession_number": _text(ds, "AccessionNumber"),
            "study_date": _iso_date(ds, "StudyDate"),
            "study_time": _iso_time(ds, "StudyTime"),
            "study_description": _text(ds, "StudyDescription"),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription"),
            "series_date": _iso_date(ds, "SeriesDate"),
            "modality": _text(ds, "Modality"),
            "body_part_examined": _text(ds, "BodyPartExamined"),
            "protocol_name": _text(ds, "ProtocolName"),
            "instance_number": _int(ds, "InstanceNumber"),
            "station_name": _text(ds, "StationName"),
            "manufacturer": _text(ds, "Manufacturer"),
            "manufacturer_model_name": _text(ds, "ManufacturerModelName"),
            "institution_name": _text(ds, "InstitutionName"),
        }
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise HeaderError(f"cannot read descriptive attributes: {type(exc).__name__}") from None
    return InstanceHeader(transfer_syntax_uid=transfer_syntax, fields=fields, **uids)
