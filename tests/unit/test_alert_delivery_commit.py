"""`diana alerts deliver` commits as the sinks and `diana route` do: asynchronously, at the positions taken
once the message is handled (sinks/consumer.py commit_written), never before; a commit refused at once is
logged, not raised. Before, it committed synchronously per message, which can wait for ever inside
librdkafka after a broker restart (confluent-kafka-python issue 1801).

The consumer here only records the calls made to it: what is tested is when and how the worker commits,
not Kafka (tests/integration/test_alert_delivery_stack.py runs the worker against a broker)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from structlog.testing import capture_logs

from diana.access.alerts.delivery import Unavailable, handle_then_commit, until_done
from diana.schemas.codec import default_codec
from diana.schemas.topics import DOSE_ALERTS
from tests.unit.test_routing_waits import _alert


class _Consumer:
    def __init__(self, calls: list, refuse: bool = False) -> None:
        self.calls, self.refuse = calls, refuse

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(DOSE_ALERTS.name, 0)]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 6) for tp in partitions]

    def commit(self, message=None, offsets=None, asynchronous=True) -> None:
        if self.refuse:  # as librdkafka does at once with no group coordinator
            raise KafkaException(KafkaError(KafkaError._NO_OFFSET, "Local: No offset stored"))
        self.calls.append(("commit", [(tp.topic, tp.partition, tp.offset) for tp in offsets or []], asynchronous))


class _Worker:
    codec = default_codec()

    def __init__(self, calls: list, fails: bool = False) -> None:
        self.calls, self.fails = calls, fails

    def handle_alert(self, alert: dict) -> None:
        if self.fails:
            raise ConnectionError("the alert state index does not answer")
        self.calls.append(("delivered", alert["alert_id"]))

    def handle_action(self, action: dict) -> None:
        self.calls.append(("action", action["alert_id"]))


def test_an_alert_is_committed_asynchronously_once_delivered():
    calls: list = []
    handle_then_commit(_Worker(calls), _Consumer(calls), _alert())
    assert calls == [("delivered", "a1"), ("commit", [(DOSE_ALERTS.name, 0, 6)], True)]


def test_an_undecodable_message_is_committed_the_same_way():
    calls: list = []
    junk = Message(topic=DOSE_ALERTS.name, partition=0, offset=5, value=b"\x00not avro")
    handle_then_commit(_Worker(calls), _Consumer(calls), junk)
    assert calls == [("commit", [(DOSE_ALERTS.name, 0, 6)], True)]


def test_an_alert_whose_delivery_fails_is_not_committed():
    calls: list = []
    with pytest.raises(ConnectionError):
        handle_then_commit(_Worker(calls, fails=True), _Consumer(calls), _alert())
    assert calls == []


def test_a_commit_refused_at_once_is_logged_and_the_worker_goes_on():
    calls: list = []
    with capture_logs() as logs:
        handle_then_commit(_Worker(calls), _Consumer(calls, refuse=True), _alert())
    assert calls == [("delivered", "a1")]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["alert.delivery.commit_failed"]


def test_a_step_the_index_or_broker_stops_for_now_is_tried_again_not_the_end_of_the_worker():
    """OpenSearch down (its ConnectionError), a broker that did not acknowledge the action: the worker
    waits and handles the same message again (before, the error ended `diana alerts deliver`)."""
    tries: list[int] = []

    def step() -> None:
        tries.append(1)
        if len(tries) == 1:
            raise OSConnectionError("N/A", "connection refused", None)
        if len(tries) == 2:
            raise Unavailable("dose.alert-actions: the broker did not acknowledge the action in 30 s")

    with capture_logs() as logs:
        assert until_done(step, lambda: True, DOSE_ALERTS.name, backoff_s=0.01)
    assert len(tries) == 3
    retries = [e for e in logs if e["event"] == "alert.delivery.retry"]
    assert [e["error"] for e in retries] == ["ConnectionError", "Unavailable"]
    assert all("refused" not in str(e) and "acknowledge" not in str(e) for e in retries)  # type only


def test_a_stop_while_waiting_leaves_the_step_undone_and_a_bug_is_not_retried():
    tries: list[int] = []

    def unavailable() -> None:
        tries.append(1)
        raise Unavailable("no")

    running = iter([True, True, False])
    assert not until_done(unavailable, lambda: next(running, False), "retry_failed", backoff_s=0.01)
    assert len(tries) == 1

    def bug() -> None:
        raise KeyError("alert_id")

    with pytest.raises(KeyError):
        until_done(bug, lambda: True, DOSE_ALERTS.name)
