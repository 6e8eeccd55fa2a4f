"""A per-study alert (a reference level's sum over the study's events, a DRL) is withdrawn when the
study's value falls to or under its limit: a corrected dose report replacing the first with lower
values, a duplicate no longer counted. Before, it stood (mailed, counted) with a value the study no
longer has. A replay of the same objects withdraws nothing new. No services."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydicom.uid import generate_uid

from diana.schemas.codec import default_codec
from diana.stream_apps.dose.agent import _fit, study_alert_outputs
from diana.stream_apps.dose.alerts import AlertRules, ReferenceLevel
from diana.stream_apps.dose.study import fold_report, new_study, summarize, superseded_events
from tests.support import dosebuilder as b
from tests.unit.test_dose_families import extracted

RULES = AlertRules(
    reference_levels=(
        ReferenceLevel("CT abdomen study DLP", {"protocol": re.compile("(?i)abd")}, {}, {"dlp_mGycm": 1000.0}),
    )
)


def _report(study: str, dlp: str) -> object:
    events = [b.ct_event(uid, ctdivol="10", dlp=dlp) for uid in ("8.1", "8.2")]
    return b.ct_report(events, total_dlp=str(2 * float(dlp)), study_uid=study)


def _step(state: dict, ds: object, at: int, resend: bool = False) -> list[tuple[dict, dict]]:
    if not resend:
        assert fold_report(state, *extracted(ds), at)
        state["revision"] += 1
    record, events = summarize(state)
    return study_alert_outputs(state, RULES, record, events, superseded_events(state), at, resend)[0]


def test_a_study_sum_alert_is_withdrawn_when_a_corrected_report_brings_it_under_the_limit():
    study = generate_uid()
    state = {**new_study(study), "revision": 0}
    first, corrected = _report(study, "600"), _report(study, "400")
    ((raised, _),) = _step(state, first, 1)
    assert (raised["value"], raised["threshold"]) == (1200.0, 1000.0)

    sent = _step(state, corrected, 2)  # the same events, lower values: the first report is replaced
    ((withdrawal, origin),) = sent
    assert withdrawal["alert_id"] == raised["alert_id"]
    assert (withdrawal["withdrawn_reason"], withdrawal["replaced_value"]) == ("under_limit", 800.0)
    assert withdrawal["superseded_by"] == corrected.SOPInstanceUID and withdrawal["value"] == 1200.0
    assert "no longer over the limit" in withdrawal["message"] and origin["revision"] == 2
    codec = default_codec()  # fits DoseAlert v3
    _, back = codec.decode(codec.encode("DoseAlert", _fit(codec, "DoseAlert", {**withdrawal, **origin})))
    assert (back["withdrawn_reason"], back["replaced_value"]) == ("under_limit", 800.0)

    # A replay of the same objects: the withdrawal as first sent, nothing new; live again: nothing.
    again = _step(state, corrected, 99, resend=True)
    assert [(a["alert_id"], o) for a, o in again if a.get("superseded_by")] == [(raised["alert_id"], origin)]
    assert _step(state, corrected, 100, resend=True) == again
    record, events = summarize(state)
    assert study_alert_outputs(state, RULES, record, events, [], 101, False)[0] == []


def test_the_same_objects_again_withdraw_nothing():
    study = generate_uid()
    state = {**new_study(study), "revision": 0}
    first = _report(study, "600")
    assert len(_step(state, first, 1)) == 1
    assert _step(state, first, 2, resend=True) == _step(state, first, 3, resend=True)
    assert not state.get("withdrawn_alerts")


def test_over_the_limit_again_after_a_withdrawal_is_a_new_alert():
    study = generate_uid()
    state = {**new_study(study), "revision": 0}
    ((raised, _),) = _step(state, _report(study, "600"), 1)
    _step(state, _report(study, "400"), 2)
    more = b.ct_report([b.ct_event("8.3", ctdivol="10", dlp="500")], total_dlp="500", study_uid=study)
    ((again, _),) = _step(state, more, 3)  # 800 + 500: over again
    assert again["value"] == 1300.0 and not again.get("superseded_by")
    assert again["alert_id"] != raised["alert_id"]  # the first stays closed in every delivery ledger


def test_a_drl_alert_is_withdrawn_when_the_study_falls_under_its_level():
    study = {
        "study_instance_uid": "1.2.3",
        "standard_name": "CT Head",
        "drl_metric": "dlp_mGycm",
        "drl_level": 970.0,
        "drl_source": "local",
    }
    state = {**new_study("1.2.3"), "revision": 1}
    state["reports"] = {"9.9": {"sop_instance_uid": "9.9", "arrival": 1}}
    ((raised, _),) = study_alert_outputs(
        state, RULES, {**study, "drl_value": 1100.0, "over_drl": True}, [], [], 1, False
    )[0]
    state["reports"]["9.10"] = {"sop_instance_uid": "9.10", "arrival": 2}
    state["revision"] = 2
    ((withdrawal, _),) = study_alert_outputs(
        state, RULES, {**study, "drl_value": 900.0, "over_drl": False}, [], [], 2, False
    )[0]
    assert withdrawal["alert_id"] == raised["alert_id"] and withdrawal["rule_type"] == "drl"
    assert (withdrawal["replaced_value"], withdrawal["superseded_by"]) == (900.0, "9.10")


def test_a_withdrawal_recorded_before_v3_is_re_sent_without_a_reason():
    """A replay re-sends a withdrawal the state recorded before v3 as it was (no reason: DoseAlert v2),
    so alert delivery does not take it for a new one and mail a correction of an old alert."""
    from diana.stream_apps.dose.agent import alert_bytes, withdrawals_to_send

    alert = {"alert_id": "h1", "rule": "r", "rule_type": "reference_level", "metric": "dlp_mGycm"}
    alert.update(value=1200.0, threshold=1000.0, study_instance_uid="1.2.3", message="m")
    state = {"revision": 3, "alerts": {"h1": 1200.0}}
    state["withdrawn_alerts"] = {"h1": {"revision": 2, "raised_at": 5, "superseded_by": "1.2.3.9"}}
    ((record, _),), changed = withdrawals_to_send(state, [(alert, "1.2.3.9", "superseded", None)], 9, True)
    assert record["superseded_by"] == "1.2.3.9" and record["withdrawn_reason"] is None and not changed
    _, read = default_codec().decode(
        alert_bytes(default_codec(), {**record, "revision": 2, "raised_at": datetime(2024, 3, 15, tzinfo=UTC)})
    )
    assert read["withdrawn_reason"] is None


# ---- withdrawn for the dose falling only: not a rules change, not a sum of nothing, not a partial report


def _rules(limit: float, pattern: str = "(?i)abd") -> AlertRules:
    level = ReferenceLevel("CT abdomen study DLP", {"protocol": re.compile(pattern)}, {}, {"dlp_mGycm": limit})
    return AlertRules(reference_levels=(level,), dose_check=False)


def _object(state: dict, n: int, source: str = "IMAGE") -> None:
    state["reports"][f"9.{n}"] = {"sop_instance_uid": f"9.{n}", "arrival": n, "source": source}
    state["revision"] = n


def _outputs(state, rules, events, n, superseded=()) -> list[tuple[dict, dict]]:
    study = {"study_instance_uid": "1.2.3"}
    return study_alert_outputs(state, rules, study, events, list(superseded), n, False)[0]


def test_a_limit_raised_in_the_rules_file_withdraws_nothing():
    state = {**new_study("1.2.3"), "revision": 0}
    events = [{"event_key": "e1", "protocol": "ABD", "dlp_mGycm": 1200.0}]
    _object(state, 1)
    ((raised, _),) = _outputs(state, _rules(1000.0), events, 1)
    _object(state, 2)  # the study's next object, under a limit raised to 1500
    assert (
        _outputs(state, _rules(1500.0), [*events, {"event_key": "e2", "protocol": "scout", "dlp_mGycm": 1.0}], 2) == []
    )
    assert not state.get("withdrawn_alerts")


def test_a_level_no_event_matches_any_more_withdraws_nothing():
    state = {**new_study("1.2.3"), "revision": 0}
    _object(state, 1)
    _outputs(state, _rules(1000.0), [{"event_key": "e1", "protocol": "ABD", "dlp_mGycm": 1200.0}], 1)
    _object(state, 2)  # the dose report's protocol names: no event matches the level (its sum 0)
    assert (
        _outputs(state, _rules(1000.0), [{"event_key": "r1", "protocol": "Routine 5mm", "dlp_mGycm": 1250.0}], 2) == []
    )


def test_a_first_partial_dose_report_replacing_the_images_estimates_withdraws_nothing():
    """A continued exam: the first report has half the exposures, and supersedes every image-header
    event of its kind. Before: 1200 -> 600 withdrew the alert (and mailed a correction), and the second
    report's 1200 raised it again under a new id."""
    state = {**new_study("1.2.3"), "revision": 0}
    headers = [{"event_key": f"h{n}", "protocol": "ABD", "dlp_mGycm": 600.0} for n in (1, 2)]
    _object(state, 1)
    ((raised, _),) = _outputs(state, _rules(1000.0), headers, 1)
    _object(state, 2, source="RDSR")
    retracted = [{**h, "superseded_by": "9.2"} for h in headers]
    first = [{"event_key": "r1", "protocol": "ABD", "dlp_mGycm": 600.0}]
    assert _outputs(state, _rules(1000.0), first, 2, retracted) == []
    _object(state, 3, source="RDSR")
    second = [*first, {"event_key": "r2", "protocol": "ABD", "dlp_mGycm": 600.0}]
    assert _outputs(state, _rules(1000.0), second, 3, retracted) == []  # the same alert stands, same value
    assert not state.get("withdrawn_alerts") and state["alerts"] == {raised["alert_id"]: 1200.0}


def test_a_sum_that_falls_for_its_events_under_the_same_rules_is_still_withdrawn():
    state = {**new_study("1.2.3"), "revision": 0}
    _object(state, 1)
    _outputs(state, _rules(1000.0), [{"event_key": "e1", "protocol": "ABD", "dlp_mGycm": 1200.0}], 1)
    _object(state, 2)  # a corrected value of the same exposure
    ((withdrawal, _),) = _outputs(
        state, _rules(1000.0), [{"event_key": "e1", "protocol": "ABD", "dlp_mGycm": 800.0}], 2
    )
    assert (withdrawal["withdrawn_reason"], withdrawal["replaced_value"]) == ("under_limit", 800.0)
