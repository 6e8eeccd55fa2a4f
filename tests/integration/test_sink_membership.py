"""A sink's consumer that stopped taking part in its group is found and replaced without losing an
event, on the real Kafka (diana/group_membership.py; docs/RELIABILITY.md, "broker-down: an archive sink that
never rejoined its group").

The consumer CI saw, alive and polling with its group EMPTY, was never reproduced on purpose. A real
state stands in for it: a static member fenced by another with its instance id (librdkafka's fatal
error), which stays alive and polling and sends its group nothing more.
"""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka.admin import NewTopic

from diana.clients import kafka_admin, kafka_consumer
from diana.group_membership import GroupWatch
from diana.sinks.consumer import REPLACED_CONSUMERS, TOPICS_MISSING, run_sink
from tests.support.helpers import committed_offset, produce_events, topic_with_events

SESSION_S = 6.0  # the broker's smallest (group.min.session.timeout.ms)
# A heartbeat every second, well inside the 3 s limits below (librdkafka's default is 3 s: a member
# could then be silent for a whole limit on a loaded machine).
HEARTBEAT = {"heartbeat.interval.ms": 1000}


def _wait(condition, timeout: float, what: str, step=lambda: time.sleep(0.1)) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        step()


def _static_member(cfg, group: str, instance_id: str, watch: GroupWatch | None = None):
    settings = {
        "group.instance.id": instance_id,
        "session.timeout.ms": int(SESSION_S * 1000),
        "partition.assignment.strategy": "cooperative-sticky",  # the sinks' own: one group, one protocol
        "enable.auto.commit": False,
        **HEARTBEAT,
    }
    return kafka_consumer(cfg.kafka, group, {**settings, **(watch.settings() if watch else {})})


def test_a_fenced_member_is_found_stuck_and_its_successor_never(stack, cfg):
    topic = topic_with_events(cfg, "test-membership-fenced", 0)
    group = f"test-membership-{uuid.uuid4().hex[:8]}"
    watch_fenced, watch_successor = GroupWatch(limit_s=3.0, interval_s=0.5), GroupWatch(limit_s=3.0, interval_s=0.5)
    fenced = _static_member(cfg, group, "the-same-id", watch_fenced)
    successor = _static_member(cfg, group, "the-same-id", watch_successor)
    try:
        fenced.subscribe([topic])
        _wait(lambda: fenced.assignment(), 60, "the first member's assignment", lambda: fenced.poll(0.2))
        successor.subscribe([topic])
        _wait(lambda: successor.assignment(), 60, "the successor's assignment", lambda: successor.poll(0.2))
        started, stuck_at = time.monotonic(), None
        while time.monotonic() - started < 12.0:  # four limits: the successor must never be counted stuck
            fenced.poll(0.05)  # the fenced consumer keeps polling, as the stuck sink did
            successor.poll(0.05)
            if stuck_at is None and watch_fenced.stuck:
                stuck_at = time.monotonic() - started
            assert not watch_successor.stuck, "a member taking part in its group was counted stuck"
        assert stuck_at is not None, "the fenced member was never counted stuck"
        assert stuck_at >= 3.0 - 0.5, stuck_at  # never before the limit (less the first report's offset)
    finally:
        successor.close()
        fenced.close()


class _Recording:
    """A sink that keeps what it was given."""

    name = "test-membership-sink"

    def __init__(self, topic: str):
        self.topics = [topic]
        self.values: list[bytes] = []

    def write(self, batch, dead) -> None:
        self.values += [msg.value() for msg in batch]


def _sink_thread(sink, cfg, group: str, stop: threading.Event, settings: dict) -> tuple[threading.Thread, list]:
    """``run_sink`` started on a thread of its own, with a 3 s limit; what it raised goes to the list."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            run_sink(
                sink,
                cfg.kafka,
                group,
                stop,
                session_timeout_s=SESSION_S,
                stuck_after_s=3.0,
                extra_settings={**settings, **HEARTBEAT},
            )
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failures


def test_a_sink_replaces_its_fenced_consumer_and_loses_nothing(stack, cfg):
    topic = topic_with_events(cfg, "test-membership-sink", 50)
    group = f"test-membership-sink-{uuid.uuid4().hex[:8]}"
    instance_id = f"sink-{uuid.uuid4().hex[:8]}"
    sink = _Recording(topic)
    replaced = REPLACED_CONSUMERS.labels(sink.name)
    replaced_before = replaced._value.get()
    stop = threading.Event()
    thread, failures = _sink_thread(sink, cfg, group, stop, {"group.instance.id": instance_id})
    intruder = None
    try:
        _wait(lambda: len(set(sink.values)) >= 50, 60, "the first 50 events written")
        time.sleep(8.0)  # more than two limits and two reports: a member of its group must be kept
        assert replaced._value.get() == replaced_before, "a consumer taking part in its group was replaced"
        # Another member with the sink's instance id: the sink's consumer is fenced, alive and polling.
        intruder = _static_member(cfg, group, instance_id)
        intruder.subscribe([topic])
        _wait(lambda: intruder.assignment(), 60, "the intruder's assignment", lambda: intruder.poll(0.2))
        intruder.pause(intruder.assignment())  # it takes nothing: every event must reach the sink
        produce_events(cfg, topic, range(50, 100))
        _wait(
            lambda: replaced._value.get() > replaced_before,
            60,
            "the fenced consumer replaced",
            lambda: intruder.poll(0.2),
        )
        _wait(lambda: len(set(sink.values)) >= 100, 60, "all 100 events written", lambda: intruder.poll(0.2))
        time.sleep(8.0)  # the new consumer takes part in its group: kept
        assert replaced._value.get() == replaced_before + 1, "replaced more than once"
    finally:
        stop.set()
        thread.join(60)
        if intruder is not None:
            intruder.close()
    assert not failures, failures
    assert not thread.is_alive(), "the sink did not stop"
    assert set(sink.values) == {f"event {i}".encode() for i in range(100)}
    _wait(lambda: committed_offset(cfg, group, topic) == 100, 30, "the group's offset at the end of the topic")


def test_a_sink_waiting_for_its_topic_to_be_created_keeps_its_consumer(stack, cfg):
    # Subscribed to a topic not created yet, a librdkafka consumer sends its group nothing, and its watch
    # counts it stuck: the sink replaced it every three sessions until the topic appeared.
    topic = f"test-membership-later-{uuid.uuid4().hex[:8]}"
    group = f"test-membership-later-{uuid.uuid4().hex[:8]}"
    sink = _Recording(topic)
    replaced = REPLACED_CONSUMERS.labels(sink.name)
    replaced_before = replaced._value.get()
    missing = TOPICS_MISSING.labels(sink.name)
    missing_before = missing._value.get()
    stop = threading.Event()
    # it learns of the new topic at its next metadata refresh
    thread, failures = _sink_thread(sink, cfg, group, stop, {"topic.metadata.refresh.interval.ms": 1000})
    try:
        time.sleep(10.0)  # three limits and more
        assert replaced._value.get() == replaced_before, "a consumer waiting for its topic was replaced"
        assert missing._value.get() > missing_before, "the watch never found it silent: nothing was tested"
        admin = kafka_admin(cfg.kafka)  # kept until the topic exists
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        produce_events(cfg, topic, range(20))
        _wait(lambda: len(set(sink.values)) >= 20, 60, "the events of the topic created later")
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    assert not thread.is_alive(), "the sink did not stop"
    assert replaced._value.get() == replaced_before, "replaced after all"
    assert set(sink.values) == {f"event {i}".encode() for i in range(20)}
