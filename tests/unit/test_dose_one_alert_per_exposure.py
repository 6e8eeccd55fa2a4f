"""One CT exposure, one standing alert.

Before: CT image-header events were keyed by series, dose-report events by Irradiation Event UID, and
the alert id includes the key. So a spiral reconstructed as two series raised two alerts from its
images, and its dose report a third; the report retracted the image events from dose.events but the
two alerts stood, were mailed (or tried again for ever) and counted. Now an alert raised from an
image-header event the report superseded is withdrawn (dose.alerts again with ``superseded_by``, and
closed on dose.alert-actions), and the series of one acquisition are one event. No services."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.access.alerts.delivery import DeliveryWorker, Ledger
from diana.access.alerts.routing import Recipient, Routing
from diana.access.alerts.workflow import delivery_action, withdrawal_action
from diana.schemas.codec import default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import DOSE_ALERTS
from diana.sinks.opensearch import OpenSearchSink
from diana.stream_apps.dose import alerts as dose_alerts
from diana.stream_apps.dose.agent import _fit, study_alert_outputs
from diana.stream_apps.dose.alerts import AlertRules, ReferenceLevel
from diana.stream_apps.dose.study import fold_report, new_study, summarize, superseded_events
from tests.support import dosebuilder as b
from tests.support import doseimages as img
from tests.support.alert_fakes import AlertStates, RecordingBroker
from tests.unit.test_dose_families import extracted
from tests.unit.test_routing_alert_once import STUDY, _complete_study, _route

RULES = AlertRules(
    reference_levels=(ReferenceLevel("CT head DRL", {"protocol": re.compile("(?i)head")}, {"ctdivol_mGy": 60.0}, {}),)
)


def _head_series(study: str, **acquisition) -> object:
    ds = img.water_phantom_ct(study, generate_uid(), 1, radius_mm=5, hu_inside=0, size=16)
    ds.CTDIvol, ds.ProtocolName = 75.0, "Head routine"
    for keyword, value in acquisition.items():
        setattr(ds, keyword, value)
    return ds


def _head_report(study: str) -> object:
    event = b.ct_event("9.9.1", ctdivol="75", dlp="1100", protocol="Head routine")
    return b.ct_report([event], total_dlp="1100", study_uid=study)


def _run(objects: list, state: dict | None = None) -> tuple[dict, list[tuple[dict, dict]]]:
    """The dose worker's fold and alert decisions, object by object (agent.py publish_study)."""
    state = state or {**new_study(objects[0].StudyInstanceUID), "revision": 0}
    sent = []
    for at, ds in enumerate(objects, start=len(state["reports"])):
        fold_report(state, *extracted(ds), at)
        state["revision"] += 1
        record, events = summarize(state)
        out, _ = study_alert_outputs(state, RULES, record, events, superseded_events(state), at, False)
        sent += out
    return state, sent


def _standing(sent: list[tuple[dict, dict]]) -> set[str]:
    withdrawn = {a["alert_id"] for a, _ in sent if a.get("superseded_by")}
    return {a["alert_id"] for a, _ in sent} - withdrawn


def test_the_alerts_of_image_series_a_dose_report_supersedes_are_withdrawn():
    study = generate_uid()
    report = _head_report(study)
    state, sent = _run([_head_series(study), _head_series(study), report])
    raised = [a for a, _ in sent if not a.get("superseded_by")]
    withdrawals = [(a, o) for a, o in sent if a.get("superseded_by")]
    assert len(raised) == 3  # each series alerted before the report came (no acquisition to tell them apart)
    assert len(withdrawals) == 2 and {a["superseded_by"] for a, _ in withdrawals} == {report.SOPInstanceUID}
    assert {a["alert_id"] for a, _ in withdrawals} == {a["alert_id"] for a in raised[:2]}
    (standing,) = _standing(sent)
    assert [a for a in raised if a["alert_id"] == standing][0]["irradiation_event_uid"] == "9.9.1"
    assert all(a["value"] == 75.0 and o["revision"] == 3 for a, o in withdrawals)
    # The report's value for the exposure (its one head event), for the correction of a delivered alert.
    assert all((a["withdrawn_reason"], a["replaced_value"]) == ("superseded", 75.0) for a, _ in withdrawals)
    assert set(state["withdrawn_alerts"]) == {a["alert_id"] for a, _ in withdrawals}

    # The same object again (a redelivery, a replay): the withdrawals re-sent as first sent, nothing new.
    record, events = summarize(state)
    again, changed = study_alert_outputs(state, RULES, record, events, superseded_events(state), 99, True)
    assert not changed
    assert sorted((a["alert_id"], o["raised_at"]) for a, o in again if a.get("superseded_by")) == sorted(
        (a["alert_id"], o["raised_at"]) for a, o in withdrawals
    )
    # And live again (a later object of the study): nothing withdrawn twice.
    later, _ = study_alert_outputs(state, RULES, record, events, superseded_events(state), 100, False)
    assert later == []


def test_two_reconstructions_of_one_acquisition_raise_one_alert():
    for acquisition in (
        {"IrradiationEventUID": "1.2.826.0.1.3680043.2.1143.77"},
        {"AcquisitionNumber": 2, "AcquisitionDate": "20240315", "AcquisitionTime": "101733.25"},
    ):
        study = generate_uid()
        first, second = _head_series(study, **acquisition), _head_series(study, **acquisition)
        state, sent = _run([first, second])
        assert len(sent) == 1  # before: one alert per series
        record, events = summarize(state)
        assert record["events"] == 1 and events[0]["event_key"] == f"series:{first.SeriesInstanceUID}"
        (retracted,) = superseded_events(state)  # the second series' event, in case it was published
        assert retracted["event_key"] == f"series:{second.SeriesInstanceUID}"
        assert retracted["superseded_by"] == first.SOPInstanceUID
        # The alert id is made of the first series as before (a replay finds the alert it raised).
        expected = dose_alerts._alert_id("CT head DRL", study, f"series:{first.SeriesInstanceUID}", "ctdivol_mGy")
        assert sent[0][0]["alert_id"] == expected


def test_series_of_two_acquisitions_stay_two_events():
    study = generate_uid()
    arterial = _head_series(study, AcquisitionNumber=2, AcquisitionDate="20240315", AcquisitionTime="101733")
    venous = _head_series(study, AcquisitionNumber=3, AcquisitionDate="20240315", AcquisitionTime="101811")
    state, sent = _run([arterial, venous])
    assert len(sent) == 2 and summarize(state)[0]["events"] == 2 and superseded_events(state) == []


def _delivery_worker(sends: list, ledger: Ledger | None = None, ok: bool = True) -> DeliveryWorker:
    from diana.access.alerts.channels import Delivery

    worker = object.__new__(DeliveryWorker)
    worker.cfg = SimpleNamespace(alerts=SimpleNamespace(attempts=1, timeout_s=1))
    worker.routing = Routing((Recipient("physicist", email="p@h.example"),))
    worker.states, worker.codec, worker.ledger = AlertStates(), default_codec(), ledger or Ledger()
    worker.producer, worker._not_taken = RecordingBroker(), []
    worker._send = lambda channel, address, alert, key, attempts=None, **_: (  # type: ignore[method-assign]
        sends.append(alert["alert_id"]) or Delivery(ok, 1, "" if ok else "TimeoutError: timed out")
    )
    return worker


_RAISED = datetime(2024, 3, 15, 10, 0, tzinfo=UTC)
_ALERT = {"alert_id": "h1", "rule": "CT head DRL", "rule_type": "reference_level", "study_instance_uid": "1.2"}
_WITHDRAWN = {**_ALERT, "superseded_by": "1.2.9", "raised_at": datetime(2024, 3, 15, 10, 5, tzinfo=UTC)}


def test_delivery_closes_a_withdrawn_alert_and_drops_its_failed_deliveries():
    sends: list = []
    worker = _delivery_worker(sends, ok=False)
    worker.handle_alert({**_ALERT, "raised_at": _RAISED})
    assert worker.ledger.failed  # the relay down: to be tried again
    worker.handle_alert(_WITHDRAWN)
    assert not worker.ledger.failed and "h1" in worker.ledger.withdrawn
    worker.retry_failed()
    assert sends == ["h1"]  # tried once, never after its withdrawal
    doc = worker.states.get("h1")
    assert doc["status"] == "closed" and doc["superseded_by"] == "1.2.9" and doc["raised_at"] == _RAISED.isoformat()
    closing = doc["history"][-1]
    assert (closing["action"], closing["actor"], closing["action_id"]) == ("CLOSED", "diana-dose", "withdrawn:h1")


def test_a_delivery_worker_started_after_the_withdrawal_does_not_send_the_alert():
    """The dose worker writes the CLOSED action too: a delivery worker stopped while both the alert and its
    withdrawal were published reads dose.alert-actions whole at its start, then finds the alert."""
    action = dose_alerts.withdrawal_action("h1", "1.2.9", _WITHDRAWN["raised_at"])
    assert action["action_id"] == withdrawal_action(_WITHDRAWN)["action_id"]  # one action, applied once
    codec = default_codec()
    _, read_back = codec.decode(codec.encode("AlertAction", _fit(codec, "AlertAction", action)), expect="AlertAction")
    ledger = Ledger()
    for earlier in (delivery_action("h1", "physicist", "email", False, 1, "TimeoutError"), read_back):
        ledger.add(earlier)
    sends: list = []
    worker = _delivery_worker(sends, ledger)
    worker.handle_alert({**_ALERT, "raised_at": _RAISED})
    worker.handle_alert(_WITHDRAWN)
    worker.retry_failed()
    assert sends == [] and worker.producer.actions == []


def _alert_message(alert: dict) -> Message:
    record = {"revision": 1, "metric": "ctdivol_mGy", "value": 75.0, "threshold": 60.0, "message": "m", **alert}
    codec = default_codec()
    value = codec.encode(DOSE_ALERTS.value_schema, _fit(codec, DOSE_ALERTS.value_schema, record))
    return Message(topic=DOSE_ALERTS.name, partition=0, offset=1, value=value)


def test_the_sink_deletes_a_withdrawn_alert_and_routing_sends_nothing_for_it(tmp_path: Path):
    sink = OpenSearchSink(None, IndexLayout("diana"), index_version=3)
    (request,) = sink.prepare([_alert_message({**_WITHDRAWN, "raised_at": _WITHDRAWN["raised_at"]})]).requests
    assert [json.loads(line) for line in request.body.splitlines()] == [
        {"delete": {"_index": "diana-dose-alerts-v3", "_id": "h1"}}
    ]
    archive, state = tmp_path / "archive", tmp_path / "state"
    _, study, _ = _complete_study(archive)
    withdrawal = {**_WITHDRAWN, "study_instance_uid": STUDY}
    assert _route(archive, state, study, _alert_message(withdrawal)) == []  # a dose_alert rule: not sent
    assert _route(archive, state, study, _alert_message({**withdrawal, "superseded_by": None}))  # an alert is


def _as_stored_before(ds: object) -> tuple[dict, dict]:
    """An image record as the code before the acquisition key stored it."""
    report, context = extracted(ds)
    return {**report, "events": [{k: v for k, v in e.items() if k != "acquisition"} for e in report["events"]]}, context


def test_a_replay_after_the_upgrade_is_no_change_for_records_stored_without_the_acquisition():
    """Before, a CT image record stored without 'acquisition' was a change on replay: revision+1, raised_at
    the replay's time, and the alerts the state never raised were raised and mailed about old studies."""
    study = generate_uid()
    acquisition = {"AcquisitionNumber": 2, "AcquisitionDate": "20240315", "AcquisitionTime": "101733"}
    first, second = _head_series(study, **acquisition), _head_series(study, **acquisition)
    state = {**new_study(study), "revision": 0}
    sent = []
    for at, ds in enumerate((first, second), start=1):  # the old code: one event (and alert) per series
        assert fold_report(state, *_as_stored_before(ds), at)
        state["revision"] += 1
        record, events = summarize(state)
        sent += study_alert_outputs(state, RULES, record, events, superseded_events(state), at, False)[0]
    before = json.loads(json.dumps(state))
    assert len(sent) == 2 and not superseded_events(state)

    for ds in (first, second):  # the replay, by the current code
        assert fold_report(state, *extracted(ds), 99) is False
    assert state == before  # kept as stored: no regrouping, no revision
    record, events = summarize(state)
    again, changed = study_alert_outputs(state, RULES, record, events, superseded_events(state), 99, True)
    assert not changed
    assert sorted((a["alert_id"], o["raised_at"], o["revision"]) for a, o in again) == sorted(
        (a["alert_id"], o["raised_at"], o["revision"]) for a, o in sent
    )
