"""A sink's consumer that its group has lost is found, asked of the real broker, and replaced without
losing an event (sinks/membership.py; docs/RELIABILITY.md, "broker-down: an archive sink that never
rejoined its group").

The consumer seen on CI, alive and polling with its group EMPTY, was never reproduced on purpose. Two
real states stand in for it: a static member fenced by another with its instance id (alive, polling,
no longer in its group), and a sink whose watch asks about a group its consumer never joined.
"""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

from diana.clients import kafka_admin, kafka_consumer, kafka_producer
from diana.sinks.consumer import REPLACED_CONSUMERS, run_sink
from diana.sinks.membership import MembershipWatch
from tests.support.helpers import topic_with_events

SESSION_S = 6.0  # the broker's smallest (group.min.session.timeout.ms)


def _wait(condition, timeout: float, what: str, step=lambda: time.sleep(0.1)) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        step()


def test_the_watch_finds_a_fenced_member_outside_and_its_successor_inside(stack, cfg):
    topic = topic_with_events(cfg, "test-membership-fenced", 0)
    group = f"test-membership-{uuid.uuid4().hex[:8]}"
    settings = {"group.instance.id": "the-same-id", "session.timeout.ms": int(SESSION_S * 1000)}
    fenced = kafka_consumer(cfg.kafka, group, settings)
    successor = kafka_consumer(cfg.kafka, group, settings)
    admin = kafka_admin(cfg.kafka)
    try:
        fenced.subscribe([topic])
        _wait(lambda: fenced.assignment(), 60, "the first member's assignment", lambda: fenced.poll(0.2))
        fenced_id = fenced.memberid()
        successor.subscribe([topic])
        _wait(lambda: successor.assignment(), 60, "the successor's assignment", lambda: successor.poll(0.2))
        assert successor.memberid() != fenced_id

        watch_fenced = MembershipWatch(admin, group, limit_s=2.0, interval_s=0.3)
        watch_successor = MembershipWatch(admin, group, limit_s=2.0, interval_s=0.3)
        lost_at = None
        started = time.monotonic()
        while time.monotonic() - started < 8.0:  # four limits: the successor must never be counted lost
            fenced.poll(0.05)  # the fenced consumer keeps polling, as the stuck sink did
            successor.poll(0.05)
            if lost_at is None and watch_fenced.stuck(fenced_id):
                lost_at = time.monotonic() - started
            assert not watch_successor.stuck(successor.memberid()), "a member of its group was counted lost"
        assert lost_at is not None, "the fenced member was never counted lost"
        assert 2.0 <= lost_at < 6.0, lost_at
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


def _committed(admin, group: str, topic: str) -> int:
    found = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])])
    return found[group].result(30).topic_partitions[0].offset


def test_a_sink_replaces_a_consumer_outside_its_group_and_loses_nothing(stack, cfg):
    topic = topic_with_events(cfg, "test-membership-sink", 50)
    group = f"test-membership-sink-{uuid.uuid4().hex[:8]}"
    admin = kafka_admin(cfg.kafka)
    sink = _Recording(topic)
    # Asked about a group its consumer never joins, the broker answers, truly, that it is not there.
    watch = MembershipWatch(admin, f"{group}-elsewhere", limit_s=3.0, interval_s=0.5)
    replaced = REPLACED_CONSUMERS.labels(sink.name)
    replaced_before = replaced._value.get()
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            run_sink(sink, cfg.kafka, group, stop, session_timeout_s=SESSION_S, watch=watch)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        _wait(lambda: replaced._value.get() - replaced_before >= 2, 60, "two replaced consumers")
        _wait(lambda: len(set(sink.values)) >= 50, 60, "the first 50 events written")
        # Now asked about its own group: the consumer the sink made last is found inside and kept.
        watch.group_id = group
        replaced_then = replaced._value.get()
        producer = kafka_producer(cfg.kafka)
        for i in range(50, 100):
            producer.produce(topic, value=f"event {i}".encode())
        assert producer.flush(30) == 0
        _wait(lambda: len(set(sink.values)) >= 100, 60, "all 100 events written")
        time.sleep(4.0)  # more than the limit: a member of its group must not be replaced
        assert replaced._value.get() == replaced_then, "a consumer inside its group was replaced"
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    assert not thread.is_alive(), "the sink did not stop"
    assert set(sink.values) == {f"event {i}".encode() for i in range(100)}
    _wait(lambda: _committed(admin, group, topic) == 100, 30, "the group's offset at the end of the topic")
    # Every consumer the sink made has left the group: none was left behind, joined.
    description = admin.describe_consumer_groups([group])[group].result(30)
    assert description.members == [], [member.member_id for member in description.members]
