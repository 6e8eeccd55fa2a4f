"""A study routed on its dose alerts: the destination gets each instance once, however many alerts the
study raises or the dose worker publishes again (a crash, a replay), and the instances that arrive
after an alert when another one comes. The record is the destination's (sent.py), shared with its
whole_study rules. Real DICOM files in an archive folder, the aggregates' own fold for the study's
state, a recording sender (what is tested is what the worker decides to send)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.access.routing.rules import RoutingRules, parse_rules
from diana.access.routing.senders import Outcome, Result
from diana.access.routing.worker import RouteWorker, WorkerSettings
from diana.config import KafkaConfig
from diana.durable import sha256_file
from diana.schemas.codec import default_codec
from diana.schemas.topics import DOSE_ALERTS
from diana.storage import FilesystemStore
from diana.stream_apps.aggregate_fold import complete_series, study_record
from tests.support.dicomgen import make_instance
from tests.unit.test_routing_amended import _amend, _config, _fold, _message
from tests.unit.test_routing_waits import STUDY, _archive, _Dead, _Recorder

WS = {"name": "ws", "ae_title": "WS", "host": "127.0.0.1", "port": 1}
ALERTED = {"name": "alerted", "match": {"dose_alert": True}, "destinations": ["ws"]}
ALERT_RULES = parse_rules({"destinations": [WS], "rules": [ALERTED]})
# The same destination also gets CT studies whole; its alert rule takes every modality.
BOTH_RULES = parse_rules(
    {
        "destinations": [WS],
        "rules": [ALERTED, {"name": "ct", "match": {"modality": "CT"}, "whole_study": True, "destinations": ["ws"]}],
    }
)


def _alert(alert_id: str, metric: str = "ctdivol", offset: int = 1) -> Message:
    alert = {
        "alert_id": alert_id,
        "revision": 1,
        "raised_at": 0,
        "rule": metric,
        "rule_type": "threshold",
        "metric": metric,
        "value": 80.0,
        "threshold": 60.0,
        "study_instance_uid": STUDY,
        "message": "over the reference level",
    }
    value = default_codec().encode(DOSE_ALERTS.value_schema, alert)
    return Message(topic=DOSE_ALERTS.name, partition=0, offset=offset, value=value)


def _worker(
    settings: WorkerSettings, study: dict, sender: _Recorder | None = None, rules: RoutingRules = ALERT_RULES
) -> RouteWorker:
    """Destination ws's worker, the study's indexed aggregate ``study``."""
    return RouteWorker(
        KafkaConfig(),
        rules.destinations["ws"],
        rules.rules_for("ws"),
        sender or _Recorder(),
        settings,
        threading.Event(),
        lambda uid: study,
    )


def _route(
    archive: Path,
    state: Path,
    study: dict,
    *messages: Message,
    rules: RoutingRules = ALERT_RULES,
    sender: _Recorder | None = None,
) -> list[str]:
    """A router started afresh (its record read from ``state``), the study's indexed aggregate ``study``,
    delivers the messages: what it sent. Nothing is dead-lettered."""
    sender = sender or _Recorder()
    settings = WorkerSettings("g", FilesystemStore(archive), 5, max_backoff_s=0.2, archive_wait_s=3, sent_dir=state)
    worker = _worker(settings, study, sender, rules)
    dead = _Dead()
    assert worker.deliver(list(messages), dead) is True and dead.letters == []
    return sender.sent


def _complete_study(archive: Path, images: int = 3) -> tuple[list[str], dict, dict]:
    """(its instances, the aggregates' study state, the series state): one CT series, complete."""
    events = _archive(archive, {generate_uid(): images})
    series, study = _fold(events, None, None, 0)
    series, study, _ = complete_series(series, study)
    return [e["sop_instance_uid"] for e in events], study, series


def _mr_instance(archive: Path) -> dict:
    """An MR image of STUDY in its own series, archived; its InstanceArrived-like event."""
    series_uid = generate_uid()
    ds = make_instance(STUDY, series_uid, 1, patient_id="ROUTE1", study_date="20261130", modality="MR")
    path = archive / STUDY / series_uid / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return {
        "study_instance_uid": STUDY,
        "series_instance_uid": series_uid,
        "sop_instance_uid": ds.SOPInstanceUID,
        "sop_class_uid": ds.SOPClassUID,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "instance_number": 1,
        "modality": "MR",
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path)[0],
    }


def test_several_alerts_for_one_study_send_it_once(tmp_path: Path):
    """CTDIvol and DLP over their levels: two alerts. Before, each sent the whole study."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, _ = _complete_study(archive)
    record = state / f"{STUDY}.json"

    class Recorder(_Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.recorded_while_sending: list[bool] = []

        def send(self, items, attempt):
            self.recorded_while_sending.append(record.exists())
            return super().send(items, attempt)

    sender = Recorder()
    sent = _route(archive, state, study_record(study), _alert("a1"), _alert("a2", "dlp", 2), sender=sender)
    assert sorted(sent) == sorted(images)
    assert sender.recorded_while_sending == [False] and record.exists()  # recorded once delivered, not before
    # A third alert (another irradiation event) later, from a router started again: nothing.
    assert _route(archive, state, study_record(study), _alert("a3", "dlp", 3)) == []


def test_an_alert_after_late_instances_sends_only_those(tmp_path: Path):
    """The alert came, the study was sent; a late image and a late series (a dose report after the
    images' quiet time) amend it, and the dose worker publishes an alert again: only the late ones go.
    While the late series is still open, the alert waits for it."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, series = _complete_study(archive)
    assert sorted(_route(archive, state, study_record(study), _alert("a1"))) == sorted(images)

    late_image = _archive(archive, {series["series_instance_uid"]: 1})
    late_series = _archive(archive, {generate_uid(): 1})
    series, study = _fold(late_image, series, study, 120)
    other, study = _fold(late_series, None, study, 121)
    mid_amendment = study_record(study)
    waiting = _worker(WorkerSettings("g", FilesystemStore(archive), 5, sent_dir=state), mid_amendment)
    assert waiting.plan(_alert("a2", "dlp", 2))[0] is None  # the late series not quiet yet: waits
    series, study, _ = complete_series(series, study)
    other, study, _ = complete_series(other, study)
    assert study["status"] == "AMENDED" and study["instance_count"] == 5
    late = [e["sop_instance_uid"] for e in late_image + late_series]
    assert sorted(_route(archive, state, study_record(study), _alert("a2", "dlp", 2))) == sorted(late)


def test_a_replayed_alert_sends_nothing(tmp_path: Path):
    """The dose worker publishes the study's alerts again (after a crash, `diana replay diana-dose`), or
    the router's batch comes again (a crash before its commit): nothing is sent again."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, _ = _complete_study(archive)
    assert sorted(_route(archive, state, study_record(study), _alert("a1"))) == sorted(images)
    assert _route(archive, state, study_record(study), _alert("a1")) == []
    assert _route(archive, state, study_record(study), _alert("a1"), _alert("a1", offset=7)) == []


def test_late_instances_of_an_alerted_study_follow_its_next_complete_record(tmp_path: Path):
    """Before, a destination with dose_alert rules only never got a study's late instances unless the
    study raised another alert (a late image never does). Now its AMENDED record, complete again,
    sends them; while the late series is still open, nothing; the records again, nothing."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, series = _complete_study(archive)
    assert sorted(_route(archive, state, study_record(study), _alert("a1"))) == sorted(images)
    assert json.loads((state / f"{STUDY}.json").read_text())["alerted"] is True
    late, mid_amendment, complete_again = _amend(archive, (series, study))
    assert _route(archive, state, study_record(study), mid_amendment) == []
    assert sorted(_route(archive, state, study_record(study), complete_again)) == sorted(late)
    assert _route(archive, state, study_record(study), complete_again, _alert("a1")) == []


def test_a_complete_record_before_the_first_alert_in_one_batch_sends_the_late_instances(tmp_path: Path):
    """Review: the destination behind, its batch holds the study's AMENDED record (complete again) and
    then its first alert, the index still at the COMPLETED aggregate. The alert is planned first: it
    sends what the aggregate lists, and the record the late series' instance. Before, the record came
    first (not alerted yet: nothing) and the late series was never sent."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, series = _complete_study(archive)
    late, _, complete_again = _amend(archive, (series, study))
    sent = _route(archive, state, study_record(study), complete_again, _alert("a1"))
    assert sorted(sent) == sorted(images + late)
    assert json.loads((state / f"{STUDY}.json").read_text())["alerted"] is True


def test_a_study_uid_that_is_no_uid_gets_no_record_file(tmp_path: Path):
    """Review: an alert's study comes from the index; a value there that is no UID is never a file name."""
    from diana.access.routing.sent import StudiesSent

    state = tmp_path / "state" / "ws"
    state.mkdir(parents=True)
    record = StudiesSent("ws", state)
    record.claim_alert("../escaped")
    record.claim("../escaped", {"1.2.3": None})
    record.delivered("../escaped", "1.2.3")
    record.write_delivered()
    assert list(tmp_path.rglob("*.json")) == []


def test_the_complete_record_of_a_study_never_alerted_sends_nothing(tmp_path: Path):
    """Neither its COMPLETED nor its AMENDED record: the dose_alert rule is the alert's, the study
    records only carry its late instances on. Nor do they list the archive for it."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    _, study, series = _complete_study(archive)
    completed = _message(study, 1)
    _, _, complete_again = _amend(archive, (series, study))

    class Unlisted(FilesystemStore):
        def list(self, prefix: str):
            raise AssertionError(f"the archive listed for {prefix}")

    worker = _worker(WorkerSettings("g", Unlisted(archive), 5, max_backoff_s=0.2, sent_dir=state), study_record(study))
    assert worker.plan(completed) == ([], "") and worker.plan(complete_again) == ([], "")
    assert not (state / f"{STUDY}.json").exists()


def test_a_record_written_before_the_alerted_flag_waits_for_an_alert(tmp_path: Path):
    """A record of an older version (no "alerted"): its late instances go with the next alert, as
    they did, not with the study record."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, series = _complete_study(archive)
    state.mkdir()
    (state / f"{STUDY}.json").write_text(json.dumps({"sop_instance_uids": images}))
    late, _, complete_again = _amend(archive, (series, study))
    assert _route(archive, state, study_record(study), complete_again) == []
    amended = default_codec().decode(complete_again.value())[1]
    assert sorted(_route(archive, state, amended, _alert("a2", "dlp", 2))) == sorted(late)
    assert json.loads((state / f"{STUDY}.json").read_text())["alerted"] is True


@pytest.mark.parametrize("order", ["study first", "alert first", "one batch"])
def test_whole_study_and_dose_alert_rules_of_one_destination_share_what_was_sent(tmp_path: Path, order: str):
    """A CT study with an MR series: the whole_study rule (CT) sends the CT; the alert rule (any
    modality) sends only the MR it was not sent, and either way round nothing goes twice."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    ct_events, mr = _archive(archive, {generate_uid(): 3}), _mr_instance(archive)
    ct_series, study = _fold(ct_events, None, None, 0)
    mr_series, study = _fold([mr], None, study, 1)
    ct_series, study, _ = complete_series(ct_series, study)
    mr_series, study, _ = complete_series(mr_series, study)
    assert study["status"] == "COMPLETED" and study["instance_count"] == 4
    images = [e["sop_instance_uid"] for e in ct_events]
    completed, alert = _message(study, 1), _alert("a1", offset=2)
    everything = sorted([*images, mr["sop_instance_uid"]])

    if order == "study first":
        assert sorted(_route(archive, state, study_record(study), completed, rules=BOTH_RULES)) == sorted(images)
        assert _route(archive, state, study_record(study), alert, rules=BOTH_RULES) == [mr["sop_instance_uid"]]
    elif order == "alert first":
        assert sorted(_route(archive, state, study_record(study), alert, rules=BOTH_RULES)) == everything
        assert _route(archive, state, study_record(study), completed, rules=BOTH_RULES) == []
    else:
        assert sorted(_route(archive, state, study_record(study), completed, alert, rules=BOTH_RULES)) == everything
    # Either record again, or both: nothing.
    assert _route(archive, state, study_record(study), completed, alert, rules=BOTH_RULES) == []


def test_a_removed_or_unreadable_record_sends_the_study_again(tmp_path: Path):
    """At least once, never fewer: also the way to send a study again on purpose."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, _ = _complete_study(archive)
    assert sorted(_route(archive, state, study_record(study), _alert("a1"))) == sorted(images)
    (state / f"{STUDY}.json").unlink()
    assert sorted(_route(archive, state, study_record(study), _alert("a1"))) == sorted(images)
    (state / f"{STUDY}.json").write_text("not json")
    assert sorted(_route(archive, state, study_record(study), _alert("a1"))) == sorted(images)
    assert _route(archive, state, study_record(study), _alert("a1")) == []  # recorded again


def test_an_instance_dead_lettered_for_the_destination_is_tried_again_by_the_next_alert(tmp_path: Path):
    """Refused max_attempts times (a destination in maintenance), it is dead-lettered (the dead letter
    says so) and not recorded: the study's next alert tries it again. Before, it was recorded with what
    was delivered, and no later alert or completion sent it (nor the dead letter's replay: the record
    listed it)."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    images, study, _ = _complete_study(archive)
    refused = images[0]

    class Refuses(_Recorder):
        def send(self, items, attempt):
            out = []
            for item in items:
                if item.sop_instance_uid == refused:
                    out.append(Result(Outcome.FAILED, "0xC000"))
                else:
                    self.sent.append(item.sop_instance_uid)
                    out.append(Result(Outcome.DELIVERED))
            return out

    sender = Refuses()
    settings = WorkerSettings("g", FilesystemStore(archive), 2, max_backoff_s=0.05, sent_dir=state)
    worker = _worker(settings, study_record(study), sender)
    dead = _Dead()
    assert worker.deliver([_alert("a1")], dead) is True
    assert sorted(sender.sent) == sorted(images[1:]) and len(dead.letters) == 1 and refused in dead.letters[0]
    assert _route(archive, state, study_record(study), _alert("a2", "dlp", 2)) == [refused]
    assert _route(archive, state, study_record(study), _alert("a3", "dlp", 3)) == []  # delivered: recorded


def test_route_checks_the_record_folder_of_a_dose_alert_destination_at_start(tmp_path: Path):
    """As for a whole_study destination: made at start, and a folder that cannot be written stops
    `diana route` there. A destination with plain rules only gets none (it keeps no record)."""
    from diana.access.routing.service import build_workers
    from diana.config import ConfigError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError) as failed:
        build_workers(_config(tmp_path, str(tmp_path / "a-file")), ALERT_RULES, threading.Event())
    assert "[routing] state_dir" in str(failed.value) and "'ws'" in str(failed.value)

    plain = parse_rules(
        {
            "destinations": [WS, {**WS, "name": "plain"}],
            "rules": [ALERTED, {"name": "ct", "match": {"modality": "CT"}, "destinations": ["plain"]}],
        }
    )
    workers = build_workers(_config(tmp_path, str(tmp_path / "routing-state")), plain, threading.Event())
    assert sorted(p.name for p in (tmp_path / "routing-state").iterdir()) == ["ws"]
    assert list((tmp_path / "routing-state" / "ws").iterdir()) == []
    for worker in workers:
        worker.sender.close()
