"""Unit: a transaction that fails for a cause that lasts stops the worker, naming the cause and the fix.

Before, any failure but the size refusal aborted the batch, rewound (or, after a failed commit,
restored the partitions) and did the same batch again, for ever: an output topic the worker may not
write (TOPIC_AUTHORIZATION_FAILED in the records' delivery reports, commit_transaction saying only
_INCONSISTENT), a topic deleted while topics are not created automatically (_UNKNOWN_TOPIC at
produce()) made a silent busy loop, its partitions stalled. Now failures lasting longer than
[stream] transaction_max_retry_s (300 s) with none committed, and at least 10 of them, stop it
(GiveUp: exit 1); the loop's own recovery steps (abort, restore after a failed commit) are not
counted, and a failed commit found committed after all is no failure; any commit starts the count
again; a redo after the second failure in a row waits (1, 2, 4, 5 s).

The broker and the clock are stand-ins (the commit-outcome tests' broker, a clock the loop's
sleeps advance).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message
from prometheus_client import REGISTRY

import diana.stream_apps.transactional as transactional
from diana.config import ConfigError, load_config
from diana.schemas.topics import SERIES
from diana.stream_apps.failing_transactions import MIN_FAILURES, FailureStreak
from diana.stream_apps.state_restore import GiveUp
from tests.unit.test_transactional_commit_outcome import CommittingProducer, _count, _loop, _messages

COMMIT_TAKES_S = 5.0  # what each failed attempt costs on the fake clock


class Clock:
    """time.monotonic for the loop and the failure count; time.sleep advances it."""

    def __init__(self, monkeypatch) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(time, "sleep", self.sleep)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RefusingBroker(CommittingProducer):
    """The broker refuses the records of dicom.series (``refuse``: the error code in their delivery
    report; commit_transaction then fails with librdkafka's abortable _INCONSISTENT), until
    ``refuse`` is None; each commit attempt costs COMMIT_TAKES_S."""

    def __init__(self, broker, on_delivery, clock: Clock, refuse: int | None) -> None:
        super().__init__(broker)
        self.on_delivery, self.clock, self.refuse = on_delivery, clock, refuse

    def commit_transaction(self, *_: Any) -> None:
        self.clock.now += COMMIT_TAKES_S
        if self.refuse is None:
            return super().commit_transaction()
        refused = [r for r in self.open if r[0] == SERIES.name]
        for topic, key, value, partition, _ in refused:
            self.on_delivery(
                KafkaError(self.refuse), Message(topic=topic, partition=partition or 0, key=key, value=value)
            )
        raise KafkaException(
            KafkaError(KafkaError._INCONSISTENT, f"{len(refused)} message(s) failed delivery", txn_requires_abort=True)
        )


def _refusing_loop(monkeypatch, refuse: int | None):
    loop, broker = _loop(monkeypatch)
    clock = Clock(monkeypatch)
    real = transactional.TransactionalLoop._new_producer(loop)  # the worker's own on_delivery
    loop.producer = RefusingBroker(broker, real.settings["on_delivery"], clock, refuse)
    return loop, clock


def _until_given_up(loop, batch: list, tries: int = 200) -> tuple[GiveUp, int]:
    """Do the batch again as run() does after each rewind, until the loop gives up."""
    for attempt in range(1, tries + 1):
        try:
            loop._transaction(batch)
        except GiveUp as exc:
            return exc, attempt
    raise AssertionError(f"{tries} failed transactions in a row and the worker went on")


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_an_output_topic_the_worker_may_not_write_stops_it_after_the_bound_naming_the_cause(monkeypatch):
    loop, clock = _refusing_loop(monkeypatch, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    counted = _metric("diana_stream_transaction_failures_total", {"cause": "TOPIC_AUTHORIZATION_FAILED"})
    began = clock.now
    error, tries = _until_given_up(loop, _messages(1))
    # At the first failure past the bound: the first one came after one attempt, each later one an
    # attempt and a wait of at most 5 s later.
    assert 300 < clock.now - began <= 300 + 2 * COMMIT_TAKES_S + 5
    message = str(error)
    assert "TOPIC_AUTHORIZATION_FAILED" in message and SERIES.name in message
    assert "transaction_max_retry_s (300 s)" in message and "[kafka] sasl_username" in message
    assert "1.2.3" not in message  # no UID of the failing batch
    assert (
        _metric("diana_stream_transaction_failures_total", {"cause": "TOPIC_AUTHORIZATION_FAILED"}) == counted + tries
    )
    assert _metric("diana_stream_failing_seconds") > 300
    # Each failed commit restored the batch's partition (the outcome unknown) before it was counted,
    # the last one too: nothing committed.
    assert len(loop.restores) == tries and loop.producer.committed == []


def test_the_redo_waits_longer_after_each_failure_in_a_row_the_first_not_at_all(monkeypatch):
    loop, clock = _refusing_loop(monkeypatch, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    batch = _messages(1)
    waits = []
    for _ in range(6):
        clock.sleeps = []
        loop._transaction(batch)
        waits.append(round(sum(clock.sleeps), 6))
    assert waits == [0, 1, 2, 4, 5, 5]


def test_failures_that_pass_are_retried_as_before_and_a_commit_starts_the_count_again(monkeypatch):
    """A broker restart: batches fail for a while, then commit. Two spells of 250 s each, a commit
    between them, never stop the worker; the gauge is 0 once a batch committed."""
    loop, clock = _refusing_loop(monkeypatch, KafkaError.NOT_ENOUGH_REPLICAS)
    first, second = _messages(2)
    for batch in ([first], [second]):
        began = clock.now
        while clock.now - began < 250:
            loop._transaction(batch)
        loop.producer.refuse = None
        loop._transaction(batch)
        assert _metric("diana_stream_failing_seconds") == 0.0
        loop.producer.refuse = KafkaError.NOT_ENOUGH_REPLICAS
    assert _count(loop) == 2


def test_a_topic_missing_at_produce_stops_the_worker_naming_diana_topics(monkeypatch):
    """A deleted output topic while the broker creates none: produce() raises at once (no commit)."""
    loop, clock = _refusing_loop(monkeypatch, None)
    produce = loop.producer.produce

    def missing_series_topic(topic, *args: Any, **kwargs: Any) -> None:
        clock.now += 1.0
        if topic == SERIES.name:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "Local: Unknown topic"))
        produce(topic, *args, **kwargs)

    loop.producer.produce = missing_series_topic
    error, tries = _until_given_up(loop, _messages(1))
    assert "_UNKNOWN_TOPIC" in str(error) and "diana topics" in str(error)
    assert loop.restores == [] and len(loop.consumer.seeks) == tries - 1  # rewound each time, never restored


def test_transaction_max_retry_s_is_a_stream_setting_of_at_least_120_s(tmp_path):
    """At least the loop's own recovery limits (120 s); nan (no comparison holds) and inf refused."""
    assert load_config(None, {}).stream.transaction_max_retry_s == 300.0
    assert load_config(None, {"DIANA_STREAM_TRANSACTION_MAX_RETRY_S": "120"}).stream.transaction_max_retry_s == 120.0
    for value in ("10", "90", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"transaction_max_retry_s = .*: use 120 or more"):
            load_config(None, {"DIANA_STREAM_TRANSACTION_MAX_RETRY_S": value})


def test_the_gauge_reads_the_worker_s_own_failure_count(monkeypatch):
    from diana.config import KafkaConfig
    from diana.stream_apps import partition_assignment
    from diana.stream_apps.aggregates import AggregatesHandler
    from diana.stream_apps.completeness import QuietTimes
    from diana.stream_apps.loop_settings import LoopSettings

    monkeypatch.setattr(partition_assignment, "kafka_consumer", lambda *_: object())
    monkeypatch.setattr(transactional, "kafka_producer", lambda *_: object())
    settings = LoopSettings(KafkaConfig(), "g", "g-1", ("dicom.instances",), "g-state-changelog")
    loop = transactional.TransactionalLoop(settings, AggregatesHandler(QuietTimes.parse("*=60")))
    loop._streak.failed("_TIMED_OUT", set(), now=time.monotonic() - 42)
    assert 42 <= _metric("diana_stream_failing_seconds") < 43
    loop._streak.reset()
    assert _metric("diana_stream_failing_seconds") == 0.0


def test_failures_before_the_partitions_moved_do_not_count_after_they_come_back(monkeypatch):
    """A batch failed, then the partitions went to another worker and, long after, came back: a first
    failure then is no lasting one (the count started anew at the revocation and the assignment)."""
    from confluent_kafka import TopicPartition

    from diana.schemas.topics import INSTANCES

    loop, clock = _refusing_loop(monkeypatch, KafkaError.NOT_ENOUGH_REPLICAS)
    loop.consumer.unassign = lambda: None
    loop.consumer.assign = lambda _partitions: None
    batch = _messages(1)
    loop._transaction(batch)
    loop._on_revoke(loop.consumer, [TopicPartition(INSTANCES.name, 0)])
    assert _metric("diana_stream_failing_seconds") == 0.0
    clock.now += 3600  # idle, without partitions
    loop._on_assign(loop.consumer, [TopicPartition(INSTANCES.name, 0)])
    loop._transaction(batch)  # before: "transactions kept failing for 3605 s", a stop at once
    assert loop._streak.failures == 1


def _slow_recovery(loop, clock: Clock, abort_s: float, restore_s: float) -> None:
    """The abort's init_transactions and the restore after a failed commit take this long (each within
    its own 120 s limit): a broker coming back."""
    init = loop.producer.init_transactions
    reload = loop._reload

    def slow_init(*args: Any) -> None:
        clock.now += abort_s
        init(*args)

    def slow_reload(numbers):
        clock.now += restore_s
        return reload(numbers)

    loop.producer.init_transactions = slow_init
    loop._reload = slow_reload


def test_a_fault_the_recovery_rode_out_then_one_more_failure_does_not_stop_the_worker(monkeypatch):
    """A broker restart: a commit fails, the abort waits 120 s for init_transactions and the restore
    240 s, then the next try fails once more. Before: GiveUp at that second try ("kept failing for
    370 s ... (2 tries"); the recovery's own waits were counted."""
    loop, clock = _refusing_loop(monkeypatch, KafkaError.NOT_ENOUGH_REPLICAS)
    _slow_recovery(loop, clock, abort_s=120, restore_s=240)
    batch = _messages(1)
    loop._transaction(batch)
    loop._transaction(batch)
    assert loop._streak.failures == 2 and loop._streak.seconds() <= 2 * COMMIT_TAKES_S
    loop.producer.refuse = None
    loop._transaction(batch)
    assert _count(loop) == 1 and loop._streak.failures == 0


def test_a_lasting_cause_with_slow_recoveries_still_stops_on_the_time_outside_them(monkeypatch):
    loop, clock = _refusing_loop(monkeypatch, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    _slow_recovery(loop, clock, abort_s=30, restore_s=60)
    error, tries = _until_given_up(loop, _messages(1))
    # Each try: a 5 s commit and a wait of at most 5 s counted, 90 s of recovery not.
    assert tries >= 300 / (2 * COMMIT_TAKES_S)
    assert "TOPIC_AUTHORIZATION_FAILED" in str(error) and "recovery steps left out" in str(error)


def test_a_stop_needs_ten_failures_besides_the_time():
    streak = FailureStreak(300.0)
    streak.failed("NOT_ENOUGH_REPLICAS", set(), now=0.0)
    streak.failed("NOT_ENOUGH_REPLICAS", set(), now=400.0)
    assert not streak.lasting(now=400.0)  # before: a stop after 2 tries
    for _ in range(MIN_FAILURES - 2):
        assert not streak.lasting(now=400.0)
        streak.failed("NOT_ENOUGH_REPLICAS", set(), now=400.0)
    assert streak.failures == MIN_FAILURES and streak.lasting(now=400.0)
    assert not streak.lasting(now=299.0)


def test_a_commit_past_the_limit_whose_answer_was_lost_is_no_failure_and_no_stop(monkeypatch):
    """The count is past the limit; the next commit_transaction fails but the commit went through.
    Before: the limit was checked before the restore told the outcome, a stop "with none committed"."""
    loop, clock = _refusing_loop(monkeypatch, None)
    for _ in range(MIN_FAILURES):
        loop._streak.failed("NOT_ENOUGH_REPLICAS", set(), now=clock.now - 400)
    timed_out = _metric("diana_stream_transaction_failures_total", {"cause": "_TIMED_OUT"})
    loop.producer.fail = "answer_lost"
    loop._transaction(_messages(1))
    assert _count(loop) == 1 and loop._streak.failures == 0 and loop.restores == [[0]]
    assert _metric("diana_stream_transaction_failures_total", {"cause": "_TIMED_OUT"}) == timed_out


def test_a_commit_past_the_limit_that_did_not_happen_stops_the_worker_after_the_restore(monkeypatch):
    loop, clock = _refusing_loop(monkeypatch, None)
    for _ in range(MIN_FAILURES):
        loop._streak.failed("NOT_ENOUGH_REPLICAS", set(), now=clock.now - 400)
    loop.producer.fail = "not_committed"
    with pytest.raises(GiveUp, match=r"with none committed"):
        loop._transaction(_messages(1))
    assert loop.restores == [[0]] and loop._streak.failures == MIN_FAILURES + 1


def test_the_gauge_read_while_the_count_is_reset_does_not_raise(monkeypatch):
    """The metrics thread reads seconds() while the loop's thread resets the count; before, a reset
    between its ``since is None`` check and its use raised TypeError (None in a subtraction)."""
    streak = FailureStreak(300.0)
    streak.failed("_TIMED_OUT", set(), now=100.0)

    def monotonic_while_reset() -> float:
        streak.reset()  # the other thread, between the check and the use
        return 142.0

    monkeypatch.setattr(time, "monotonic", monotonic_while_reset)
    assert streak.seconds() in (0.0, 42.0)
