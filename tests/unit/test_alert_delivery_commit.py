"""`diana alerts deliver` commits as the sinks and `diana route` do: asynchronously, at the positions taken
once the message is handled (sinks/consumer.py commit_written), never before; a commit refused at once is
logged, not raised. Before, it committed synchronously per message, which can wait for ever inside
librdkafka after a broker restart (confluent-kafka-python issue 1801).

The consumer here only records the calls made to it: what is tested is when and how the worker commits,
not Kafka (tests/integration/test_alert_delivery_stack.py runs the worker against a broker)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from structlog.testing import capture_logs

from diana.access.alerts.channels import Delivery
from diana.access.alerts.delivery import DeliveryWorker, Ledger, Unavailable, handle_then_commit, until_done
from diana.access.alerts.routing import Recipient, Routing
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

    def handle_alert(self, alert: dict, origin: tuple[int, int] | None = None) -> None:
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


class _SlowBroker:
    """A producer whose first flushes time out (the broker not acknowledging for a while)."""

    def __init__(self, unacknowledged: int) -> None:
        self.unacknowledged, self.queued = unacknowledged, []

    def produce(self, topic, key, value, on_delivery=None) -> None:
        self.queued.append(key)

    def flush(self, timeout: float) -> int:
        self.unacknowledged -= 1
        return 1 if self.unacknowledged >= 0 else 0


class _States:
    def update(self, alert_id, change):
        return change(None)


def test_an_alert_tried_again_while_the_broker_does_not_acknowledge_is_sent_once():
    """Before, each try sent the e-mail again (the ledger learnt of it only after the acknowledgement):
    once a minute for as long as the broker was down."""
    worker, sent = _worker(_SlowBroker(unacknowledged=3))
    alert = {"alert_id": "a1", "rule": "DRL x", "rule_type": "drl", "study_instance_uid": "1.2.3"}
    assert until_done(lambda: worker.handle_alert(alert), lambda: True, DOSE_ALERTS.name, backoff_s=0.01)
    assert len(sent) == 1 and len(worker.producer.queued) == 1


def test_a_request_opensearch_will_never_take_ends_the_worker_instead_of_holding_every_alert():
    from opensearchpy.exceptions import AuthorizationException, RequestError, TransportError

    for refusal in (RequestError(400, "mapper_parsing_exception", {}), AuthorizationException(403, "denied", {})):
        budget = iter(range(20))  # retried (the defect), it would end at the budget's end, not raise

        def refused(r: Exception = refusal) -> None:
            raise r

        with pytest.raises(TransportError):
            until_done(refused, lambda b=budget: next(b, None) is not None, DOSE_ALERTS.name, backoff_s=0.001)
    tries: list[int] = []

    def overloaded_then_done() -> None:
        tries.append(1)
        if len(tries) == 1:
            raise TransportError(429, "es_rejected_execution_exception", {})

    assert until_done(overloaded_then_done, lambda: True, DOSE_ALERTS.name, backoff_s=0.01) and len(tries) == 2


def test_the_actions_producer_never_drops_an_action_and_a_retry_round_awaits_its_records(config, monkeypatch):
    """librdkafka's 5-minute delivery timeout dropped an action the broker had not taken, and the flush then
    said nothing was pending: the alert was committed without its record."""
    from diana.access.alerts import delivery
    from diana.config import load_config

    settings: list[dict] = []
    monkeypatch.setattr(delivery, "kafka_producer", lambda kafka, extra: settings.append(extra) or _SlowBroker(2))
    worker = DeliveryWorker(load_config(config), Routing(()), _States())
    assert settings == [{"enable.idempotence": True, "acks": "all", "message.timeout.ms": 0}]
    # A retry round with nothing to send still waits for the actions queued before (tried again meanwhile).
    with pytest.raises(Unavailable):
        worker.retry_failed()
    assert until_done(worker.retry_failed, lambda: True, "retry_failed", backoff_s=0.01)


class _PurgingBroker(_SlowBroker):
    """A producer whose first message is reported not taken (purged, refused) and so not pending."""

    def __init__(self) -> None:
        super().__init__(unacknowledged=0)
        self.reports: list = []

    def produce(self, topic, key, value, on_delivery=None) -> None:
        super().produce(topic, key, value)
        self.reports.append((on_delivery, key, value))

    def flush(self, timeout: float) -> int:
        for on_delivery, key, value in self.reports:
            failed = len(self.queued) == 1
            on_delivery(KafkaError(KafkaError._PURGE_QUEUE) if failed else None, Message(key=key, value=value))
        self.reports.clear()
        return 0


def _worker(producer, send_ok: bool = True) -> tuple[DeliveryWorker, list]:
    sent: list = []
    worker = object.__new__(DeliveryWorker)  # no broker or SMTP server: the send and the producer are recorded
    worker.cfg = SimpleNamespace(alerts=SimpleNamespace(attempts=1, timeout_s=1))
    worker.routing = Routing((Recipient("physicist", email="p@example.org"),))
    worker.states, worker.codec, worker.ledger = _States(), default_codec(), Ledger()
    worker.producer, worker._not_taken = producer, []
    worker._send = lambda channel, address, alert, key, attempts=None, **_: (  # type: ignore[method-assign]
        sent.append(key) or Delivery(send_ok, 1, "" if send_ok else "refused")
    )
    return worker, sent


def test_an_action_the_producer_reports_not_taken_is_produced_again_before_the_commit():
    """A purged or refused action is not pending, so the flush said 0: the alert was committed without it."""
    worker, sent = _worker(_PurgingBroker())
    alert = {"alert_id": "a1", "rule": "DRL x", "rule_type": "drl", "study_instance_uid": "1.2.3"}
    assert until_done(lambda: worker.handle_alert(alert), lambda: True, DOSE_ALERTS.name, backoff_s=0.01)
    assert len(sent) == 1 and len(worker.producer.queued) == 2  # produced again, the e-mail sent once


def test_a_failed_delivery_is_not_sent_again_by_each_try_of_its_step():
    """The broker down: each try of the step sent the failing e-mail again and queued one more
    DELIVERY_FAILED; it is retry_failed's, at its interval."""
    worker, sent = _worker(_SlowBroker(unacknowledged=3), send_ok=False)
    alert = {"alert_id": "a1", "rule": "DRL x", "rule_type": "drl", "study_instance_uid": "1.2.3"}
    assert until_done(lambda: worker.handle_alert(alert), lambda: True, DOSE_ALERTS.name, backoff_s=0.01)
    assert len(sent) == 1 and len(worker.producer.queued) == 1 and worker.ledger.failed
