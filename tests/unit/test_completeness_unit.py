"""Unit: completion verdicts, quiet times and the series/study lifecycle, in event time."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from diana.stream_apps.aggregate_fold import apply_instance, complete_series, event_time_ms, is_late
from diana.stream_apps.completeness import MAX_LISTED_GAPS, QuietTimes, expected_instances, verdict

T0 = datetime(2024, 3, 15, 10, 0, tzinfo=UTC)
QUIET = QuietTimes.parse("CT=30,MR=60,CR=10,DX=10,*=20")


def _event(series: str, number: int | None, seconds: float, modality: str = "CT", **extra) -> dict:
    return {
        "study_instance_uid": "1.9",
        "series_instance_uid": series,
        "sop_instance_uid": f"{series}.{number}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "instance_number": number,
        "modality": modality,
        "size_bytes": 100,
        "received_at": T0 + timedelta(seconds=seconds),
        "patient_id": "P1",
        **extra,
    }


@pytest.mark.parametrize(
    "numbers,count,expected,result",
    [
        ([1, 2, 3], 3, None, ("COMPLETE", [])),
        ([0, 1, 2], 3, None, ("COMPLETE", [])),
        ([1, 2, 4, 7], 4, None, ("GAPS", [3, 5, 6])),
        ([1, 2, 3], 3, 5, ("GAPS", [4, 5])),  # ImagesInAcquisition promised five
        ([101, 102], 2, None, ("UNKNOWN", [])),  # numbering that starts late proves nothing
        ([], 4, None, ("UNKNOWN", [])),
        ([], 4, 4, ("COMPLETE", [])),
        ([], 3, 4, ("GAPS", [])),
    ],
)
def test_verdict(numbers, count, expected, result):
    assert verdict(numbers, count, expected) == result


def test_quiet_times_per_modality_with_a_default():
    assert (QUIET.for_modality("CT"), QUIET.for_modality("mr"), QUIET.for_modality("US"), QUIET.for_modality(None)) == (
        30,
        60,
        20,
        20,
    )
    for bad in ("CT=30", "CT=abc,*=1", "=3,*=1", "CT=-1,*=1"):
        with pytest.raises(ValueError, match="quiet time|default"):
            QuietTimes.parse(bad)


def test_expected_count_takes_the_largest_promise():
    assert expected_instances(None, None) is None
    assert expected_instances(40, None) == 40 and expected_instances(10, 25) == 25


def test_lifecycle_updated_completed_amended():
    series, study = None, None
    for n, at in ((1, 0), (2, 1), (4, 2)):
        series, study = apply_instance(series, study, _event("1.9.1", n, at), QUIET)
    assert (series["status"], series["version"], series["revision"]) == ("UPDATED", 0, 3)
    series, study, study_done = complete_series(series, study)
    assert (series["status"], series["version"], series["verdict"], series["missing_instance_numbers"]) == (
        "COMPLETED",
        1,
        "GAPS",
        [3],
    )
    assert series["completed_at"] == int((T0 + timedelta(seconds=32)).timestamp() * 1000)  # last + 30 s (CT)
    assert study_done and (study["status"], study["verdict"], study["completed_series_count"]) == (
        "COMPLETED",
        "GAPS",
        1,
    )
    # The missing instance arrives late: counted at once, a new version once quiet again.
    series, study = apply_instance(series, study, _event("1.9.1", 3, 90), QUIET)
    assert (series["status"], series["version"], series["instance_count"]) == ("COMPLETED", 1, 4)
    series, study, study_done = complete_series(series, study)
    assert (series["status"], series["version"], series["verdict"], series["instance_count"]) == (
        "AMENDED",
        2,
        "COMPLETE",
        4,
    )
    assert series["completed_at"] == int((T0 + timedelta(seconds=32)).timestamp() * 1000)  # first completion kept
    assert not study_done and (study["status"], study["version"], study["verdict"]) == ("AMENDED", 2, "COMPLETE")


def test_a_burst_of_late_instances_gives_one_amended_version():
    series, study = None, None
    for n, at in ((1, 0), (2, 1), (4, 2)):
        series, study = apply_instance(series, study, _event("1.9.1", n, at), QUIET)
    series, study, _ = complete_series(series, study)
    for n in [3, *range(5, 204)]:  # 200 late instances
        assert is_late(series)
        series, study = apply_instance(series, study, _event("1.9.1", n, 100 + n / 100), QUIET)
    assert (series["status"], series["version"], series["instance_count"]) == ("COMPLETED", 1, 203)
    series, study, _ = complete_series(series, study)
    assert (series["status"], series["version"], series["verdict"]) == ("AMENDED", 2, "COMPLETE")
    assert (study["status"], study["version"], study["instance_count"]) == ("AMENDED", 2, 203)


def test_instance_numbers_stay_sorted_and_unique_when_inserted():
    series, study = None, None
    for i, n in enumerate((5, 1, 3, 3, 2, 4)):
        series, study = apply_instance(series, study, _event("1.9.1", n, i), QUIET)
    assert series["instance_numbers"] == [1, 2, 3, 4, 5]
    assert (series["min_instance_number"], series["max_instance_number"]) == (1, 5)


def test_verdict_of_a_huge_instance_number_is_bounded():
    started = time.monotonic()
    state, missing = verdict([1, 2, 2**31 - 1], 3, None)
    assert time.monotonic() - started < 0.5
    assert state == "GAPS" and missing[:2] == [3, 4] and len(missing) == MAX_LISTED_GAPS
    assert verdict([1, 2, 4, 7], 4, 9) == ("GAPS", [3, 5, 6, 8, 9])


def test_event_time_is_never_later_than_the_broker_stamp():
    fast = T0 + timedelta(minutes=10)
    stamp = int(T0.timestamp() * 1000)
    assert event_time_ms(fast, (2, stamp)) == stamp  # a receiver 10 minutes fast: the broker's time
    slow = T0 - timedelta(seconds=3)
    assert event_time_ms(slow, (2, stamp)) == stamp - 3000  # earlier than the stamp: its own time
    assert event_time_ms(fast, (0, -1)) == stamp + 600_000  # no stamp: nothing to bound it with


def test_study_completes_when_its_last_series_does():
    s1, study = apply_instance(None, None, _event("1.9.1", 1, 0), QUIET)
    s2, study = apply_instance(None, study, _event("1.9.2", 1, 1, modality="SR"), QUIET)
    s1, study, done = complete_series(s1, study)
    assert not done and study["status"] == "UPDATED" and study["completed_series_count"] == 1
    s2, study, done = complete_series(s2, study)
    assert done and study["status"] == "COMPLETED" and study["verdict"] == "COMPLETE"
    assert s2["quiet_seconds"] == 20  # SR uses the default


def test_multiframe_counts_frames_and_temporal_positions_set_expectations():
    s, st = apply_instance(
        None, None, _event("1.9.3", 1, 0, modality="MR", number_of_frames=30, number_of_temporal_positions=3), QUIET
    )
    assert s["number_of_frames"] == 30 and s["expected_instances"] == 3
