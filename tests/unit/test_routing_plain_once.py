"""A destination with a plain (instance) rule beside its dose_alert or whole_study rule gets each
instance once, whichever of its rules matched and in whichever order the triggers come: the plain
rule reads and writes the destination's record (sent.py) as the study rules do. Before, it neither read
nor wrote it: an instance sent on its arrival went again with the study's alert, and a late instance
sent with the study's alert (or its next complete record) went again on its own event. Real DICOM
files in an archive folder, the aggregates' own fold for the study's state, a recording sender."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.access.routing.rules import RoutingRules, parse_rules
from diana.access.routing.senders import Outcome, Result
from diana.access.routing.worker import RouteWorker, WorkerSettings
from diana.config import KafkaConfig
from diana.schemas.codec import default_codec
from diana.schemas.topics import INSTANCES
from diana.storage import FilesystemStore
from diana.stream_apps.aggregate_fold import complete_series, study_record
from tests.unit.test_routing_alert_once import ALERTED, WS, _alert, _mr_instance, _route
from tests.unit.test_routing_amended import _fold, _message
from tests.unit.test_routing_waits import STUDY, _archive, _Dead, _Recorder

CT_ARRIVING = {"name": "ct-arriving", "match": {"modality": "CT"}, "destinations": ["ws"]}
# The destination gets CT instances as they arrive, and every instance of a study that raised a dose alert.
PLAIN_AND_ALERT = parse_rules({"destinations": [WS], "rules": [CT_ARRIVING, ALERTED]})
PLAIN_AND_WHOLE = parse_rules(
    {
        "destinations": [WS],
        "rules": [CT_ARRIVING, {"name": "whole", "match": {}, "whole_study": True, "destinations": ["ws"]}],
    }
)
PLAIN_ONLY = parse_rules({"destinations": [WS], "rules": [CT_ARRIVING]})


def _arrived(event: dict, offset: int) -> Message:
    """The InstanceArrived event of an archived instance, as the receiver publishes it."""
    full = {
        "source": "C_STORE",
        "calling_ae": "MODALITY",
        "called_ae": "DIANA",
        "received_at": 0,
        "landing_path": "/landing/x.dcm",
        "sha256": "0" * 64,
        **{k: v for k, v in event.items() if k != "received_at"},
    }
    value = default_codec().encode(INSTANCES.value_schema, full)
    return Message(topic=INSTANCES.name, partition=0, offset=offset, value=value)


def _ct_and_mr_study(archive: Path) -> tuple[list[dict], dict, dict, dict]:
    """(the CT events, the MR event, the CT series state, the study state): 3 CT images and an MR image, complete."""
    ct_events, mr = _archive(archive, {generate_uid(): 3}), _mr_instance(archive)
    ct_series, study = _fold(ct_events, None, None, 0)
    mr_series, study = _fold([mr], None, study, 1)
    ct_series, study, _ = complete_series(ct_series, study)
    mr_series, study, _ = complete_series(mr_series, study)
    assert study["status"] == "COMPLETED" and study["instance_count"] == 4
    return ct_events, mr, ct_series, study


def _sops(events: list[dict]) -> list[str]:
    return sorted(e["sop_instance_uid"] for e in events)


def test_instances_sent_on_arrival_are_not_sent_again_by_the_alert(tmp_path: Path):
    """The CT images go as they arrive; the study's alert then sends only its MR image."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    assert sorted(_route(archive, state, study_record(study), *arrivals, rules=PLAIN_AND_ALERT)) == _sops(ct)
    assert _route(archive, state, study_record(study), _alert("a1"), rules=PLAIN_AND_ALERT) == [mr["sop_instance_uid"]]
    # Either again (a replay, a batch consumed again after a crash before its commit): nothing.
    assert _route(archive, state, study_record(study), *arrivals, _alert("a1"), rules=PLAIN_AND_ALERT) == []


def test_instances_the_alert_sent_are_not_sent_again_on_their_arrival_events(tmp_path: Path):
    """The router behind on dicom.instances (or the alert consumed first): the alert sends the study,
    the instances' own events after it send nothing."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    everything = sorted([*_sops(ct), mr["sop_instance_uid"]])
    assert sorted(_route(archive, state, study_record(study), _alert("a1"), rules=PLAIN_AND_ALERT)) == everything
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    assert _route(archive, state, study_record(study), *arrivals, rules=PLAIN_AND_ALERT) == []


def test_arrivals_and_the_alert_in_one_batch_send_each_instance_once(tmp_path: Path):
    """Either order in the batch: the alert is planned first, the arrivals find its claims."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    everything = sorted([*_sops(ct), mr["sop_instance_uid"]])
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    sent = _route(archive, state, study_record(study), *arrivals, _alert("a1"), rules=PLAIN_AND_ALERT)
    assert sorted(sent) == everything
    again = tmp_path / "again"
    sent = _route(archive, again, study_record(study), _alert("a1"), *arrivals, rules=PLAIN_AND_ALERT)
    assert sorted(sent) == everything


def test_a_late_instance_of_an_alerted_study_goes_once_whichever_trigger_comes_first(tmp_path: Path):
    """After the alert sent the study, a late CT image arrives: its event (the plain rule) and the
    study's next complete record (the alert's late instances) both match it; it goes once, event first,
    record first, or both in one batch."""
    for order in ("event first", "record first", "one batch"):
        archive, state = tmp_path / order / "archive", tmp_path / order / "state"
        ct, mr, ct_series, study = _ct_and_mr_study(archive)
        assert len(_route(archive, state, study_record(study), _alert("a1"), rules=PLAIN_AND_ALERT)) == 4
        late = _archive(archive, {ct_series["series_instance_uid"]: 1})
        ct_series, study = _fold(late, ct_series, study, 120)
        ct_series, study, _ = complete_series(ct_series, study)
        assert study["status"] == "AMENDED"
        event, complete_again = _arrived(late[0], 10), _message(study, 11)
        if order == "event first":
            sent = _route(archive, state, study_record(study), event, rules=PLAIN_AND_ALERT)
            sent += _route(archive, state, study_record(study), complete_again, rules=PLAIN_AND_ALERT)
        elif order == "record first":
            sent = _route(archive, state, study_record(study), complete_again, rules=PLAIN_AND_ALERT)
            sent += _route(archive, state, study_record(study), event, rules=PLAIN_AND_ALERT)
        else:
            sent = _route(archive, state, study_record(study), event, complete_again, rules=PLAIN_AND_ALERT)
        assert sent == [late[0]["sop_instance_uid"]], order


def test_a_plain_and_a_whole_study_rule_of_one_destination_share_the_record_too(tmp_path: Path):
    """The CT images on arrival, then the study complete: only the MR image."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    assert sorted(_route(archive, state, study_record(study), *arrivals, rules=PLAIN_AND_WHOLE)) == _sops(ct)
    completed = _message(study, 5)
    assert _route(archive, state, study_record(study), completed, rules=PLAIN_AND_WHOLE) == [mr["sop_instance_uid"]]


def test_an_arrival_is_recorded_only_once_delivered_and_a_batch_stopped_mid_send_goes_again(tmp_path: Path):
    """What happens at a restart mid-send is unchanged: an instance's record is written after its batch
    is delivered, before the commit. A batch that was not delivered (the destination down, the router
    stopped) records nothing, and the router started again sends it (at least once); one delivered and
    then consumed again (a crash before the commit) sends nothing again."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, _, _, study = _ct_and_mr_study(archive)
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]

    class Down(_Recorder):
        def send(self, items, attempt):
            stop.set()
            return [Result(Outcome.UNAVAILABLE, "connection refused")] * len(items)

    stop = threading.Event()
    settings = WorkerSettings("g", FilesystemStore(archive), 5, max_backoff_s=0.05, sent_dir=state)
    rules = PLAIN_AND_ALERT
    worker = RouteWorker(KafkaConfig(), rules.destinations["ws"], rules.rules_for("ws"), Down(), settings, stop)
    assert worker.deliver(arrivals, _Dead()) is False
    assert not (state / f"{STUDY}.json").exists()
    assert sorted(_route(archive, state, study_record(study), *arrivals, rules=rules)) == _sops(ct)
    record = json.loads((state / f"{STUDY}.json").read_text())
    assert sorted(record["sop_instance_uids"]) == _sops(ct) and "alerted" not in record
    assert _route(archive, state, study_record(study), *arrivals, rules=rules) == []


def test_an_arrival_recorded_does_not_make_the_study_alerted(tmp_path: Path):
    """The plain rule's record is no alert: the study's complete record sends nothing by the alert rule."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, _, _, study = _ct_and_mr_study(archive)
    assert len(_route(archive, state, study_record(study), _arrived(ct[0], 1), rules=PLAIN_AND_ALERT)) == 1
    assert _route(archive, state, study_record(study), _message(study, 2), rules=PLAIN_AND_ALERT) == []


def test_a_destination_with_plain_rules_only_keeps_no_record(tmp_path: Path):
    """Unchanged: nothing could send its instances a second time; an event consumed again sends again."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, _, _, study = _ct_and_mr_study(archive)
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    rules: RoutingRules = PLAIN_ONLY
    assert sorted(_route(archive, state, study_record(study), *arrivals, rules=rules)) == _sops(ct)
    assert sorted(_route(archive, state, study_record(study), *arrivals, rules=rules)) == _sops(ct)
    assert not state.exists()


def test_a_batch_of_one_studys_arrivals_reads_its_record_once(tmp_path: Path, monkeypatch):
    """A plain rule asks the record for each instance; the file is read once a batch, not once an instance."""
    from diana.access.routing.sent import StudiesSent

    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, _, _, study = _ct_and_mr_study(archive)
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    assert len(_route(archive, state, study_record(study), arrivals[0], rules=PLAIN_AND_ALERT)) == 1
    reads: list[str] = []
    original = StudiesSent._read_record

    def counted(self: StudiesSent, study_uid: str) -> tuple[set[str], bool]:
        reads.append(study_uid)
        return original(self, study_uid)

    monkeypatch.setattr(StudiesSent, "_read_record", counted)
    assert sorted(_route(archive, state, study_record(study), *arrivals, rules=PLAIN_AND_ALERT)) == _sops(ct[1:])
    assert reads == [STUDY]


def test_an_arrival_dead_lettered_for_the_destination_is_not_sent_again_by_the_alert(tmp_path: Path):
    """As for the study rules: refused max_attempts times, it is dead-lettered and recorded."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)

    class Refuses(_Recorder):
        def send(self, items, attempt):
            return [Result(Outcome.FAILED, "0xC000")] * len(items)

    settings = WorkerSettings("g", FilesystemStore(archive), 2, max_backoff_s=0.05, sent_dir=state)
    rules = PLAIN_AND_ALERT
    worker = RouteWorker(
        KafkaConfig(), rules.destinations["ws"], rules.rules_for("ws"), Refuses(), settings, threading.Event()
    )
    dead = _Dead()
    assert worker.deliver([_arrived(ct[0], 1)], dead) is True and len(dead.letters) == 1
    sent = _route(archive, state, study_record(study), _alert("a1"), rules=rules)
    assert sorted(sent) == sorted([*_sops(ct[1:]), mr["sop_instance_uid"]])
