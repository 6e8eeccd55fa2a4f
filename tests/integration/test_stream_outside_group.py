"""The stream worker's consumer, once counted outside its group, is replaced and the work goes on, on the
real Kafka (stream_apps/partition_assignment.py). Stop 30's CI saw the aggregates worker's consumer lose its
partitions 8 s after a broker restart and never get them back: diana-aggregates sat EMPTY while 351 events
waited. The counting itself (no group request for three sessions while connected) is
diana/group_membership.py's, tested in tests/unit/test_sink_membership.py and, on a fenced member, in
tests/integration/test_sink_membership.py; here the count is set, and the replacement must rejoin and lose
nothing."""

from __future__ import annotations

import signal
import threading
import time
import uuid

from confluent_kafka import Message

from diana.group_membership import GroupWatch
from diana.stream_apps.loop_settings import LoopSettings
from diana.stream_apps.partition_assignment import REPLACED_CONSUMERS
from diana.stream_apps.transactional import TransactionalLoop
from tests.support.helpers import committed_offset, produce_events, topic_with_events


class _Seen:
    """A handler that keeps no state and writes nothing: what it was given, in order."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self.started: list[int] = []

    def partition_started(self, partition, next_offsets, state) -> None:
        self.started.append(partition)

    def partition_stopped(self, partition) -> None:
        pass

    def handle(self, batch, message: Message) -> None:
        self.values.append(message.value())


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_worker_outside_its_group_joins_again_and_loses_nothing(stack, cfg):
    topic = topic_with_events(cfg, "test-stream-outside", 5)
    changelog = topic_with_events(cfg, "test-stream-outside-changelog", 0)
    group = f"test-stream-outside-{uuid.uuid4().hex[:8]}"
    settings = LoopSettings(
        kafka=cfg.kafka,
        group_id=group,
        transactional_id=f"{group}-w1",
        group_instance_id=f"{group}-w1",  # static, as the aggregates worker
        session_timeout_ms=6000,  # the broker's smallest
        topics=(topic,),
        changelog=changelog,
    )
    seen = _Seen()
    loop = TransactionalLoop(settings, seen)
    replaced_before = REPLACED_CONSUMERS.labels("outside_group")._value.get()
    failed: list[BaseException] = []

    def drive() -> None:
        """The test's steps, beside the loop (which runs on the main thread: it installs signal handlers)."""
        try:
            _wait(lambda: len(seen.values) == 5, 60, "the first five events")
            first_consumer = loop.consumer
            # What the statistics said of the consumer CI saw (see the docstring). A watch of its own, not
            # the consumer's: its next report (a heartbeat sent) would clear that one's flag.
            stuck = GroupWatch(limit_s=30.0, interval_s=5.0)
            stuck.stuck = True
            loop._watch = stuck
            _wait(lambda: loop.consumer is not first_consumer, 30, "a new consumer")
            produce_events(cfg, topic, range(5, 10))
            _wait(lambda: len(seen.values) >= 10, 90, "the events sent after the replacement")
            _wait(lambda: committed_offset(cfg, group, topic) == 10, 30, "the group's offsets committed to the end")
        except BaseException as exc:
            failed.append(exc)
        finally:
            loop.stop()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    driver = threading.Thread(target=drive, name="test-steps", daemon=True)
    driver.start()
    try:
        loop.run()  # installs its own signal handlers: pytest's are put back below
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    driver.join(30)
    if failed:
        raise failed[0]
    # Each event once, in order: the replacement resumed at the committed offset, nothing skipped.
    assert seen.values == [f"event {i}".encode() for i in range(10)]
    assert seen.started.count(0) == 2  # assigned to the first consumer, then to its successor
    assert REPLACED_CONSUMERS.labels("outside_group")._value.get() == replaced_before + 1  # once only
