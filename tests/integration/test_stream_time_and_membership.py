"""The aggregates worker on the real broker: event time a fast receiver clock cannot break, one
amended version for a burst of late instances, and a restart under static membership that moves
no partition of the other worker.

Events are written straight to dicom.instances (events only: the archive sink dead-letters them
as never landed, which these tests do not look at). The test pipeline's quiet time is 4 s.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime, timedelta

from confluent_kafka import Consumer
from pydicom.uid import generate_uid

from diana.schemas.topics import INSTANCES, SERIES, STUDIES, TICKS
from tests.support.helpers import topic_records, wait_until_caught_up
from tests.support.paths import port
from tests.support.stream_events import instance_event
from tests.support.stream_events import send_events as _send
from tests.support.stream_events import wait_for as _wait_for


def _event(study: str, series: str, number: int, received_at: datetime) -> dict:
    return instance_event(study, series, number, "EVENTTIME", received_at=received_at)


def _revisions(cfg, topic: str, key: str) -> list[dict]:
    return sorted((r for k, r in topic_records(cfg, topic) if k == key.encode()), key=lambda r: r["revision"])


def test_a_receiver_clock_ten_minutes_fast_does_not_complete_series_early(pipeline):
    cfg = pipeline.cfg
    study, honest, fast = generate_uid(), generate_uid(), generate_uid()
    now = datetime.now(UTC)
    # One study, so one partition: the fast receiver's event lands between the honest ones.
    _send(
        cfg,
        [
            _event(study, honest, 1, now),
            _event(study, honest, 2, now),
            _event(study, fast, 1, now + timedelta(minutes=10)),
            _event(study, honest, 3, now),
        ],
    )
    records = _wait_for(
        lambda: (r := _revisions(cfg, SERIES.name, honest)) and r[-1]["status"] != "UPDATED" and r,
        what="the honest series completed",
    )
    time.sleep(6)  # a later revision, if any, would come within a quiet time
    records = _revisions(cfg, SERIES.name, honest)
    # Trusting the fast clock, the watermark jumped 10 minutes: the honest series completed with 2
    # instances and the third amended it. Bounded by the broker's append time, it completes once.
    # (A transaction publishes only its last revision per series: which UPDATED ones appear depends
    # on how the four events were batched, each shows its own count.)
    assert [(r["status"], r["instance_count"]) for r in records if r["status"] != "UPDATED"] == [("COMPLETED", 3)]
    assert all(r["instance_count"] == r["revision"] for r in records if r["status"] == "UPDATED")
    [fast_done] = [r for r in _revisions(cfg, SERIES.name, fast) if r["status"] == "COMPLETED"]
    # Its arrival is the broker's time, not 10 minutes ahead: it completed after 4 s of quiet.
    assert fast_done["last_received_at"] < now + timedelta(minutes=1)
    assert fast_done["completed_at"] < now + timedelta(minutes=1)


def test_two_hundred_late_instances_give_one_amended_revision(pipeline):
    cfg = pipeline.cfg
    study, series = generate_uid(), generate_uid()
    _send(cfg, [_event(study, series, n, datetime.now(UTC)) for n in (1, 2, 4)])
    first = _wait_for(
        lambda: (r := _revisions(cfg, SERIES.name, series)) and r[-1]["status"] == "COMPLETED" and r[-1],
        what="the series completed",
    )
    assert (first["verdict"], first["missing_instance_numbers"]) == ("GAPS", [3])

    late = [3, *range(5, 204)]
    assert len(late) == 200
    _send(cfg, [_event(study, series, n, datetime.now(UTC)) for n in late])
    _wait_for(lambda: _revisions(cfg, SERIES.name, series)[-1]["status"] == "AMENDED", what="the amended revision")
    time.sleep(8)  # two quiet times: any further amended revision would be out by now
    amended = [r for r in _revisions(cfg, SERIES.name, series) if r["status"] == "AMENDED"]
    assert [(r["version"], r["instance_count"], r["verdict"], r["missing_instance_numbers"]) for r in amended] == [
        (2, 203, "COMPLETE", [])
    ]
    studies = [r for r in _revisions(cfg, STUDIES.name, study) if r["status"] == "AMENDED"]
    assert [(r["version"], r["instance_count"], r["verdict"]) for r in studies] == [(2, 203, "COMPLETE")]


def _log_count(pipeline, name: str, event: str) -> int:
    if not (pipeline.logs / f"{name}.log").exists():  # not started yet in this session
        return 0
    return len(re.findall(re.escape(event), pipeline.log_text(name)))


def _in_group(pipeline, name: str) -> bool:
    """Whether the worker's last assignment event is an assignment (not a revoke, nor none yet)."""
    if not (pipeline.logs / f"{name}.log").exists():
        return False
    text = pipeline.log_text(name)
    left = ("partitions.revoked", "consumer.fatal", "consumer.outside_group")  # a replaced consumer logs no revoke
    return text.rfind("partitions.assigned") > max(text.rfind(event) for event in left)


def test_a_worker_restart_with_static_membership_moves_no_partition_of_the_other(pipeline):
    cfg = pipeline.cfg
    second = {"DIANA_STREAM_WEB_PORT": str(port(16067))}
    # The log file is appended to by every start of "aggregates-2" in the session (the two-worker
    # test of test_aggregates_stream.py starts one too): count from here, not from 0.
    assigned_before_start = _log_count(pipeline, "aggregates-2", "partitions.assigned")
    pipeline.start("aggregates-2", "aggregate", settings=second)
    try:
        _wait_for(
            lambda: _log_count(pipeline, "aggregates-2", "partitions.assigned") > assigned_before_start,
            what="the second worker assigned",
        )
        time.sleep(5)  # the group settles on two members
        other = {e: _log_count(pipeline, "aggregates", e) for e in ("partitions.assigned", "partitions.revoked")}
        restarts_before = _log_count(pipeline, "aggregates-2", "partitions.assigned")

        pipeline.procs["aggregates-2"].send_signal(signal.SIGKILL)
        pipeline.procs.pop("aggregates-2").wait()
        killed = time.monotonic()
        pipeline.start("aggregates-2", "aggregate", settings=second)  # same port, same data_dir: same id
        _wait_for(
            lambda: _log_count(pipeline, "aggregates-2", "partitions.assigned") > restarts_before,
            what="the restarted worker got its partitions back",
        )
        back_after = time.monotonic() - killed
        print(f"restarted worker assigned again {back_after:.1f} s after the kill")

        # A study sent now is aggregated whole, wherever its partition is.
        study, series = generate_uid(), generate_uid()
        _send(cfg, [_event(study, series, n, datetime.now(UTC)) for n in (1, 2, 3)])
        done = _wait_for(
            lambda: (r := _revisions(cfg, SERIES.name, series)) and r[-1]["status"] == "COMPLETED" and r[-1],
            what="a study aggregated after the restart",
        )
        assert done["instance_count"] == 3
        # The other worker kept its partitions throughout: no revocation, no new assignment.
        assert {e: _log_count(pipeline, "aggregates", e) for e in other} == other
        assert pipeline.procs["aggregates"].poll() is None
    finally:
        pipeline.stop("aggregates-2")
    wait_until_caught_up(cfg, timeout=240)


def test_a_worker_fenced_by_its_own_static_id_joins_again_and_keeps_aggregating(pipeline):
    """A fatal consumer error must not leave the worker running with partitions that stand still.

    After a broker restart the fault suite saw the worker's consumer fenced ("Static consumer fenced
    by other consumer with same group.instance.id") with no other worker running; the worker then
    logged the error and aggregated nothing more. Here a second member joins under the worker's
    own id, which fences the worker's consumer the same way.
    """
    cfg = pipeline.cfg
    worker_id = (
        (cfg.path(cfg.stream.data_dir) / f"{cfg.stream.app_id}-{cfg.stream.web_port}.worker-id").read_text().strip()
    )
    # The intruder must join after the worker: joining first, it would be the one fenced by the worker.
    _wait_for(lambda: _in_group(pipeline, "aggregates"), what="the worker's assignment")
    fatal_before = _log_count(pipeline, "aggregates", "consumer.fatal")
    intruder = Consumer(
        {
            "bootstrap.servers": cfg.kafka.bootstrap,
            "group.id": cfg.stream.app_id,
            "group.instance.id": worker_id,
            "partition.assignment.strategy": "range",
            "session.timeout.ms": 10_000,
            "enable.auto.commit": False,
        }
    )
    intruder.subscribe([INSTANCES.name, TICKS.name])
    try:
        _wait_for(lambda: (intruder.poll(0.5), intruder.assignment())[1], what="the intruder's assignment")
    finally:
        intruder.close()  # a static member does not leave the group: the worker must take its place
    _wait_for(
        lambda: _log_count(pipeline, "aggregates", "consumer.fatal") > fatal_before, what="the worker seeing the fence"
    )
    study, series = generate_uid(), generate_uid()
    _send(cfg, [_event(study, series, n, datetime.now(UTC)) for n in (1, 2, 3)])
    done = _wait_for(
        lambda: (r := _revisions(cfg, SERIES.name, series)) and r[-1]["status"] == "COMPLETED" and r[-1],
        what="a study aggregated after the fence",
    )
    assert done["instance_count"] == 3
    assert pipeline.procs["aggregates"].poll() is None
    wait_until_caught_up(cfg, timeout=240)
