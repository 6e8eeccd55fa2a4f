"""A channel's send failing in any way is that delivery's failure, never the delivery worker's end.

Before, only OSError, SMTPException and URLError were caught: a webhook answering something that is
not HTTP (http.client.BadStatusLine), a URL http.client refuses (InvalidURL) or one urllib cannot parse
(ValueError) escaped with_retries, ended `diana alerts deliver`, and ended it again at every start on
the same uncommitted alert, so every later alert was held. No services: a socket that answers garbage."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from diana.access.alerts.channels import send_webhook, with_retries
from diana.access.alerts.delivery import DeliveryWorker, Ledger
from diana.access.alerts.routing import Recipient, Routing
from diana.schemas.codec import default_codec

ALERT = {
    "alert_id": "a1",
    "rule": "DRL x",
    "rule_type": "drl",
    "metric": "m",
    "value": 1.0,
    "study_instance_uid": "1.2",
}


def _garbage_server() -> int:
    """A port that answers one request with a line that is not HTTP."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"NOT-HTTP garbage\r\n\r\n")
        conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def _no_wait(_s: float) -> None:
    pass


def test_an_answer_that_is_not_http_is_a_failed_delivery():
    port = _garbage_server()
    result = with_retries(lambda: send_webhook(f"http://127.0.0.1:{port}/hook", ALERT, "k", 5.0), 1, _no_wait)
    assert (result.ok, result.attempts, result.detail) == (False, 1, "BadStatusLine")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://127.0.0.1:1/ho ok?token=s3cret", "InvalidURL"),  # its text quotes the path and query
        ("http://user:s3cret@127.0.0.1:12a/hook", "InvalidURL"),
        ("http://[::1/hook?token=s3cret", "ValueError"),
    ],
)
def test_a_url_refused_before_sending_is_a_failed_delivery_without_the_url(url: str, error: str):
    result = with_retries(lambda: send_webhook(url, ALERT, "k", 1.0), 2, _no_wait)
    assert (result.ok, result.attempts, result.detail) == (False, 2, error)


def test_credentials_of_a_url_in_a_transport_error_are_left_out():
    def refused() -> str:
        raise ConnectionRefusedError("cannot reach http://user:s3cret@hooks.example/x")

    result = with_retries(refused, 1, _no_wait)
    assert "s3cret" not in result.detail and "user" not in result.detail
    assert result.detail.startswith("ConnectionRefusedError: cannot reach http://***@hooks.example/x")


class _Broker:
    def __init__(self) -> None:
        self.queued: list = []

    def produce(self, topic, key, value, on_delivery=None) -> None:
        self.queued.append(default_codec().decode(value, expect="AlertAction")[1])

    def flush(self, timeout: float) -> int:
        return 0


class _States:
    def update(self, alert_id, change):
        return change(None)


def test_the_worker_records_the_failure_and_goes_on_to_the_next_alert():
    port = _garbage_server()
    worker = object.__new__(DeliveryWorker)  # no broker or SMTP server: the real webhook send
    worker.cfg = SimpleNamespace(alerts=SimpleNamespace(attempts=1, timeout_s=5.0, message_extra_fields=()))
    worker.routing = Routing((Recipient("chat", webhook=f"http://127.0.0.1:{port}/hook"),))
    worker.states, worker.codec, worker.ledger = _States(), default_codec(), Ledger()
    worker.producer, worker._not_taken = _Broker(), []
    worker.handle_alert(ALERT)  # raised BadStatusLine before
    (action,) = worker.producer.queued
    assert (action["action"], action["channel"], action["detail"]) == ("DELIVERY_FAILED", "webhook", "BadStatusLine")
    assert list(worker.ledger.failed.values())[0]["detail"] == "BadStatusLine"  # retried at its interval
