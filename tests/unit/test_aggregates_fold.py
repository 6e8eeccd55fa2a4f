"""Unit: the pure fold of instances into series and study aggregates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from diana.stream_apps.aggregate_fold import apply_instance
from diana.stream_apps.completeness import QuietTimes

T0 = datetime(2024, 3, 15, 10, 0, tzinfo=UTC)
QUIET = QuietTimes.parse("*=30")


def _event(series: str, number: int, seconds: int, modality: str = "CT", size: int = 100) -> dict:
    return {
        "study_instance_uid": "1.9",
        "series_instance_uid": series,
        "sop_instance_uid": f"{series}.{number}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "instance_number": number,
        "modality": modality,
        "size_bytes": size,
        "received_at": T0 + timedelta(seconds=seconds),
        "patient_id": "P1",
    }


def test_fold_counts_bytes_numbers_and_event_times():
    series, study = {}, None
    # out of order arrival: event time bounds are min/max, not first/last seen
    for series_uid, number, at, modality in [("1.9.1", 2, 5, "CT"), ("1.9.1", 1, 3, "CT"), ("1.9.2", 1, 9, "SR")]:
        s, study = apply_instance(series.get(series_uid), study, _event(series_uid, number, at, modality), QUIET)
        series[series_uid] = s
    one = series["1.9.1"]
    assert (one["instance_count"], one["total_bytes"], one["revision"]) == (2, 200, 2)
    assert (one["min_instance_number"], one["max_instance_number"]) == (1, 2)
    assert one["first_received_at"] == int((T0 + timedelta(seconds=3)).timestamp() * 1000)
    assert one["last_received_at"] == int((T0 + timedelta(seconds=5)).timestamp() * 1000)
    assert (study["instance_count"], study["series_count"], study["modalities"]) == (3, 2, ["CT", "SR"])
    assert study["revision"] == 3


def test_fold_does_not_mutate_its_inputs():
    s1, st1 = apply_instance(None, None, _event("1.9.1", 1, 0), QUIET)
    s2, st2 = apply_instance(s1, st1, _event("1.9.1", 2, 1), QUIET)
    assert s1["instance_count"] == 1 and st1["instance_count"] == 1
    assert s2["instance_count"] == 2 and st2["instance_count"] == 2


def test_a_replaced_instance_swaps_its_size_and_takes_the_corrected_attributes():
    from diana.stream_apps.aggregate_fold import complete_series, replace_instance

    first = _event("1.9.1", 1, 0, size=100) | {"patient_name": "Doe^Jane"}
    series, study = apply_instance(None, None, first, QUIET)
    series, study, _ = complete_series(series, study)
    corrected = first | {"size_bytes": 120, "patient_name": "Doe^Janet"}
    new_series, new_study = replace_instance(series, study, 100, corrected)
    assert (new_series["instance_count"], new_series["total_bytes"]) == (1, 120)
    assert (new_study["instance_count"], new_study["total_bytes"], new_study["patient_name"]) == (1, 120, "Doe^Janet")
    assert new_series["revision"] == series["revision"] + 1 and new_study["revision"] == study["revision"] + 1
    assert (new_series["status"], new_series["version"]) == ("AMENDED", 2)  # completed before: an amendment
    assert study["patient_name"] == "Doe^Jane"  # inputs untouched


def test_the_study_carries_its_referring_physician_name_and_a_correction_replaces_it():
    from diana.stream_apps.aggregate_fold import complete_series, replace_instance, study_record

    first = _event("1.9.1", 1, 0) | {"referring_physician_name": "Smith^Anna"}
    series, study = apply_instance(None, None, first, QUIET)
    series, study = apply_instance(series, study, _event("1.9.1", 2, 1), QUIET)  # an event without it (before v5)
    assert study["referring_physician_name"] == "Smith^Anna"  # the study's, from its first instance
    assert study_record(study)["referring_physician_name"] == "Smith^Anna"
    series, study, _ = complete_series(series, study)
    _, corrected = replace_instance(series, study, 100, first | {"referring_physician_name": "Smith^Ann"})
    assert corrected["referring_physician_name"] == "Smith^Ann"  # REPLACE: as for the patient's name
