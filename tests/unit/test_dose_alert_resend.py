"""Which alerts the dose worker publishes for a study, live and when the same object comes again (a
redelivery after a crash, or `diana replay diana-dose`): alerts_to_send. No services."""

from __future__ import annotations

import copy

from diana.stream_apps.dose.agent import alerts_to_send
from diana.stream_apps.dose.alerts import drl_alerts
from diana.stream_apps.dose.reference_levels import Level, ReferenceLevels

FIRST_SENT = {"revision": 1, "raised_at": 1_000}


def _head_and_body_alerts() -> list[dict]:
    """A head + body study's DRL alerts as compared part by part (d393571): one per part over its level."""
    levels = ReferenceLevels(
        {"CT Head": Level("total_dlp_mGycm", 970.0), "CT Abdomen-Pelvis": Level("total_dlp_mGycm", 745.0)}, {}, {}
    )
    study = {"study_instance_uid": "1.2.3", "standard_name": "CT Abdomen-Pelvis", "total_dlp_mGycm": 2100.0}
    events = [
        {"event_key": "e1", "standard_name": "CT Head", "dlp_mGycm": 1000.0},
        {"event_key": "e2", "standard_name": "CT Abdomen-Pelvis", "dlp_mGycm": 550.0},
        {"event_key": "e3", "standard_name": "CT Abdomen-Pelvis", "dlp_mGycm": 550.0},
    ]
    levels.apply(study, events)
    return drl_alerts(study)


def _state(raised: dict[str, float]) -> dict:
    return {"revision": 4, "alerts": dict(raised), "alert_origins": {a: dict(FIRST_SENT) for a in raised}}


def test_a_replay_after_an_upgrade_sends_no_alert_the_study_never_raised():
    alerts = {a["rule"]: a for a in _head_and_body_alerts()}
    body, head = alerts["DRL CT Abdomen-Pelvis"], alerts["DRL CT Head"]
    # Before the upgrade the study was compared whole: its body alert (same id) with the whole 2,100.
    state = _state({body["alert_id"]: 2100.0})
    before = copy.deepcopy(state)
    sent, changed = alerts_to_send(state, [body, head], 99_000, resend=True)
    assert sent == [] and not changed
    assert state == before  # nothing recorded: a later live change of the study raises them, then


def test_a_redelivery_after_a_crash_sends_the_raised_alerts_again_as_first_sent():
    alerts = _head_and_body_alerts()
    state = _state({a["alert_id"]: a["value"] for a in alerts})
    sent, changed = alerts_to_send(state, alerts, 99_000, resend=True)
    assert [a for a, _ in sent] == alerts and [o for _, o in sent] == [FIRST_SENT] * 2 and not changed


def test_live_a_new_alert_or_a_new_value_is_sent_and_recorded():
    body, head = sorted(_head_and_body_alerts(), key=lambda a: a["rule"])
    state = _state({body["alert_id"]: 2100.0, head["alert_id"]: head["value"]})
    sent, changed = alerts_to_send(state, [body, head], 99_000, resend=False)
    assert changed and [(a["alert_id"], o) for a, o in sent] == [
        (body["alert_id"], {"revision": 4, "raised_at": 99_000})
    ]
    assert state["alerts"][body["alert_id"]] == body["value"]
