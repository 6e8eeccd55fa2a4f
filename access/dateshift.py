"""Shift DA and DT values by whole days, check TM values, in every form PS3.5 6.2 allows.

DA: YYYYMMDD (and the ACR-NEMA YYYY.MM.DD that old devices still send, written back as
YYYYMMDD); DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX], shifted at its own precision (a year-only
value stays a year); TM: HH[MM[SS[.F{1,6}]]] (and HH:MM:SS), unchanged by a whole-day shift.
Each may be a range (A-B, -B, A-) in query-derived attributes. Anything else raises
MalformedTemporal, and the object carrying it is refused: a value we cannot read could hold
anything, so it is not passed through.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

__all__ = ["MalformedTemporal", "shift_value"]


class MalformedTemporal(ValueError):
    """A DA/DT/TM value that is not in a form the standard allows (the message never holds the value)."""


_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?$")


def _shift_da(text: str, days: int, vr: str) -> str:
    m = _DA.match(text)
    if not m:
        raise MalformedTemporal(f"not a {vr} (YYYYMMDD)")
    try:
        day = date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError as exc:
        raise MalformedTemporal(f"not a calendar date ({vr})") from exc
    return (day - timedelta(days=days)).strftime("%Y%m%d")


def _shift_dt(text: str, days: int) -> str:
    m = _DT.match(text)
    if not m:
        raise MalformedTemporal("not a DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    year, month, day_, clock, offset = m.groups()
    if day_ is not None and month is None:
        raise MalformedTemporal("not a DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    if clock:
        _check_clock(clock)
    if offset and not (0 <= int(offset[1:3]) <= 14 and int(offset[3:]) < 60):
        raise MalformedTemporal("not a DT: the UTC offset is out of range")
    try:
        start = date(int(year), int(month or 1), int(day_ or 1))
    except ValueError as exc:
        raise MalformedTemporal("not a calendar date (DT)") from exc
    moved = start - timedelta(days=days)
    head = moved.strftime("%Y%m%d")[: 4 + (2 if month else 0) + (2 if day_ else 0)]
    return head + (clock or "") + (offset or "")


def _check_clock(text: str) -> None:
    m = _TM.match(text)
    if not m:
        raise MalformedTemporal("not a TM (HHMMSS.FFFFFF)")
    hours, minutes, seconds = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:  # 60: a leap second is allowed
        raise MalformedTemporal("not a time of day (TM)")


def _one(text: str, vr: str, days: int) -> str:
    if vr == "DA":
        return _shift_da(text, days, vr)
    if vr == "DT":
        return _shift_dt(text, days)
    if vr == "TM":
        _check_clock(text)
        return text
    raise MalformedTemporal(f"{vr} is not a date or time")


_FORM = {"DA": "YYYYMMDD", "DT": "YYYYMMDDHHMMSS.FFFFFF&ZZXX", "TM": "HHMMSS.FFFFFF"}


def shift_value(value: str, vr: str, days: int) -> str:
    """One DA/DT/TM value (or a range A-B, -B, A-) moved ``days`` back; '' stays ''."""
    text = value.strip()
    if not text:
        return ""
    if "-" in text and not (vr == "DT" and _DT.match(text)):  # a DT's UTC offset is not a range
        if text.count("-") != 1 and vr != "DT":  # "2024-01-15": a date written with dashes
            raise MalformedTemporal(f"not a {vr} ({_FORM[vr]}) nor a range of them (A-B)")
        low, high = _split_range(text, vr)
        if not low and not high:
            raise MalformedTemporal(f"not a {vr} range")
        return (_one(low, vr, days) if low else "") + "-" + (_one(high, vr, days) if high else "")
    return _one(text, vr, days)


def _split_range(text: str, vr: str) -> tuple[str, str]:
    if vr != "DT":
        low, high = text.split("-")
        return low.strip(), high.strip()
    # a DT range: the dash that splits is one whose left side is a whole DT (or empty)
    for i, ch in enumerate(text):
        if ch == "-" and (i == 0 or _DT.match(text[:i])) and (i == len(text) - 1 or _DT.match(text[i + 1 :])):
            return text[:i], text[i + 1 :]
    raise MalformedTemporal("not a DT range")
