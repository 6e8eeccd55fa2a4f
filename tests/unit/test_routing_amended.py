"""A study routed whole, then amended by late instances: the destination gets the late instances once,
not the whole study again, and a replay of either record sends nothing again. The study records are
the aggregates' own fold (aggregate_fold.py); the instances are real files in an archive folder; the
destination is a recording sender (what is tested is what the worker decides to send)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.access.routing.rules import parse_rules
from diana.access.routing.worker import RouteWorker, WorkerSettings
from diana.config import KafkaConfig
from diana.schemas.codec import default_codec
from diana.schemas.topics import STUDIES
from diana.storage import FilesystemStore
from diana.stream_apps.aggregate_fold import apply_instance, complete_series, study_record
from tests.unit.test_routing_waits import QUIET, T0, _archive, _Dead, _Recorder

RULES = parse_rules(
    {
        "destinations": [{"name": "ws", "ae_title": "WS", "host": "127.0.0.1", "port": 1}],
        "rules": [{"name": "ct", "match": {"modality": "CT"}, "whole_study": True, "destinations": ["ws"]}],
    }
)


def _message(study: dict, offset: int) -> Message:
    value = default_codec().encode(STUDIES.value_schema, study_record(study))
    return Message(topic=STUDIES.name, partition=0, offset=offset, value=value)


def _deliver(archive: Path, state: Path, *messages: Message) -> list[str]:
    """A router (started afresh: its record read from ``state``) delivers the messages; what it sent."""
    sender = _Recorder()
    settings = WorkerSettings("g", FilesystemStore(archive), 5, max_backoff_s=0.2, archive_wait_s=3, sent_dir=state)
    worker = RouteWorker(
        KafkaConfig(), RULES.destinations["ws"], RULES.rules_for("ws"), sender, settings, threading.Event()
    )
    dead = _Dead()
    assert worker.deliver(list(messages), dead) is True and dead.letters == []
    return sender.sent


def _fold(events: list[dict], series: dict | None, study: dict | None, at_s: int) -> tuple[dict, dict]:
    for n, event in enumerate(events):
        series, study = apply_instance(series, study, {**event, "received_at": T0 + timedelta(seconds=at_s + n)}, QUIET)
    assert series is not None and study is not None
    return series, study


def _completed_study(archive: Path) -> tuple[list[str], tuple[dict, dict], Message]:
    """(its instances, the aggregates' state, its COMPLETED record): one series of 3 CT images."""
    first = _archive(archive, {generate_uid(): 3})
    series, study = _fold(first, None, None, 0)
    series, study, _ = complete_series(series, study)
    return [e["sop_instance_uid"] for e in first], (series, study), _message(study, 1)


def _amend(archive: Path, state: tuple[dict, dict]) -> tuple[list[str], Message, Message]:
    """(the late instances, the AMENDED record mid-way, the AMENDED record complete again): a late image
    of the completed series and a new series (a late dose report, say), archived after the completion."""
    series, study = state
    late_image, late_report = (
        _archive(archive, {series["series_instance_uid"]: 1}),
        _archive(archive, {generate_uid(): 1}),
    )
    series, study = _fold(late_image, series, study, 120)
    report_series, study = _fold(late_report, None, study, 121)
    mid_amendment = _message(study, 2)  # the late series are not quiet yet
    series, study, _ = complete_series(series, study)
    report_series, study, _ = complete_series(report_series, study)
    assert study["status"] == "AMENDED" and study["instance_count"] == 5
    return [e["sop_instance_uid"] for e in late_image + late_report], mid_amendment, _message(study, 3)


def test_an_amended_study_sends_its_late_instances_only_once(tmp_path: Path):
    """Before, a whole_study rule sent the study at COMPLETED only: late instances never went out."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    first, aggregates, completed = _completed_study(archive)
    assert sorted(_deliver(archive, state, completed)) == sorted(first)
    late, mid_amendment, amended = _amend(archive, aggregates)
    assert _deliver(archive, state, mid_amendment) == []  # a late series still open: wait for the next record
    assert sorted(_deliver(archive, state, amended)) == sorted(late)
    # Replays (a crash before the commit, or `diana replay` of the group): nothing sent again.
    assert _deliver(archive, state, completed, mid_amendment, amended) == []


def test_records_of_one_study_in_one_batch_send_each_instance_once(tmp_path: Path):
    """Also a router running behind: the COMPLETED record finds the late image archived already and
    sends it; the AMENDED record sends only the rest."""
    archive, state = tmp_path / "archive", tmp_path / "state"
    first, aggregates, completed = _completed_study(archive)
    late, mid_amendment, amended = _amend(archive, aggregates)
    sent = _deliver(archive, state, completed, mid_amendment, amended)
    assert sorted(sent) == sorted(first + late)


def test_an_amended_study_first_seen_or_with_its_record_removed_is_sent_whole(tmp_path: Path):
    """Its COMPLETED record compacted away (or superseded in the aggregates' transaction), or the record
    of what was sent removed: every instance goes, none is lost (at least once)."""
    archive = tmp_path / "archive"
    first, aggregates, _ = _completed_study(archive)
    late, _, amended = _amend(archive, aggregates)
    assert sorted(_deliver(archive, tmp_path / "state", amended)) == sorted(first + late)
    (record,) = (tmp_path / "state").iterdir()
    record.write_text("not json")  # unreadable: sent whole again, not never
    assert sorted(_deliver(archive, tmp_path / "state", amended)) == sorted(first + late)


def test_a_batch_not_delivered_records_nothing(tmp_path: Path):
    """Stopped while the destination was down: the same worker's next batch sends the study, and it is
    recorded only then (a claim kept from the stopped batch would have lost it)."""
    from diana.access.routing.senders import Outcome, Result

    class Down(_Recorder):
        def send(self, items, archive):
            return [Result(Outcome.UNAVAILABLE, "connection refused")] * len(items)

    archive, state = tmp_path / "archive", tmp_path / "state"
    first, _, completed = _completed_study(archive)
    settings = WorkerSettings("g", FilesystemStore(archive), 5, max_backoff_s=0.2, sent_dir=state)
    stop = threading.Event()
    worker = RouteWorker(KafkaConfig(), RULES.destinations["ws"], RULES.rules_for("ws"), Down(), settings, stop)
    stop.set()
    assert worker.deliver([completed], _Dead()) is False and not state.exists()
    stop.clear()
    worker.sender = up = _Recorder()
    assert worker.deliver([completed], _Dead()) is True and sorted(up.sent) == sorted(first)
    assert _deliver(archive, state, completed) == []


def _config(tmp_path: Path, state_dir: str):
    from diana.config import load_config

    (tmp_path / "archive").mkdir(exist_ok=True)
    path = tmp_path / "diana.toml"
    path.write_text(f'[storage]\narchive_dir = "{tmp_path / "archive"}"\n\n[routing]\nstate_dir = "{state_dir}"\n')
    return load_config(path, environ={})


def test_route_does_not_start_when_the_record_of_a_whole_study_destination_cannot_be_written(tmp_path: Path):
    import pytest

    from diana.access.routing.service import build_workers
    from diana.config import ConfigError

    (tmp_path / "a-file").write_text("")  # a folder cannot be made under a file, whoever runs the test
    with pytest.raises(ConfigError) as failed:
        build_workers(_config(tmp_path, str(tmp_path / "a-file")), RULES, threading.Event())
    message = str(failed.value)
    assert "\n" not in message and "[routing] state_dir" in message and "'ws'" in message and "writable" in message


def test_route_makes_the_record_folder_of_each_whole_study_destination_at_start(tmp_path: Path):
    from diana.access.routing.service import build_workers

    (worker,) = build_workers(_config(tmp_path, str(tmp_path / "routing-state")), RULES, threading.Event())
    assert (tmp_path / "routing-state" / "ws").is_dir() and list((tmp_path / "routing-state" / "ws").iterdir()) == []
    worker.sender.close()
