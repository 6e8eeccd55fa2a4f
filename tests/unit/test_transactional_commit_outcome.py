"""Unit: a commit whose outcome the worker did not learn, without a broker.

commit_transaction can fail although the commit happened (its answer lost, or the retries ran out
after the coordinator had the commit): the abort path's new producer then completes that commit in
its init_transactions; or the commit did not happen. Either way the batch's partitions are dropped
and restored as on an assignment (the changelog read read_committed, the offsets once stable), and
the input resumes at the committed offsets: state and position are what Kafka holds.

Before, the outcome was guessed from the committed offsets (polled for 30 s): a batch taken as
committed kept its in-memory state and suspended its local files until the next restore, and after
a commit whose outcome could not be read, the failed redo was taken as committed (the reviewer's
test_double_failure.py).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

import diana.stream_apps.transactional as transactional
from diana.schemas.codec import default_codec
from diana.schemas.topics import INSTANCES, SERIES
from diana.stream_apps import partition_assignment
from diana.stream_apps.aggregates import SERIES_STATE, AggregatesHandler
from diana.stream_apps.completeness import QuietTimes
from diana.stream_apps.state_restore import GiveUp, RestoreReport, apply_record
from diana.stream_apps.transactional import MESSAGES, TRANSACTIONS
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

    def get_watermark_offsets(self, *_: Any, **__: Any) -> tuple[int, int]:
        return 0, 100


class LocalFiles:
    """The local files as far as the reload touches them: which are closed, suspended, resumed."""

    def __init__(self) -> None:
        self.suspended: dict[int, str] = {}
        self.closed: list[int] = []

    def suspend(self, partition: int, reason: str) -> None:
        self.suspended[partition] = reason

    def resume(self, partition: int) -> None:
        self.suspended.pop(partition, None)

    def close(self, partition: int) -> None:
        self.closed.append(partition)


def _loop(monkeypatch):
    """The loop on a stand-in broker; a restore reads the committed changelog records, as
    state_restore.restore_partitions does (read_committed), and resumes the local files."""
    broker = Broker()
    loop = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60")))
    loop.producer, loop.consumer = CommittingProducer(broker), GroupConsumer(broker)
    loop._new_producer = lambda: loop.producer  # type: ignore[method-assign]  # the abort's new producer
    loop.restores = []

    def restore(_kafka, _group, changelog, partitions, states, local, *_: Any) -> RestoreReport:
        loop.restores.append(list(partitions))
        for p in partitions:
            states[p] = {}
            if local is not None:
                local.resume(p)
        for _topic, key, value, partition, _ in loop.producer.on(changelog):
            if partition in partitions:
                apply_record(states[partition], key.decode(), None if value is None else json.loads(value))
        return RestoreReport()

    monkeypatch.setattr(partition_assignment, "restore_partitions", restore)
    return loop, broker


def _series_revisions(loop) -> list[int]:
    codec = default_codec()
    return [codec.decode(r[2])[1]["revision"] for r in loop.producer.on(SERIES.name)]


def _count(loop) -> int:
    return loop.store.get(0, SERIES_STATE, "1.2.3.4")["instance_count"]


def _messages(n: int) -> list:
    return [message(event("1.2.3", "1.2.3.4", i, T0 + timedelta(seconds=i)), i - 1) for i in range(1, n + 1)]


def test_a_batch_committed_although_its_commit_failed_is_restored_as_committed_not_done_again(monkeypatch):
    loop, broker = _loop(monkeypatch)
    loop.local = LocalFiles()
    loop.local.suspended[0] = "an older write failed"  # resumed by the restore, as on an assignment
    messages = _messages(4)
    committed_before = TRANSACTIONS.labels("committed_after_failed_commit")._value.get()
    counted_before = MESSAGES.labels(INSTANCES.name)._value.get()
    loop._transaction(messages[:2])
    loop.producer.fail = "answer_lost"
    loop._transaction(messages[2:3])
    assert loop.restores == [[0]] and loop.consumer.seeks == [(INSTANCES.name, 0, 3)]
    assert _count(loop) == 3 and loop.local.suspended == {} and loop.local.closed == [0]
    loop._transaction(messages[3:])  # what run() reads next: the batch after the committed one
    assert _count(loop) == 4
    assert _series_revisions(loop) == [2, 3, 4]  # each revision once, one content each
    # Metrics: the batch counted as committed after all, its message among those processed.
    assert TRANSACTIONS.labels("committed_after_failed_commit")._value.get() == committed_before + 1
    assert MESSAGES.labels(INSTANCES.name)._value.get() == counted_before + 4


def test_a_batch_whose_commit_failed_and_did_not_happen_is_done_again_from_the_restored_state(monkeypatch):
    loop, broker = _loop(monkeypatch)
    first, second = _messages(2)
    loop._transaction([first])
    counted_before = MESSAGES.labels(INSTANCES.name)._value.get()
    loop.producer.fail = "not_committed"
    loop._transaction([second])
    assert loop.restores == [[0]] and loop.consumer.seeks == [(INSTANCES.name, 0, 1)]
    assert _count(loop) == 1
    assert MESSAGES.labels(INSTANCES.name)._value.get() == counted_before  # not processed: not counted
    loop._transaction([second])
    assert _count(loop) == 2
    assert _series_revisions(loop) == [1, 2]


def test_after_a_commit_that_went_through_unseen_a_failed_redo_is_not_kept_as_committed(monkeypatch):
    """The reviewer's test_double_failure.py: B1 committed but its outcome could not be read in 30 s,
    so it was done again (B1'); B1' failed without committing, and the committed offsets (B1's)
    equal to B1' ends made the loop keep B1' state as committed. Now B1 is restored as committed (not
    done again), and a batch whose commit failed without happening leaves only the committed state."""
    loop, broker = _loop(monkeypatch)
    m = _messages(3)
    loop._transaction(m[:1])
    loop.producer.fail = "answer_lost"
    loop._transaction(m[1:2])  # B1 commits, its answer lost
    assert (broker.offsets[(INSTANCES.name, 0)], _count(loop), loop.consumer.seeks) == (2, 2, [(INSTANCES.name, 0, 2)])
    loop.producer.fail = "not_committed"
    loop._transaction(m[2:3])  # B2 does not commit
    assert loop.consumer.seeks[-1] == (INSTANCES.name, 0, 2) and _count(loop) == 2
    loop._transaction(m[2:3])
    assert _count(loop) == 3 and _series_revisions(loop) == [1, 2, 3]


def test_when_the_committed_offsets_stay_unreadable_the_worker_gives_up_for_a_restart(monkeypatch):
    """No guess: the restart's restore is exact."""
    loop, broker = _loop(monkeypatch)
    loop.settings = dataclasses.replace(loop.settings, give_up_after_s=0.1)
    loop.producer.fail, broker.unreachable = "answer_lost", True
    with pytest.raises(GiveUp, match="committed offsets stayed unavailable"):
        loop._transaction(_messages(1))
    assert loop.consumer.seeks == []


class SizeRefusingBroker(CommittingProducer):
    """The broker refuses a record for its size: librdkafka's delivery report says so, and
    commit_transaction fails with an abortable _INCONSISTENT, not MSG_SIZE_TOO_LARGE."""

    def __init__(self, broker: Broker, on_delivery, code: int) -> None:
        super().__init__(broker)
        self.on_delivery, self.code = on_delivery, code

    def commit_transaction(self, *_: Any) -> None:
        topic, key, value, partition, _ = next(r for r in self.open if r[0] == SERIES.name)
        self.on_delivery(KafkaError(self.code), Message(topic=topic, partition=partition or 0, key=key, value=value))
        raise KafkaException(
            KafkaError(KafkaError._INCONSISTENT, "1 message(s) failed delivery", txn_requires_abort=True)
        )


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE])
def test_a_record_the_broker_refused_for_its_size_stops_the_worker_with_the_size_message(monkeypatch, code):
    loop, broker = _loop(monkeypatch)
    real = transactional.TransactionalLoop._new_producer(loop)  # the worker's own settings, on_delivery among them
    loop.producer = SizeRefusingBroker(broker, real.settings["on_delivery"], code)
    with pytest.raises(GiveUp, match=r"refused by the broker for its size .*max_message_bytes"):
        loop._transaction(_messages(1))
    assert (loop.restores, loop.consumer.seeks) == ([], [])
