"""Unit: a commit whose outcome the worker did not learn, without a broker.

commit_transaction can fail although the commit happened (its answer lost, or the retries ran out
after the coordinator had the commit): the abort path's new producer then completes that commit
in its init_transactions. Before, the loop always rewound and did the batch again from the state
before it: its outputs were published twice, one revision number for two records. Now it asks for
the group's committed offsets: at the batch's ends, the batch is the state; at its starts, it is
done again as before.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

import diana.stream_apps.transactional as transactional
from diana.schemas.codec import default_codec
from diana.schemas.topics import INSTANCES, SERIES
from diana.stream_apps.aggregates import SERIES_STATE, AggregatesHandler
from diana.stream_apps.completeness import QuietTimes
from tests.unit.test_aggregates_record_size import (
    T0,
    OnePartitionConsumer,
    SizeLimitedProducer,
    event,
    loop_with,
    message,
)


class Broker:
    def __init__(self) -> None:
        self.offsets: dict[tuple[str, int], int] = {}
        self.unreachable = False


class CommittingProducer(SizeLimitedProducer):
    """Commits to the stand-in broker; ``fail`` makes the next commit_transaction raise, after the
    commit (``"answer_lost"``) or without it (``"not_committed"``)."""

    def __init__(self, broker: Broker) -> None:
        super().__init__({})
        self.broker, self.fail, self.pending = broker, "", []

    def send_offsets_to_transaction(self, offsets, *_: Any) -> None:
        self.pending = offsets

    def commit_transaction(self, *_: Any) -> None:
        fail, self.fail = self.fail, ""
        if fail != "not_committed":
            super().commit_transaction()
            self.broker.offsets.update({(tp.topic, tp.partition): tp.offset for tp in self.pending})
        if fail:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "commit timed out", retriable=False))


class GroupConsumer(OnePartitionConsumer):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self.broker = broker

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if self.broker.unreachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
        return [
            TopicPartition(tp.topic, tp.partition, self.broker.offsets.get((tp.topic, tp.partition), -1001))
            for tp in partitions
        ]


class SuspendRecorder:
    def __init__(self) -> None:
        self.suspended: list[int] = []

    def suspend(self, partition: int, reason: str) -> None:
        self.suspended.append(partition)


def _loop(monkeypatch):
    broker = Broker()
    loop = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60")))
    loop.producer, loop.consumer = CommittingProducer(broker), GroupConsumer(broker)
    loop._new_producer = lambda: loop.producer  # type: ignore[method-assign]  # the abort's new producer
    return loop, broker


def _series_revisions(loop) -> list[int]:
    codec = default_codec()
    return [codec.decode(r[2])[1]["revision"] for r in loop.producer.on(SERIES.name)]


def test_a_batch_committed_although_its_commit_failed_is_kept_not_done_again(monkeypatch):
    loop, broker = _loop(monkeypatch)
    messages = [message(event("1.2.3", "1.2.3.4", n, T0 + timedelta(seconds=n)), n - 1) for n in range(1, 5)]
    loop._transaction(messages[:2])
    loop.producer.fail = "answer_lost"
    loop._transaction(messages[2:3])
    assert loop.consumer.seeks == []  # not rewound: nothing is done twice
    assert broker.offsets[(INSTANCES.name, 0)] == 3
    assert loop.store.get(0, SERIES_STATE, "1.2.3.4")["instance_count"] == 3
    loop._transaction(messages[3:])
    assert loop.store.get(0, SERIES_STATE, "1.2.3.4")["instance_count"] == 4
    assert _series_revisions(loop) == [2, 3, 4]  # each revision once, one content each

    # With local files, those of the batch's partitions are left as the older, true snapshot.
    loop.local = SuspendRecorder()
    loop.producer.fail = "answer_lost"
    loop._transaction([message(event("1.2.3", "1.2.3.4", 5, T0 + timedelta(seconds=5)), 4)])
    assert loop.local.suspended == [0] and loop.consumer.seeks == []


def test_a_batch_whose_commit_failed_and_did_not_happen_is_done_again(monkeypatch):
    loop, broker = _loop(monkeypatch)
    first = message(event("1.2.3", "1.2.3.4", 1, T0), 0)
    loop._transaction([first])
    loop.producer.fail = "not_committed"
    second = message(event("1.2.3", "1.2.3.4", 2, T0 + timedelta(seconds=1)), 1)
    loop._transaction([second])
    assert loop.consumer.seeks == [(INSTANCES.name, 0, 1)]
    assert loop.store.get(0, SERIES_STATE, "1.2.3.4")["instance_count"] == 1
    loop._transaction([second])  # what run() reads after the rewind
    assert loop.store.get(0, SERIES_STATE, "1.2.3.4")["instance_count"] == 2
    assert _series_revisions(loop) == [1, 2]


def test_when_the_committed_offsets_cannot_be_read_the_batch_is_done_again_as_before(monkeypatch):
    monkeypatch.setattr(transactional, "_OUTCOME_WAIT_S", 0.2)
    loop, broker = _loop(monkeypatch)
    loop.producer.fail, broker.unreachable = "not_committed", True
    loop._transaction([message(event("1.2.3", "1.2.3.4", 1, T0), 0)])
    assert loop.consumer.seeks == [(INSTANCES.name, 0, 0)]
    assert loop.store.get(0, SERIES_STATE, "1.2.3.4") is None
