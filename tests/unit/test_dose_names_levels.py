"""Standard protocol names and reference levels: mapping, per-event and per-study flags, the survey."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.stream_apps.dose.alerts import RulesError, drl_alerts, load_rules, repeat_alerts
from diana.stream_apps.dose.reference_levels import Level, LevelsError, ReferenceLevels, load_reference_levels, survey
from diana.stream_apps.dose.standard_names import NamesError, load_standard_names
from tests.support.paths import REPO

NAMES = """
standard_names:
  - name: CT Head
    body_region: Head
    kind: CT
    protocols: ["Head  ROUTINE"]
    study_descriptions: ["CT HEAD"]
  - name: CT Abdomen-Pelvis
    body_region: Abdomen-Pelvis
    kind: CT
    match: {protocol: "(?i)abd.*pel"}
    stations: [CT1]
"""
LEVELS = """
window_days: 180
minimum_studies: 3
reference_levels:
  CT Head:
    study: {metric: total_dlp_mGycm, national: 970, local: 850}
    event: {metric: ctdivol_mGy, national: 60}
  CT Abdomen-Pelvis:
    study: {metric: total_dlp_mGycm, national: 745}
"""


@pytest.fixture()
def names(tmp_path: Path):
    (tmp_path / "n.yaml").write_text(NAMES)
    return load_standard_names(tmp_path / "n.yaml")


@pytest.fixture()
def levels(tmp_path: Path):
    (tmp_path / "l.yaml").write_text(LEVELS)
    return load_reference_levels(tmp_path / "l.yaml")


def test_events_and_study_take_standard_names(names):
    study = {"kind": "CT", "station_name": "CT1", "study_description": "something else"}
    events = [
        {"kind": "CT", "protocol": "head routine"},  # exact text, case and spacing ignored
        {"kind": "CT", "protocol": "ABD-PEL portal venous"},  # the regular expression
        {"kind": "CT", "protocol": "Head Routine"},
        {"kind": "DX", "protocol": "Head Routine"},  # kind CT only
        {"kind": "CT", "protocol": "Cardiac"},
    ]
    names.apply(study, events)
    assert [e.get("standard_name") for e in events] == ["CT Head", "CT Abdomen-Pelvis", "CT Head", None, None]
    assert events[1]["body_region"] == "Abdomen-Pelvis"
    # No entry names the study description: the name most events took.
    assert study["standard_name"] == "CT Head" and study["body_region"] == "Head"


def test_study_description_names_the_study_and_stations_restrict(names):
    study = {"kind": "CT", "station_name": "CT2", "study_description": "ct head"}
    events = [{"kind": "CT", "protocol": "abdomen pelvis"}]  # station CT2: not the Abdomen-Pelvis entry's
    names.apply(study, events)
    assert "standard_name" not in events[0] and study["standard_name"] == "CT Head"


def test_local_level_applies_before_national_and_flags(levels):
    study = {"standard_name": "CT Head", "total_dlp_mGycm": 900.0, "study_instance_uid": "1.2"}
    events = [{"standard_name": "CT Head", "ctdivol_mGy": 61.0}, {"standard_name": "CT Head", "ctdivol_mGy": 40.0}]
    levels.apply(study, events)
    assert (study["drl_level"], study["drl_source"], study["over_drl"]) == (850.0, "local", True)
    assert [e["over_drl"] for e in events] == [True, False] and events[0]["drl_source"] == "national"
    alerts = drl_alerts(study)
    assert len(alerts) == 1 and alerts[0]["rule_type"] == "drl" and alerts[0]["threshold"] == 850.0
    assert "local reference level 850" in alerts[0]["message"]
    under = {"standard_name": "CT Abdomen-Pelvis", "total_dlp_mGycm": 700.0, "study_instance_uid": "1.3"}
    levels.apply(under, [])
    assert under["over_drl"] is False and drl_alerts(under) == []


def test_survey_median_per_standard_name(levels):
    studies = [{"standard_name": "CT Head", "total_dlp_mGycm": v} for v in (700.0, 900.0, 1000.0, 800.0)]
    studies += [{"standard_name": "CT Abdomen-Pelvis", "total_dlp_mGycm": 800.0}]
    rows = {r["standard_name"]: r for r in survey(levels, studies)}
    head = rows["CT Head"]
    # median of 700, 800, 900, 1000 = 850; the local level 850 is not exceeded
    assert head["median"] == 850.0 and head["median_over_level"] is False and head["over_level_studies"] == 2
    assert head["studies"] == 4 and not head["too_few"]
    abdomen = rows["CT Abdomen-Pelvis"]
    assert abdomen["median_over_level"] is True and abdomen["too_few"] and abdomen["applied"] == "national"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("standard_names: [{name: X}]", "names nothing"),
        ("standard_names: [{name: X, kind: CR, protocols: [a]}]", "kind must be one of"),
        ("standard_names: [{name: X, match: {colour: a}}]", "cannot match on 'colour'"),
        ("standard_names: [{name: X, protocols: 3}]", "list of texts"),
        ("names: []", "unknown section .names.; sections: standard_names"),
    ],
)
def test_bad_names_file_says_what_to_fix(tmp_path: Path, text: str, message: str):
    (tmp_path / "n.yaml").write_text(text)
    with pytest.raises(NamesError, match=message):
        load_standard_names(tmp_path / "n.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reference_levels: {A: {study: {metric: dlp, national: 1}}}", "study.metric must be one of"),
        ("reference_levels: {A: {study: {metric: total_dlp_mGycm}}}", "national or a local"),
        ("reference_levels: {A: {event: {metric: ctdivol_mGy, local: -2}}}", "positive number"),
        ("reference_levels: {A: {}}", "study and/or an event"),
        ("window_days: 0", "positive whole number"),
        ("levels: {}", "unknown key 'levels'"),
    ],
)
def test_bad_levels_file_says_what_to_fix(tmp_path: Path, text: str, message: str):
    (tmp_path / "l.yaml").write_text(text)
    with pytest.raises(LevelsError, match=message):
        load_reference_levels(tmp_path / "l.yaml")


def test_example_files_load():
    assert load_standard_names(REPO / "dose-standard-names.example.yaml").entries
    assert load_reference_levels(REPO / "dose-reference-levels.example.yaml").study


def test_repeat_rule_counts_one_standard_name_per_patient_in_the_window(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(
        "repeats: [{name: Repeat CT head, window_days: 7, count: 2, standard_name: CT Head}]"
    )
    rules = load_rules(tmp_path / "r.yaml")
    studies = [
        {"study_instance_uid": "1", "study_date": "2024-03-01", "standard_name": "CT Head"},
        {"study_instance_uid": "2", "study_date": "2024-03-05", "standard_name": "CT Head"},
        {"study_instance_uid": "3", "study_date": "2024-03-06", "standard_name": "CT Abdomen-Pelvis"},
    ]
    [alert] = repeat_alerts(rules, studies, studies[1])
    assert alert["rule_type"] == "repeat" and alert["value"] == 2.0 and alert["window_study_uids"] == ["1", "2"]
    later = {"study_instance_uid": "4", "study_date": "2024-03-20", "standard_name": "CT Head"}
    assert repeat_alerts(rules, [*studies, later], later) == []  # 2024-03-01 and -05 are out of 7 days
    assert repeat_alerts(rules, studies, studies[2]) == []  # another standard name
    (tmp_path / "bad.yaml").write_text("repeats: [{name: R, window_days: 7, count: 1}]")
    with pytest.raises(RulesError, match="at least 2"):
        load_rules(tmp_path / "bad.yaml")


def test_a_yaml_file_that_is_not_a_mapping_names_the_sections(tmp_path: Path):
    (tmp_path / "list.yaml").write_text("- one\n- two\n")
    with pytest.raises(NamesError, match="mapping of sections at the top level \\(standard_names\\)"):
        load_standard_names(tmp_path / "list.yaml")
    with pytest.raises(LevelsError, match="mapping of keys"):
        load_reference_levels(tmp_path / "list.yaml")


def test_a_study_that_arrives_after_a_later_dated_one_counts_in_its_window():
    """Study B (day 30) then study A (day 0), 12-week CT DLP rule over 3000 mGy·cm: the alert came only
    when they arrived in date order; the window ending at B was never looked at again when A came."""
    from diana.stream_apps.dose.alerts import cumulative_alerts

    rules = load_rules(REPO / "dose-rules.example.yaml")
    a = {"study_instance_uid": "A", "study_date": "2024-01-01", "total_dlp_mGycm": 2000.0}
    b = {"study_instance_uid": "B", "study_date": "2024-01-31", "total_dlp_mGycm": 1500.0}
    far = {"study_instance_uid": "C", "study_date": "2024-06-30", "total_dlp_mGycm": 1500.0}
    assert cumulative_alerts(rules, [b], b) == []
    [alert] = cumulative_alerts(rules, [b, a], a)
    assert alert["value"] == 3500.0 and alert["window_study_uids"] == ["A", "B"]
    # On the window's last study: the same alert whichever arrived last, or came again (one id, one e-mail).
    [in_order] = cumulative_alerts(rules, [a, b], b)
    assert alert["study_instance_uid"] == "B" and alert["alert_id"] == in_order["alert_id"]
    assert cumulative_alerts(rules, [far, a], a) == []  # 181 days later: outside A's 84-day reach


def test_a_repeat_found_when_the_earlier_study_arrives_second(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(
        "repeats: [{name: Repeat CT head, window_days: 7, count: 2, standard_name: CT Head}]"
    )
    rules = load_rules(tmp_path / "r.yaml")
    second = {"study_instance_uid": "2", "study_date": "2024-03-05", "standard_name": "CT Head"}
    first = {"study_instance_uid": "1", "study_date": "2024-03-01", "standard_name": "CT Head"}
    assert repeat_alerts(rules, [second], second) == []
    [alert] = repeat_alerts(rules, [second, first], first)
    assert alert["study_instance_uid"] == "2" and alert["window_study_uids"] == ["1", "2"]
    assert repeat_alerts(rules, [first, second], second)[0]["alert_id"] == alert["alert_id"]


def test_a_study_without_the_metric_does_not_re_raise_a_window_with_less():
    """An X-ray study arriving for a DLP rule: the window ending at its date is part of one already
    judged, and re-raised the same alert id with a smaller value and fewer studies."""
    from diana.stream_apps.dose.alerts import cumulative_alerts

    rules = load_rules(REPO / "dose-rules.example.yaml")
    a = {"study_instance_uid": "A", "study_date": "2024-01-01", "total_dlp_mGycm": 2000.0}
    a2 = {"study_instance_uid": "A2", "study_date": "2024-01-10", "total_dlp_mGycm": 2000.0}
    b = {"study_instance_uid": "B", "study_date": "2024-02-20", "total_dlp_mGycm": 2000.0}
    xray = {"study_instance_uid": "C", "study_date": "2024-02-01", "total_dap_Gym2": 0.01}
    [alert] = cumulative_alerts(rules, [a, a2, b], b)
    assert alert["value"] == 6000.0
    assert cumulative_alerts(rules, [a, a2, b, xray], xray) == []


# ---- a study of several standard names (a head and a body scan): each part against its own level
def _head_and_body(names, body_dlp: float = 800.0) -> tuple[dict, list[dict]]:
    """A study of two head scans (500 + 300 mGy·cm: under the head's local 850) and one abdomen-pelvis
    scan; the study's total is over either level, and its most frequent name is the head's."""
    study = {"kind": "CT", "station_name": "CT1", "study_description": "trauma", "study_instance_uid": "1.9"}
    study["total_dlp_mGycm"] = 800.0 + body_dlp
    events = [
        {"kind": "CT", "protocol": "Head Routine", "dlp_mGycm": 500.0, "ctdivol_mGy": 50.0},
        {"kind": "CT", "protocol": "Head Routine", "dlp_mGycm": 300.0, "ctdivol_mGy": 40.0},
        {"kind": "CT", "protocol": "Abd/Pel portal", "dlp_mGycm": body_dlp, "ctdivol_mGy": 12.0},
    ]
    names.apply(study, events)
    assert study["standard_name"] == "CT Head"  # the name most events took
    return study, events


def test_each_region_of_a_study_is_compared_with_its_own_level_and_the_alert_names_it(names, levels):
    study, events = _head_and_body(names)
    levels.apply(study, events)
    parts = {p["standard_name"]: p for p in study["drl_parts"]}
    # CT Head: 500 + 300 = 800 against its local 850; CT Abdomen-Pelvis: 800 against its national 745.
    assert (parts["CT Head"]["value"], parts["CT Head"]["level"], parts["CT Head"]["over_drl"]) == (800.0, 850.0, False)
    body = parts["CT Abdomen-Pelvis"]
    assert (body["value"], body["level"], body["source"], body["over_drl"], body["events"]) == (
        800.0,
        745.0,
        "national",
        True,
        1,
    )
    assert body["body_region"] == "Abdomen-Pelvis"
    # The study's total (1,600) is compared with no single name's level: it says so, and why.
    assert study["drl_value"] != study["total_dlp_mGycm"]
    assert "not compared" in study["drl_not_compared"] and "CT Head, CT Abdomen-Pelvis" in study["drl_not_compared"]
    assert (study["drl_standard_name"], study["drl_value"], study["over_drl"]) == ("CT Abdomen-Pelvis", 800.0, True)
    (alert,) = drl_alerts(study)
    assert alert["rule"] == "DRL CT Abdomen-Pelvis" and alert["value"] == 800.0 and alert["threshold"] == 745.0
    assert alert["message"].startswith("CT Abdomen-Pelvis: part (1 events) of a study of several standard names")


def test_a_multi_region_study_whose_parts_are_within_their_levels_raises_nothing(names, levels):
    study, events = _head_and_body(names, body_dlp=700.0)  # 1,500 in all: over both levels, no part is
    levels.apply(study, events)
    assert study["over_drl"] is False and drl_alerts(study) == []


def test_a_part_without_the_metric_is_said_not_compared(names, levels):
    study, events = _head_and_body(names)
    del events[2]["dlp_mGycm"]  # a body event without its DLP (a report of totals only)
    levels.apply(study, events)
    assert [p["standard_name"] for p in study["drl_parts"]] == ["CT Head"]
    assert "CT Abdomen-Pelvis (its events carry no value for total_dlp_mGycm)" in study["drl_not_compared"]


def test_the_survey_counts_each_part_of_a_multi_region_study_under_its_own_name(names, levels):
    study, events = _head_and_body(names)
    levels.apply(study, events)
    rows = {r["standard_name"]: r for r in survey(levels, [study])}
    assert (rows["CT Head"]["studies"], rows["CT Head"]["median"]) == (1, 800.0)  # not the study's 1,600
    assert (rows["CT Abdomen-Pelvis"]["studies"], rows["CT Abdomen-Pelvis"]["median"]) == (1, 800.0)


def _combined_examination(chest_ctdivol: float = 10.0) -> tuple[ReferenceLevels, dict, list[dict]]:
    """A "CT Chest-Abdomen-Pelvis" study (a level of its own) whose events are named by protocol, with
    names that have event levels only."""
    levels = ReferenceLevels(
        {"CT Chest-Abdomen-Pelvis": Level("total_dlp_mGycm", 1000.0)},
        {"CT Chest": Level("ctdivol_mGy", 12.0), "CT Abdomen-Pelvis": Level("ctdivol_mGy", 15.0)},
        {},
    )
    study = {"study_instance_uid": "1.2.3", "standard_name": "CT Chest-Abdomen-Pelvis", "total_dlp_mGycm": 1500.0}
    events = [
        {"event_key": "e1", "standard_name": "CT Chest", "ctdivol_mGy": chest_ctdivol, "dlp_mGycm": 500.0},
        {"event_key": "e2", "standard_name": "CT Abdomen-Pelvis", "ctdivol_mGy": 14.0, "dlp_mGycm": 1000.0},
    ]
    return levels, study, events


def test_a_combined_examination_whose_parts_have_no_study_level_is_compared_whole():
    levels, study, events = _combined_examination()
    levels.apply(study, events)
    assert (study["drl_standard_name"], study["drl_value"], study["drl_level"], study["over_drl"]) == (
        "CT Chest-Abdomen-Pelvis",
        1500.0,
        1000.0,
        True,
    )
    assert "drl_parts" not in study and "drl_not_compared" not in study
    assert [a["rule"] for a in drl_alerts(study)] == ["DRL CT Chest-Abdomen-Pelvis"]
    assert [e["over_drl"] for e in events] == [False, False]  # each event still against its own event level
    # The survey counts what the alert compared: the study whole, under its own name.
    rows = {r["standard_name"]: r for r in survey(levels, [study])}
    assert (rows["CT Chest-Abdomen-Pelvis"]["studies"], rows["CT Chest-Abdomen-Pelvis"]["median"]) == (1, 1500.0)


def test_a_part_without_a_study_level_is_named_not_compared_beside_the_parts_compared():
    levels, study, events = _combined_examination()
    levels = ReferenceLevels({**levels.study, "CT Chest": Level("total_dlp_mGycm", 400.0)}, levels.event, {})
    levels.apply(study, events)
    assert [p["standard_name"] for p in study["drl_parts"]] == ["CT Chest"]
    assert "CT Abdomen-Pelvis (no study reference level)" in study["drl_not_compared"]
    assert [a["rule"] for a in drl_alerts(study)] == ["DRL CT Chest"]
    rows = {r["standard_name"]: r for r in survey(levels, [study])}
    assert rows["CT Chest-Abdomen-Pelvis"]["studies"] == 0 and rows["CT Chest"]["studies"] == 1


def test_parts_none_of_which_could_be_compared_do_not_point_to_drl_parts_nor_count_whole_in_the_survey():
    levels, study, events = _combined_examination()
    levels = ReferenceLevels({**levels.study, "CT Chest": Level("agd_left_mGy", 1.0)}, levels.event, {})
    levels.apply(study, events)  # the chest events carry no AGD: no part compared, and no alert
    assert "drl_parts" not in study and "over_drl" not in study and drl_alerts(study) == []
    assert "(drl_parts)" not in study["drl_not_compared"] and "CT Chest (its events" in study["drl_not_compared"]
    assert {r["standard_name"]: r["studies"] for r in survey(levels, [study])} == {
        "CT Chest": 0,
        "CT Chest-Abdomen-Pelvis": 0,
    }


def test_the_report_lists_each_part_over_its_level():
    from diana.access.report import _over_level

    part = {"metric": "total_dlp_mGycm", "value": 800.0, "level": 745.0, "source": "national", "events": 1}
    study = {
        "standard_name": "CT Head",
        "drl_parts": [
            {**part, "standard_name": "CT Head", "over_drl": False},
            {**part, "standard_name": "CT Abdomen-Pelvis", "over_drl": True},
        ],
    }
    assert _over_level(study) == [("CT Abdomen-Pelvis", "total_dlp_mGycm", 800.0, 745.0, "national")]


def test_the_example_abdomen_pelvis_rule_matches_whole_target_regions_only():
    rules = load_rules(REPO / "dose-rules.example.yaml")
    rule = next(r for r in rules.reference_levels if r.name == "CT abdomen-pelvis DRL")
    for region in ("Abdomen", "PELVIS", "Abdomen and Pelvis"):
        assert rule.matches({"kind": "CT", "target_region": region}, {})
    for region in ("Chest, Abdomen and Pelvis", "Pelvis and lower extremities"):
        assert not rule.matches({"kind": "CT", "target_region": region}, {})


def test_a_study_of_parts_is_written_and_read_back_on_dose_studies(names, levels):
    from datetime import UTC, datetime

    from diana.schemas.codec import default_codec
    from diana.schemas.topics import DOSE_STUDIES
    from diana.stream_apps.dose.agent import _fit

    study, events = _head_and_body(names)
    levels.apply(study, events)
    codec = default_codec()
    record = {**study, "events": 3, "revision": 1, "received_at": datetime(2026, 12, 1, tzinfo=UTC)}
    value = codec.encode(DOSE_STUDIES.value_schema, _fit(codec, DOSE_STUDIES.value_schema, record))
    _, read = codec.decode(value, expect=DOSE_STUDIES.value_schema)
    assert read["drl_parts"] == study["drl_parts"] and read["drl_not_compared"] == study["drl_not_compared"]
    assert read["drl_standard_name"] == "CT Abdomen-Pelvis"
