"""Read the identifying and descriptive header of a Part-10 object, without its pixel data.

Everything that later becomes a path, a key or a log field is validated here first:
UIDs must be valid DICOM UIDs (PS3.5 9.1), so that ``../`` or a slash can never reach a
file name. Descriptive values are returned as data only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import date
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom

from diana.schemas.uid import is_valid_uid

__all__ = [
    "HeaderError",
    "InvalidIdentifiers",
    "InstanceHeader",
    "patient_age_years",
    "read_header",
    "read_header_file",
]


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


def _number(ds: pydicom.Dataset, keyword: str, kind: type[int] | type[float]) -> int | float | None:
    """The value as ``kind``, or None when absent or unusable (out of int32, NaN, infinite)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if kind is int:
        return number if -(2**31) <= number < 2**31 else None
    return number if number == number and abs(number) < 1e300 else None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    return _number(ds, keyword, int)


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    return _number(ds, keyword, float)


def _iso_date(ds: pydicom.Dataset, keyword: str) -> str | None:
    text = _text(ds, keyword)
    if not (text and len(text) == 8 and text.isdigit()):
        return None
    try:  # a real calendar date: 20240231 is absent, not an error later on
        return date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
    except ValueError:
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


def _header_json(ds: pydicom.Dataset, uids: dict[str, str], has_pixels: bool) -> str | None:
    """The DICOM JSON model of the header; large binary values point into the stored object.

    None when pydicom cannot express some element: the object is still stored as received.
    """
    base = (
        f"studies/{uids['study_instance_uid']}/series/{uids['series_instance_uid']}"
        f"/instances/{uids['sop_instance_uid']}/bulk"
    )

    def bulk_uri(elem: pydicom.DataElement) -> str:
        return f"{base}/{elem.tag:08X}"

    try:
        model = ds.to_json_dict(
            bulk_data_threshold=1024, bulk_data_element_handler=bulk_uri, suppress_invalid_tags=True
        )
        if has_pixels:
            compressed = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed
            model["7FE00010"] = {"vr": "OB" if compressed else "OW", "BulkDataURI": f"{base}/7FE00010"}
        return json.dumps(model, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except Exception:  # pydicom raises many kinds on odd values; the JSON view is optional
        return None


def _check_lengths(ds: pydicom.Dataset, total: int) -> None:
    """pydicom silently shortens an element whose length runs past the end: we call it truncated."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements, not tags
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        if length is None or tell is None or length == _UNDEFINED_LENGTH:
            continue
        if tell + length > total:
            raise HeaderError(f"element {tag} claims {length} bytes, only {max(total - tell, 0)} follow: truncated")


def read_header_file(path: Path) -> InstanceHeader:
    """Parse the header of a Part-10 file without reading its pixel data."""
    with open(path, "rb") as fh:
        return _read(fh, os.fstat(fh.fileno()).st_size)


def read_header(part10: bytes) -> InstanceHeader:
    """Parse the header of a Part-10 byte string; raise HeaderError or InvalidIdentifiers."""
    return _read(BytesIO(part10), len(part10))


def _has_pixel_data(fh: BinaryIO) -> bool:
    """stop_before_pixels leaves the file at the pixel data tag, if there is one."""
    position = fh.tell()
    tag = fh.read(4)
    fh.seek(position)
    return tag in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


def _read(fh: BinaryIO, total: int) -> InstanceHeader:
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        has_pixels = _has_pixel_data(fh)
        _check_lengths(ds, total)
        # Force the lazy conversion of every element now, so a malformed value fails here.
        ds.walk(lambda _ds, _elem: None)
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        uids = {
            "sop_instance_uid": ds.get("SOPInstanceUID"),
            "sop_class_uid": ds.get("SOPClassUID"),
            "study_instance_uid": ds.get("StudyInstanceUID"),
            "series_instance_uid": ds.get("SeriesInstanceUID"),
        }
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
            "patient_size_m": _float(ds, "PatientSize"),
            "patient_weight_kg": _float(ds, "PatientWeight"),
            "number_of_frames": _int(ds, "NumberOfFrames"),
            "images_in_acquisition": _int(ds, "ImagesInAcquisition"),
            "number_of_temporal_positions": _int(ds, "NumberOfTemporalPositions"),
        }
        fields["patient_age_years"] = patient_age_years(
            _text(ds, "PatientAge"), fields["patient_birth_date"], fields["study_date"]
        )
        fields["header_json"] = _header_json(ds, uids, has_pixels)
    except (ValueError, TypeError, AttributeError, OverflowError, KeyError) as exc:
        raise HeaderError(f"cannot read descriptive attributes: {type(exc).__name__}") from None
    return InstanceHeader(transfer_syntax_uid=transfer_syntax, fields=fields, **uids)
