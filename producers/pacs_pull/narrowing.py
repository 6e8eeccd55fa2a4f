"""Narrowing a line's C-FIND when the PACS may have cut its answer at its limit of matches.

A PACS that caps its C-FIND answers (Orthanc's ``LimitFindResults``, dcm4chee's query limits) gives
its first N matches; the line is then asked again in parts that together cover exactly what it asked
for: its StudyDate range in halves, down to one day, then that day in StudyTime ranges, halved down to
``TIME_FLOOR_S``. A range open at one end keeps that end open in its last part (studies dated before
1900, or after today, are asked for as one part and not split further).
"""

from __future__ import annotations

from datetime import date, timedelta

__all__ = ["split_keys", "TIME_FLOOR_S", "describe"]

# A day is split by StudyTime into ranges no shorter than this (86,400 s halved 7 times: 675 s, at
# most 128 parts a day): a PACS that ignores a StudyTime range answers the same list for each part,
# and this bounds how many C-FINDs it gets before the line is failed.
TIME_FLOOR_S = 600
# The nominal ends of a range open at one end, used only to halve it.
_EARLIEST = date(1900, 1, 1)
_DAY_S = 86400


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _da(day: date) -> str:
    return day.strftime("%Y%m%d")


def _seconds(text: str) -> int:
    digits = text.split(".")[0]
    hours, minutes, seconds = int(digits[0:2] or 0), int(digits[2:4] or 0), int(digits[4:6] or 0)
    return hours * 3600 + minutes * 60 + seconds


def _tm(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _time_range(first: int, last: int) -> str:
    # The upper end with its fraction: a study at 11:59:59.5 is in 000000-115959.999999, not between parts.
    return f"{_tm(first)}-{_tm(last)}.999999"


def _split_dates(value: str, today: date) -> list[str] | None:
    """The parts of a StudyDate range; None when it is one day (split it by time) or cannot be split."""
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


def _split_times(value: str) -> list[str] | None:
    low, _, high = value.partition("-") if value else ("", "", "")
    first = _seconds(low) if low else 0
    last = _seconds(high) if high else _DAY_S - 1
    if last - first + 1 < 2 * TIME_FLOOR_S:
        return None
    middle = first + (last - first + 1) // 2
    return [_time_range(first, middle - 1), _time_range(middle, last)]


def split_keys(keys: dict[str, str], today: date | None = None) -> list[dict[str, str]] | None:
    """``keys`` as several queries covering together what it asks for; None when it cannot be narrowed
    further (no StudyDate, one study by its UID, or one day already split down to the floor)."""
    dates = keys.get("StudyDate", "")
    if not dates or keys.get("StudyInstanceUID"):
        return None
    parts = _split_dates(dates, today or date.today())
    if parts is not None:
        return [{**{k: v for k, v in keys.items() if k != "StudyTime"}, "StudyDate": p} for p in parts]
    low, _, high = dates.partition("-") if "-" in dates else (dates, "", dates)
    if not (low and low == high):
        return None  # an open range before 1900 or after today: not split further
    times = _split_times(keys.get("StudyTime", ""))
    if times is None:
        return None
    return [{**keys, "StudyDate": f"{low}-{low}", "StudyTime": t} for t in times]


def describe(keys: dict[str, str]) -> str:
    """The narrowing keys of a query, for a line's detail (dates and times name no patient)."""
    text = f"StudyDate {keys.get('StudyDate', '')}"
    if keys.get("StudyTime"):
        text += f", StudyTime {keys['StudyTime']}"
    return text
