"""The pure fold of series and study aggregates: JSON-able dicts in, new dicts out, times in ms.

No broker, no state store: the aggregates worker (aggregates.py) reads the state, calls these and
writes what they return; the unit tests call them directly. Each returns new dicts, never changing
its arguments, so a state held by a transaction (Batch.publish_latest) stays as it was.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from diana.stream_apps.completeness import QuietTimes, expected_instances, verdict
from diana.stream_apps.instance_numbers import InstanceNumbers

__all__ = [
    "from_ms",
    "to_ms",
    "apply_instance",
    "compact_series",
    "complete_series",
    "event_time_ms",
    "is_late",
    "number_runs",
    "numbers_of_runs",
    "replace_instance",
    "series_record",
    "study_record",
]


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def _union(values: list[str], value: str | None) -> list[str]:
    return values if value is None or value in values else sorted([*values, value])


def _new_series(event: dict, at: int, quiet_s: float) -> dict:
    return {
        "series_instance_uid": event["series_instance_uid"],
        "study_instance_uid": event["study_instance_uid"],
        "revision": 0,
        "patient_id": event.get("patient_id"),
        "modality": event.get("modality"),
        "series_number": event.get("series_number"),
        "series_description": event.get("series_description"),
        "body_part_examined": event.get("body_part_examined"),
        "station_name": event.get("station_name"),
        "manufacturer": event.get("manufacturer"),
        "instance_count": 0,
        "total_bytes": 0,
        "min_instance_number": None,
        "max_instance_number": None,
        "sop_class_uids": [],
        "transfer_syntax_uids": [],
        "first_received_at": at,
        "last_received_at": at,
        "status": "UPDATED",
        "version": 0,
        "verdict": None,
        "missing_instance_numbers": [],
        "expected_instances": None,
        "quiet_seconds": quiet_s,
        "completed_at": None,
        "number_of_frames": 0,
        "instance_numbers": [],
    }


def _new_study(event: dict, at: int) -> dict:
    return {
        "study_instance_uid": event["study_instance_uid"],
        "revision": 0,
        "patient_id": event.get("patient_id"),
        "patient_name": event.get("patient_name"),
        "patient_birth_date": event.get("patient_birth_date"),
        "patient_sex": event.get("patient_sex"),
        "accession_number": event.get("accession_number"),
        "study_date": event.get("study_date"),
        "study_description": event.get("study_description"),
        "referring_physician_name": event.get("referring_physician_name"),
        "modalities": [],
        "series_instance_uids": [],
        "series_count": 0,
        "instance_count": 0,
        "total_bytes": 0,
        "first_received_at": at,
        "last_received_at": at,
        "status": "UPDATED",
        "version": 0,
        "verdict": None,
        "completed_series_count": 0,
        "completed_at": None,
        "series_verdicts": {},
    }


def _judge(series: dict) -> None:
    series["verdict"], series["missing_instance_numbers"] = verdict(
        series["instance_numbers"], series["instance_count"], series["expected_instances"]
    )


def _event_ms(received_at: datetime | int) -> int:
    """``received_at`` in ms: the worker's decoder gives ms already (FieldDecoder), the codec a datetime."""
    return received_at if isinstance(received_at, int) else to_ms(received_at)


def event_time_ms(received_at: datetime | int, broker_timestamp: tuple[int, int]) -> int:
    """An event's time: the receiver's ``received_at``, but never later than the broker's timestamp.

    dicom.instances is a LogAppendTime topic (schemas/topics.py): the broker stamps each event as
    it appends it, so a receiver whose clock runs fast cannot push a partition's watermark into the
    future and complete its open series early. The stamp is stored in the log, so a replay sees
    the same times. (On a topic left at CreateTime the stamp is the producer's clock, and this
    bound is only as good as that clock.)
    """
    at = _event_ms(received_at)
    _, stamp = broker_timestamp
    return min(at, stamp) if stamp > 0 else at


def apply_instance(
    series: dict | None, study: dict | None, event: dict, quiet: QuietTimes, at: int | None = None
) -> tuple[dict, dict]:
    """Fold one new instance into its series and study (pure; JSON-able dicts, times in ms).

    ``at``: the event's time in ms (event_time_ms); None: its ``received_at``.

    An instance of a series already completed is counted at once, but the series' new version
    (AMENDED) is made only when it is quiet again (complete_series): a burst of late instances
    gives one amended version per quiet period, not one per instance.
    """
    if at is None:
        at = _event_ms(event["received_at"])
    series = dict(series) if series else _new_series(event, at, quiet.for_modality(event.get("modality")))
    if series.get("instance_number_runs"):  # compacted at completion (compact_series): open again
        series["instance_numbers"] = numbers_of_runs(series.pop("instance_number_runs"))
    study = dict(study) if study else _new_study(event, at)
    number = event.get("instance_number")
    series["revision"] += 1
    series["instance_count"] += 1
    series["total_bytes"] += event["size_bytes"]
    series["number_of_frames"] += event.get("number_of_frames") or 1
    if number is not None:
        # Not a new list per instance (its copy grew with the series): chunks the old value shares.
        numbers = InstanceNumbers.of(series["instance_numbers"]).with_number(number)
        series["instance_numbers"] = numbers
        series["min_instance_number"], series["max_instance_number"] = numbers.first, numbers.last
    promised = expected_instances(event.get("images_in_acquisition"), event.get("number_of_temporal_positions"))
    if promised is not None:
        series["expected_instances"] = max(series["expected_instances"] or 0, promised)
    series["sop_class_uids"] = _union(series["sop_class_uids"], event["sop_class_uid"])
    series["transfer_syntax_uids"] = _union(series["transfer_syntax_uids"], event["transfer_syntax_uid"])
    series["first_received_at"] = min(series["first_received_at"], at)
    series["last_received_at"] = max(series["last_received_at"], at)

    study["revision"] += 1
    study["instance_count"] += 1
    study["total_bytes"] += event["size_bytes"]
    study["modalities"] = _union(study["modalities"], event.get("modality"))
    study["series_instance_uids"] = _union(study["series_instance_uids"], event["series_instance_uid"])
    study["series_count"] = len(study["series_instance_uids"])
    study["first_received_at"] = min(study["first_received_at"], at)
    study["last_received_at"] = max(study["last_received_at"], at)
    if study["status"] != "UPDATED":
        # Its new version comes with the completion of the series that changed (complete_series).
        study["status"] = "AMENDED"
        _judge_study(study)
    return series, study


def number_runs(numbers: list[int]) -> list[list[int]]:
    """Sorted distinct instance numbers as runs ``[first, last]``: 1..3000 is one pair, not 3000 ints."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return runs


def numbers_of_runs(runs: list[list[int]]) -> list[int]:
    return [n for first, last in runs for n in range(first, last + 1)]


def compact_series(series: dict) -> dict:
    """A completed series' instance numbers kept as runs (a late instance expands them again)."""
    if not series["instance_numbers"]:
        return series
    return {**series, "instance_numbers": [], "instance_number_runs": number_runs(series["instance_numbers"])}


def is_late(series: dict | None) -> bool:
    """The series was completed before: an instance for it waits for the series' next quiet time."""
    return series is not None and series["completed_at"] is not None


# What a corrected re-send changes in the aggregates (under REPLACE): its patient and study
# attributes, and the series' descriptive ones. Counts stay; the size is swapped.
_REPLACED_STUDY_FIELDS = (
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_date",
    "study_description",
    "referring_physician_name",
)
_REPLACED_SERIES_FIELDS = ("patient_id", "series_number", "series_description", "body_part_examined", "station_name")


def replace_instance(series: dict, study: dict, old_size: int, event: dict) -> tuple[dict, dict]:
    """The archive now holds ``event``'s bytes for an instance already counted (pure)."""
    series, study = dict(series), dict(study)
    for aggregate in (series, study):
        aggregate["total_bytes"] += event["size_bytes"] - old_size
        aggregate["revision"] += 1
        if aggregate["status"] != "UPDATED":
            aggregate["status"] = "AMENDED"
            aggregate["version"] += 1
    for key in _REPLACED_SERIES_FIELDS:
        series[key] = event.get(key)
    for key in _REPLACED_STUDY_FIELDS:
        study[key] = event.get(key)
    return series, study


def _judge_study(study: dict) -> None:
    verdicts = [study["series_verdicts"].get(uid) for uid in study["series_instance_uids"]]
    study["completed_series_count"] = sum(v is not None for v in verdicts)
    if None in verdicts:
        study["verdict"] = None
    elif all(v == "COMPLETE" for v in verdicts):
        study["verdict"] = "COMPLETE"
    else:
        study["verdict"] = "GAPS" if "GAPS" in verdicts else "UNKNOWN"


def complete_series(series: dict, study: dict) -> tuple[dict, dict, bool]:
    """Mark a quiet series completed, or amended if it was completed before and got late instances.

    Returns (series, study, study_just_completed).
    """
    series, study = dict(series), dict(study)
    if series["completed_at"] is None:
        series["status"], series["version"] = "COMPLETED", 1
        # Completion time is the deadline itself: the same in a live run and in any replay.
        series["completed_at"] = series["last_received_at"] + int(series["quiet_seconds"] * 1000)
    else:  # late instances, now quiet again: one new version for all of them
        series["status"], series["version"] = "AMENDED", series["version"] + 1
    series["revision"] += 1
    _judge(series)
    study["series_verdicts"] = {**study["series_verdicts"], series["series_instance_uid"]: series["verdict"]}
    study["revision"] += 1
    _judge_study(study)
    just_completed = False
    if study["completed_series_count"] == study["series_count"]:
        if study["status"] == "UPDATED":
            study["status"], study["version"], just_completed = "COMPLETED", 1, True
            study["completed_at"] = series["completed_at"]
        else:
            study["status"], study["version"] = "AMENDED", study["version"] + 1
    return series, study, just_completed


def _record(state: dict, internal: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in state.items() if k not in internal}
    for key in ("first_received_at", "last_received_at", "completed_at"):
        out[key] = from_ms(state.get(key))
    return out


def series_record(state: dict) -> dict[str, Any]:
    return _record(state, ("instance_numbers", "instance_number_runs"))


def study_record(state: dict) -> dict[str, Any]:
    return _record(state, ("series_verdicts",))
