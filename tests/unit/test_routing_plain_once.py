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

import pydicom
import pytest
from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.access.routing.rules import RoutingRules, parse_rules
from diana.access.routing.senders import Outcome, Result
from diana.access.routing.worker import RouteWorker, WorkerSettings
from diana.config import KafkaConfig
from diana.durable import sha256_file
from diana.schemas.codec import default_codec
from diana.schemas.topics import INSTANCES
from diana.storage import FilesystemStore
from diana.stream_apps.aggregate_fold import complete_series, study_record
from tests.unit.test_routing_alert_once import ALERTED, WS, _alert, _mr_instance, _route, _worker
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
    """The InstanceArrived event of an archived instance, as the receiver publishes it (with its bytes' SHA-256)."""
    full = {
        "source": "C_STORE",
        "calling_ae": "MODALITY",
        "called_ae": "DIANA",
        "received_at": 0,
        "landing_path": "/landing/x.dcm",
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
    record = json.loads((state / f"{STUDY}.json").read_text())  # one line: one batch
    assert record["sent"] == {e["sop_instance_uid"]: e["sha256"] for e in ct} and "alerted" not in record
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


class _Refuses(_Recorder):
    """A destination in maintenance: refuses every instance (a C-STORE failure status)."""

    def send(self, items, attempt):
        return [Result(Outcome.FAILED, "0xC000")] * len(items)


def _refused(archive: Path, state: Path, study: dict, rules: RoutingRules, *messages: Message) -> list[str]:
    """A router whose destination refuses everything delivers the messages (the study's indexed aggregate
    ``study``): their dead letters' reasons."""
    settings = WorkerSettings("g", FilesystemStore(archive), 2, max_backoff_s=0.05, archive_wait_s=3, sent_dir=state)
    worker = _worker(settings, study, _Refuses(), rules)
    dead = _Dead()
    assert worker.deliver(list(messages), dead) is True
    return dead.letters


def test_an_arrival_dead_lettered_for_the_destination_is_sent_by_the_alert(tmp_path: Path):
    """Refused max_attempts times, it is dead-lettered and not recorded: the study's alert sends it with
    the rest. Before, it was recorded as sent and the alert left it out."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    assert len(_refused(archive, state, study_record(study), PLAIN_AND_ALERT, _arrived(ct[0], 1))) == 1
    assert not (state / f"{STUDY}.json").exists()
    sent = _route(archive, state, study_record(study), _alert("a1"), rules=PLAIN_AND_ALERT)
    assert sorted(sent) == sorted([*_sops(ct), mr["sop_instance_uid"]])


def test_an_arrival_dead_lettered_for_the_destination_is_sent_when_the_study_completes(tmp_path: Path):
    """The same beside a whole_study rule (the review's experiment): its completion sends the instance
    refused on arrival. Before, the completion sent the other three only."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    assert len(_refused(archive, state, study_record(study), PLAIN_AND_WHOLE, _arrived(ct[0], 1))) == 1
    sent = _route(archive, state, study_record(study), _message(study, 5), rules=PLAIN_AND_WHOLE)
    assert sorted(sent) == sorted([*_sops(ct), mr["sop_instance_uid"]])


def test_an_alert_refused_in_the_batch_of_the_arrivals_leaves_them_to_the_next_trigger(tmp_path: Path):
    """The alert and the arrivals in one batch: the alert (planned first) owns the sends, and each is
    refused and dead-lettered once, under the alert. Nothing is recorded but the alert: the study's next
    complete record sends them all. Before, they were recorded and never sent."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
    letters = _refused(archive, state, study_record(study), PLAIN_AND_ALERT, *arrivals, _alert("a1"))
    assert len(letters) == 4  # the alert's message, once for each of its instances; the arrivals sent nothing
    sent = _route(archive, state, study_record(study), _message(study, 9), rules=PLAIN_AND_ALERT)
    assert sorted(sent) == sorted([*_sops(ct), mr["sop_instance_uid"]])


def test_arrivals_and_the_complete_record_refused_in_one_batch_or_two_leave_them_to_the_next(tmp_path: Path):
    """A destination in maintenance beside a whole_study rule (tests/integration/test_routing.py's
    maintenance test): in two batches each instance is dead-lettered on its arrival and again at the
    study's completion; in one batch (a worker busy with an earlier backlog takes both at once) once,
    under the message planned first. Either way nothing is recorded and the next complete record sends
    them all: the integration test waits for that, not for a count of dead letters."""
    for batches, letters_each in (("two", 2), ("one", 1)):
        archive, state = tmp_path / batches / "archive", tmp_path / batches / "state"
        ct, mr, _, study = _ct_and_mr_study(archive)
        arrivals = [_arrived(e, n) for n, e in enumerate(ct)]
        complete = _message(study, 9)
        if batches == "two":
            letters = _refused(archive, state, study_record(study), PLAIN_AND_WHOLE, *arrivals)
            letters += _refused(archive, state, study_record(study), PLAIN_AND_WHOLE, complete)
        else:
            letters = _refused(archive, state, study_record(study), PLAIN_AND_WHOLE, *arrivals, complete)
        refused = [*_sops(ct), mr["sop_instance_uid"]]  # the MR only by the whole_study rule
        counts = {sop: sum(sop in letter for letter in letters) for sop in refused}
        assert counts == {**dict.fromkeys(_sops(ct), letters_each), mr["sop_instance_uid"]: 1}, batches
        assert not (state / f"{STUDY}.json").exists()
        sent = _route(archive, state, study_record(study), _message(study, 10), rules=PLAIN_AND_WHOLE)
        assert sorted(sent) == sorted(refused), batches


@pytest.mark.parametrize("rules", [PLAIN_AND_ALERT, PLAIN_AND_WHOLE, PLAIN_ONLY], ids=["alert", "whole", "plain only"])
def test_a_corrected_copy_reaches_the_destination_on_its_arrival(tmp_path: Path, rules: RoutingRules):
    """The modality sends a corrected copy of an instance sent before (other bytes, the same SOP Instance
    UID; archived under REPLACE). Its arrival sends it, to a destination with a study or alert rule as to
    one with plain rules only; the same event again sends nothing (but to the plain-only destination,
    which keeps no record). Before, a destination with a study or alert rule found the SOP Instance UID
    in its record and the corrected copy never reached it."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, _, _, study = _ct_and_mr_study(archive)
    sop = ct[0]["sop_instance_uid"]
    assert _route(archive, state, study_record(study), _arrived(ct[0], 1), rules=rules) == [sop]
    if rules is not PLAIN_ONLY:
        assert _route(archive, state, study_record(study), _arrived(ct[0], 2), rules=rules) == []  # same bytes
    path = archive / ct[0]["study_instance_uid"] / ct[0]["series_instance_uid"] / f"{sop}.dcm"
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "CT corrected"
    ds.save_as(path, enforce_file_format=True)
    corrected = {**ct[0], "sha256": sha256_file(path)[0]}
    assert _route(archive, state, study_record(study), _arrived(corrected, 3), rules=rules) == [sop]
    again = _route(archive, state, study_record(study), _arrived(corrected, 4), rules=rules)
    assert again == ([sop] if rules is PLAIN_ONLY else [])


def test_a_corrected_copy_of_an_instance_an_alert_sent_goes_on_its_arrival(tmp_path: Path):
    """The alert sent the study (its record keeps each archived object's SHA-256); the original's
    arrival event, consumed after, sends nothing; the corrected copy's arrival sends it."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, _, _, study = _ct_and_mr_study(archive)
    assert len(_route(archive, state, study_record(study), _alert("a1"), rules=PLAIN_AND_ALERT)) == 4
    assert _route(archive, state, study_record(study), _arrived(ct[0], 1), rules=PLAIN_AND_ALERT) == []
    sop = ct[0]["sop_instance_uid"]
    corrected = {**ct[0], "sha256": "1" * 64}  # what the archive holds is sent; the event's digest is recorded
    assert _route(archive, state, study_record(study), _arrived(corrected, 2), rules=PLAIN_AND_ALERT) == [sop]


def test_a_record_of_an_earlier_version_knows_no_digest_so_an_arrival_is_sent(tmp_path: Path):
    """A record written before the digests (SOP Instance UIDs only): an arrival of an instance it lists
    is sent (it may be a corrected copy), once; the study's alert still sends only what it does not list."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct, mr, _, study = _ct_and_mr_study(archive)
    state.mkdir()
    (state / f"{STUDY}.json").write_text(json.dumps({"sop_instance_uids": _sops(ct)}))
    assert _route(archive, state, study_record(study), _arrived(ct[0], 1), rules=PLAIN_AND_ALERT) == [
        ct[0]["sop_instance_uid"]
    ]
    assert _route(archive, state, study_record(study), _arrived(ct[0], 1), rules=PLAIN_AND_ALERT) == []
    assert _route(archive, state, study_record(study), _alert("a1"), rules=PLAIN_AND_ALERT) == [mr["sop_instance_uid"]]
