"""Failed deliveries: a permanent SMTP refusal is final, a failure that passes is tried again without
filling the alert's history, and retrying old failures does not hold new alerts for long.

Before: a 5xx refusal of the recipient was tried again every retry_interval_s for ever, each round
writing one more DELIVERY_FAILED (one dead address: 288 a day in its alert's history); and a retry
round ran first on the only consumer loop, each failed delivery with all its attempts (about 65 s with
an unreachable relay), holding every new alert behind it. No services: the sends are stand-ins."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from diana.access.alerts.channels import Delivery, permanent_refusal, with_retries
from diana.access.alerts.delivery import DeliveryWorker, Ledger, serve
from diana.access.alerts.routing import Recipient, Routing
from diana.access.alerts.workflow import apply_action, raised_state
from diana.config import ConfigError, load_config
from diana.schemas.codec import default_codec
from tests.support.alert_fakes import AlertStates, RecordingBroker


def _no_wait(_s: float) -> None:
    pass


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (smtplib.SMTPRecipientsRefused({"gone@h.example": (550, b"5.1.1 no such user")}), True),
        (smtplib.SMTPRecipientsRefused({"gone@h.example": (550, b"User unknown")}), True),
        (smtplib.SMTPRecipientsRefused({"gone@h.example": (553, b"mailbox name not allowed")}), True),
        # only a bad address is final: content, a full mailbox (5.2.2, 552), relaying (no enhanced code) retried
        (smtplib.SMTPDataError(554, b"5.6.0 message content rejected"), False),
        (smtplib.SMTPRecipientsRefused({"full@h.example": (552, b"5.2.2 mailbox full, over quota")}), False),
        (smtplib.SMTPRecipientsRefused({"x@h.example": (550, b"Relaying denied")}), False),
        (
            smtplib.SMTPRecipientsRefused(
                {"x@h.example": (553, b"sorry, that domain isn't in my list of allowed rcpthosts")}
            ),
            False,
        ),
        (smtplib.SMTPRecipientsRefused({"full@h.example": (452, b"4.2.2 mailbox full")}), False),
        # 5.7.x: the relay's policy about us (configuration), the same for every alert: tried again
        (smtplib.SMTPRecipientsRefused({"x@h.example": (550, b"5.7.1 relaying denied")}), False),
        (smtplib.SMTPSenderRefused(553, b"5.1.8 sender rejected", "diana@h.example"), False),
        (smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"), False),
        (smtplib.SMTPServerDisconnected("closed"), False),
        (ConnectionRefusedError(111, "refused"), False),
    ],
)
def test_which_refusals_are_final(exc: Exception, permanent: bool):
    assert permanent_refusal(exc) is permanent
    calls: list[int] = []

    def send() -> str:
        calls.append(1)
        raise exc

    result = with_retries(send, 3, _no_wait)
    assert (result.ok, result.permanent, len(calls)) == (False, permanent, 1 if permanent else 3)


def _worker(sends: list, results, recipients: tuple[Recipient, ...] | None = None) -> DeliveryWorker:
    """A worker whose sends are recorded as (key, attempts) and answered by ``results(key)``."""
    worker = object.__new__(DeliveryWorker)
    worker.cfg = SimpleNamespace(alerts=SimpleNamespace(attempts=5, timeout_s=1))
    worker.routing = Routing(recipients or (Recipient("physicist", email="p@h.example"),))
    worker.states, worker.codec, worker.ledger = AlertStates(), default_codec(), Ledger()
    worker.producer, worker._not_taken = RecordingBroker(), []

    def send(channel, address, alert, key, attempts=None, **_):
        sends.append((alert["alert_id"], address, attempts))
        return results(alert["alert_id"])

    worker._send = send  # type: ignore[method-assign]
    return worker


def _alert(n: int) -> dict:
    return {"alert_id": f"a{n}", "rule": "DRL x", "rule_type": "drl", "study_instance_uid": f"1.2.{n}"}


def test_a_permanent_refusal_is_recorded_once_marked_and_never_tried_again():
    sends: list = []
    worker = _worker(sends, lambda _: Delivery(False, 1, "SMTPRecipientsRefused: 550", permanent=True))
    worker.handle_alert(_alert(1))
    (action,) = worker.producer.actions
    assert (action["action"], action["permanent"]) == ("DELIVERY_FAILED", True)
    assert not worker.ledger.failed
    for _ in range(3):
        worker.retry_failed()
        worker.handle_alert(_alert(1))  # the alert again (a replay): refused for good, not sent
    assert len(sends) == 1 and len(worker.producer.actions) == 1
    # At the next start, the ledger read from the topic says the same.
    ledger = Ledger()
    ledger.add(action)
    assert not ledger.failed and ledger.done(action["action_id"].split("/failed/")[0])
    doc = apply_action(raised_state(_alert(1), None), action)
    assert doc["history"][-1]["permanent"] is True


def test_a_failure_that_passes_is_retried_once_a_round_and_recorded_when_its_reason_changes_or_hourly():
    sends: list = []
    reasons = iter(["TimeoutError: timed out"] * 4 + ["SMTPServerDisconnected: closed"] * 2)
    worker = _worker(sends, lambda _: Delivery(False, 1, next(reasons)))
    worker.handle_alert(_alert(1))
    for _ in range(5):
        worker.retry_failed()
    assert [a for _, _, a in sends] == [None, 1, 1, 1, 1, 1]  # all attempts first, then one a round
    details = [a["detail"] for a in worker.producer.actions]
    assert details == ["TimeoutError: timed out", "SMTPServerDisconnected: closed"]
    # The same reason an hour after it was last recorded is recorded again (the history shows it still fails).
    (key,) = worker.ledger.failed
    worker.ledger.failed[key] = {**worker.ledger.failed[key], "at": datetime.now(UTC) - timedelta(minutes=61)}
    worker._send = lambda *a, **k: Delivery(False, 1, "SMTPServerDisconnected: closed")  # type: ignore[method-assign]
    worker.retry_failed()
    assert len(worker.producer.actions) == 3


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_retry_round_stops_at_its_budget_and_the_next_goes_on_from_there():
    sends: list = []
    clock = _Clock()

    def slow_failure(_alert_id: str) -> Delivery:
        clock.now += 10.0  # each send waits out a timeout
        return Delivery(False, 1, "SMTPResponseException: 451")

    recipients = tuple(Recipient(f"r{i}", webhook=f"http://hook{i}.example/x") for i in range(6))
    worker = _worker(sends, slow_failure, recipients)
    worker.handle_alert(_alert(1))  # six failed deliveries, one per recipient
    sends.clear()
    worker.retry_failed(budget_s=25.0, clock=clock)
    first = [address for _, address, _ in sends]
    assert len(first) == 3  # at 0, 10, 20 s; at 30 s the budget is spent
    sends.clear()
    worker.retry_failed(budget_s=25.0, clock=clock)
    assert len(sends) == 3 and not {address for _, address, _ in sends} & set(first)


def test_a_server_found_unreachable_is_not_tried_again_in_the_same_round():
    sends: list = []
    worker = _worker(sends, lambda _: Delivery(False, 1, "TimeoutError: timed out", unreachable=True))
    for n in range(4):
        worker.handle_alert(_alert(n))
    sends.clear()
    worker.retry_failed()
    assert len(sends) == 1 and len(worker.ledger.failed) == 4  # the relay's timeout waited once, not four times


class _Consumer:
    """Messages waiting, then none; records what the loop did in order."""

    def __init__(self, waiting: int, log: list) -> None:
        self.waiting, self.log = waiting, log

    def poll(self, timeout: float):
        if self.waiting:
            self.waiting -= 1
            return SimpleNamespace(error=lambda: None, topic=lambda: "dose.alerts", n=self.waiting)
        self.log.append("idle")
        return None


def test_new_alerts_are_handled_before_a_due_retry_round(monkeypatch):
    from diana.access.alerts import delivery

    log: list = []
    worker = SimpleNamespace(
        ledger=SimpleNamespace(failed={"k": {}}), retry_failed=lambda budget: log.append(("retry", budget))
    )
    monkeypatch.setattr(delivery, "handle_then_commit", lambda w, c, msg: log.append("alert"))
    due = iter([0.0] + [1000.0] * 20)  # the round is due from the first poll on
    serve(_Consumer(3, log), worker, lambda: len(log) < 5, 300.0, 30.0, clock=lambda: next(due))
    assert log == ["alert", "alert", "alert", "idle", ("retry", 30.0)]


def test_a_retry_budget_of_zero_is_refused(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[kafka]\nbootstrap = "127.0.0.1:1"\n[alerts]\nretry_budget_s = 0\n')
    with pytest.raises(ConfigError, match="retry_budget_s"):
        load_config(path)
