"""Narrowing a line's C-FIND when the PACS may have cut its answer at its limit of matches.

A PACS that caps its C-FIND answers (Orthanc's ``LimitFindResults``, dcm4chee's query limits) gives
its first N matches; the line is then asked again in parts that together cover exactly what it asked
for: its StudyDate range in halves, down to one day. A range open at one end keeps that end open in
its last part (studies dated before 1900, or after today, are asked for as one part and not split
further).

A day is not split by StudyTime: StudyTime is Type 2, and a study without one matches no StudyTime
range, so parts of a day would lose it without a word. Empty value matching (a key of two quotation
marks, ``""``, matching only an empty value; a zero-length key is universal matching, the whole day)
would ask for those, but a PACS without it answers nothing, which cannot be told from a day with no
such study. A day still at the limit ends the line find_failed instead (job.py).
"""

from __future__ import annotations

from datetime import date, timedelta

__all__ = ["split_keys", "describe", "one_day"]

# The nominal ends of a range open at one end, used only to halve it.
_EARLIEST = date(1900, 1, 1)


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _da(day: date) -> str:
    return day.strftime("%Y%m%d")


def _split_dates(value: str, today: date) -> list[str] | None:
    """The parts of a StudyDate range; None when it is one day or cannot be split."""
    low, _, high = value.partition("-") if "-" in value else (value, "", value)
    first = _day(low) if low else None
    last = _day(high) if high else None
    if first is None and last is not None:
        if last < _EARLIEST:
            return None
        # before 1900 as one part (open), the rest bounded
        return [f"-{_da(_EARLIEST - timedelta(days=1))}", f"{_da(_EARLIEST)}-{_da(last)}"]
    if last is None and first is not None:
        if first > today:
            return None
        return [f"{_da(first)}-{_da(today)}", f"{_da(today + timedelta(days=1))}-"]
    if first is None or last is None or first >= last:
        return None
    middle = first + (last - first) // 2
    return [f"{_da(first)}-{_da(middle)}", f"{_da(middle + timedelta(days=1))}-{_da(last)}"]


def one_day(keys: dict[str, str]) -> bool:
    """``keys`` asks for one day's studies (a StudyDate range of one day, or one date)."""
    dates = keys.get("StudyDate", "")
    low, _, high = dates.partition("-") if "-" in dates else (dates, "", dates)
    return bool(low) and low == high


def split_keys(keys: dict[str, str], today: date | None = None) -> list[dict[str, str]] | None:
    """``keys`` as several queries covering together what it asks for; None when it cannot be narrowed
    further (no StudyDate, one study by its UID, one day, or an open range beyond 1900 or today)."""
    dates = keys.get("StudyDate", "")
    if not dates or keys.get("StudyInstanceUID"):
        return None
    parts = _split_dates(dates, today or date.today())
    if parts is None:
        return None
    return [{**keys, "StudyDate": p} for p in parts]


def describe(keys: dict[str, str]) -> str:
    """The narrowing key of a query, for a line's detail (dates name no patient)."""
    return f"StudyDate {keys.get('StudyDate', '')}"
