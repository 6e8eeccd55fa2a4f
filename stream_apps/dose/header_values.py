"""Reading numbers and codes from image attributes: one place for the guards every header reader needs."""

from __future__ import annotations

from pydicom import Dataset

__all__ = ["number", "first", "code_meaning", "datetime_of", "phantom_cm"]


def number(ds: Dataset, keyword: str, factor: float = 1.0) -> float | None:
    """The attribute's (first) value times ``factor``; None when absent, empty, not a number or not finite."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        raw = value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
        result = float(raw) * factor
    except (TypeError, ValueError, IndexError):
        return None
    return result if result == result and abs(result) != float("inf") else None


def first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def code_meaning(ds: Dataset, keyword: str) -> str | None:
    """The CodeMeaning of the first item of a code sequence (display text only)."""
    seq = ds.get(keyword)
    if not seq:
        return None
    meaning = seq[0].get("CodeMeaning")
    return str(meaning).strip() or None if meaning is not None else None


def datetime_of(ds: Dataset, datetime_keyword: str, date: str | None, time_keyword: str) -> str | None:
    """A DT value: the DateTime attribute, else the given date (YYYYMMDD) joined with the time attribute."""
    value = ds.get(datetime_keyword)
    if value:
        return str(value).strip() or None
    time = ds.get(time_keyword)
    if date and time:
        return f"{date}{str(time).strip()}"
    return None


def phantom_cm(ds: Dataset) -> int | None:
    """16 or 32 from CTDI Phantom Type Code Sequence (0018,9346): (113690, DCM) head, (113691, DCM) body."""
    seq = ds.get("CTDIPhantomTypeCodeSequence")
    code = (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", ""))) if seq else None
    return {("113690", "DCM"): 16, ("113691", "DCM"): 32}.get(code) if code else None
