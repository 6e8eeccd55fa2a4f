"""The study and patient context of a dose record: who, when, where; same for reports and images."""

from __future__ import annotations

import math
from datetime import date

from pydicom import Dataset

__all__ = ["study_context", "decimal_age_years", "text_value", "without_none"]

_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def text_value(ds: Dataset, keyword: str) -> str | None:
    """The attribute as stripped text; None when absent or empty."""
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip()
    return text or None


def without_none(record: dict) -> dict:
    """A dose record keeps only the values found: absent stays absent, never null."""
    return {k: v for k, v in record.items() if v is not None}


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    # A size or weight is positive and finite: "NaN" and "inf" read as floats, and mean "not known".
    return value if math.isfinite(value) and value > 0 else None


def _date(text: str | None) -> date | None:
    if not (text and len(text) == 8 and text.isdigit()):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def decimal_age_years(birth: str | None, seen: str | None, age: str | None) -> float | None:
    """Age at the study in years to one decimal: from the dates (days / 365.25), else PatientAge.

    One decimal is what dose audits compare by (and what OpenREM stores); a birth date after the
    study date (anonymisers write 99990101) is ignored in favour of PatientAge.
    """
    born, studied = _date(birth), _date(seen)
    if born and studied and born <= studied:
        return round((studied - born).days / 365.25, 1)
    if age and len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_UNITS:
        return round(int(age[:3]) * _AGE_UNITS[age[3]], 1)
    return None


def study_context(ds: Dataset) -> dict:
    study_date = text_value(ds, "StudyDate")
    parsed = _date(study_date)
    return {
        "study_instance_uid": text_value(ds, "StudyInstanceUID"),
        "accession_number": text_value(ds, "AccessionNumber"),
        "study_date": parsed.isoformat() if parsed else None,
        "study_description": text_value(ds, "StudyDescription"),
        "modality": text_value(ds, "Modality"),
        "manufacturer": text_value(ds, "Manufacturer"),
        "manufacturer_model_name": text_value(ds, "ManufacturerModelName"),
        "station_name": text_value(ds, "StationName"),
        "institution_name": text_value(ds, "InstitutionName"),
        "patient_id": text_value(ds, "PatientID"),
        "patient_sex": text_value(ds, "PatientSex"),
        "patient_age_years": decimal_age_years(
            text_value(ds, "PatientBirthDate"), study_date, text_value(ds, "PatientAge")
        ),
        "patient_size_m": _float(ds, "PatientSize"),
        "patient_weight_kg": _float(ds, "PatientWeight"),
    }
