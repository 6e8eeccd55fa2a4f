"""Delivery of withdrawn alerts: no send once the withdrawal is on dose.alerts, even unread; a
correction where the alert was delivered before its withdrawal.

Before: a running delivery worker sent the alert it held while its withdrawal waited behind it on the
same partition (it read it only after the send), and an alert delivered before the dose report
superseded it stayed delivered with no word to its recipients, who then acted on a false value. No
services: dose.alerts is a list (tests/support/alert_fakes.py), the sends are recorded."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from diana.access.alerts import delivery
from diana.access.alerts.channels import correction_text, with_retries
from diana.access.alerts.delivery import DeliveryWorker, Ledger
from diana.access.alerts.lookahead import WithdrawalWatch
from diana.access.alerts.routing import Recipient, Routing
from diana.schemas.codec import default_codec
from tests.support.alert_fakes import AlertsLog, AlertStates, RecordingBroker

_RAISED = datetime(2024, 3, 15, 10, 0, tzinfo=UTC)
ALERT = {
    "alert_id": "h1",
    "revision": 1,
    "raised_at": _RAISED,
    "rule": "CT head DRL",
    "rule_type": "reference_level",
    "metric": "ctdivol_mGy",
    "value": 95.0,
    "threshold": 60.0,
    "study_instance_uid": "1.2.840.99.1",
    "accession_number": "ACC7",
    "station_name": "CT1",
    "message": "CT head DRL: ctdivol_mGy 95 exceeds 60",
    "patient_id": "SECRET-ID",
}
WITHDRAWAL = {
    **ALERT,
    "revision": 2,
    "raised_at": datetime(2024, 3, 15, 10, 5, tzinfo=UTC),
    "superseded_by": "1.2.840.99.1.77",
    "withdrawn_reason": "superseded",
    "replaced_value": 62.5,
}


class _Mail:
    """The SMTP and webhook sends, recorded; ``fail`` names the channels that fail (OSError)."""

    def __init__(self, monkeypatch, fail: tuple[str, ...] = (), on_send=None) -> None:
        self.sent: list[tuple[str, str, str]] = []  # (kind, channel, text)
        self.fail, self.on_send = set(fail), on_send

        def record(kind: str, channel: str):
            def send(*args, **_):
                alert, key = (args[2], args[3]) if channel == "email" else (args[1], args[2])
                text = correction_text(alert) if kind == "correction" else alert.get("message", "")
                self.sent.append((kind, channel, text))
                if self.on_send:
                    self.on_send()
                if channel in self.fail:
                    raise OSError("connection refused")
                return "accepted"

            return send

        monkeypatch.setattr(delivery, "send_email", record("alert", "email"))
        monkeypatch.setattr(delivery, "send_webhook", record("alert", "webhook"))
        monkeypatch.setattr(delivery, "send_correction_email", record("correction", "email"))
        monkeypatch.setattr(delivery, "send_correction_webhook", record("correction", "webhook"))


def _worker(log: AlertsLog | None = None, attempts: int = 1, ledger: Ledger | None = None) -> DeliveryWorker:
    worker = object.__new__(DeliveryWorker)
    worker.cfg = SimpleNamespace(alerts=SimpleNamespace(attempts=attempts, timeout_s=1, message_extra_fields=()))
    worker.routing = Routing((Recipient("physicist", email="p@h.example", webhook="http://127.0.0.1:1/hook"),))
    worker.states, worker.codec, worker.ledger = AlertStates(), default_codec(), ledger or Ledger()
    worker.producer, worker._not_taken, worker.smtp = RecordingBroker(), [], None
    worker.watch = WithdrawalWatch(log, default_codec()) if log is not None else None
    worker.positions = None
    return worker


# ---- 1. a withdrawal already on dose.alerts, not yet read: nothing sent


def test_an_alert_whose_withdrawal_is_already_published_behind_it_is_not_sent(monkeypatch):
    mail, log = _Mail(monkeypatch), AlertsLog()
    at = log.append(0, ALERT)
    log.append(0, WITHDRAWAL)  # published before the worker got to the alert
    worker = _worker(log)
    worker.handle_alert(ALERT, (0, at))
    assert mail.sent == [] and worker.producer.actions == []
    assert "h1" in worker.ledger.withdrawn
    worker.handle_alert(WITHDRAWAL, (0, at + 1))  # then read in turn: closed, nothing to correct
    assert mail.sent == [] and worker.states.get("h1")["status"] == "closed"


def test_a_withdrawal_published_between_two_tries_stops_the_tries(monkeypatch):
    log = AlertsLog()
    at = log.append(0, ALERT)
    # The relay refuses the first try; the withdrawal is published while the worker waits to try again.
    mail = _Mail(monkeypatch, fail=("email", "webhook"), on_send=lambda: log.append(0, WITHDRAWAL))
    worker = _worker(log, attempts=3)
    worker.handle_alert(ALERT, (0, at))
    assert [s[:2] for s in mail.sent] == [("alert", "email")]  # one try; before: 3 tries, then the webhook's 3
    assert worker.producer.actions == [] and not worker.ledger.failed


def test_a_retry_round_does_not_send_an_alert_withdrawn_since(monkeypatch):
    mail, log = _Mail(monkeypatch, fail=("email", "webhook")), AlertsLog()
    at = log.append(0, ALERT)
    worker = _worker(log)
    worker.handle_alert(ALERT, (0, at))
    assert len(worker.ledger.failed) == 2 and len(mail.sent) == 2
    log.append(0, WITHDRAWAL)  # published after the consumer's last poll
    worker.positions = lambda: {0: at + 1}
    worker.retry_failed()
    assert len(mail.sent) == 2 and not worker.ledger.failed


def test_a_retry_after_a_restart_looks_ahead_from_the_alert_s_own_place(monkeypatch):
    """After a restart the consumer has no position on a partition it consumed nothing from yet
    (confluent-kafka: OFFSET_INVALID); before, the retry looked ahead nowhere and sent the alert whose
    withdrawal was already published."""
    from confluent_kafka import TopicPartition

    from diana.access.alerts.delivery import _alert_positions

    mail, log = _Mail(monkeypatch, fail=("email", "webhook")), AlertsLog()
    at = log.append(0, ALERT)
    first = _worker(log)
    first.handle_alert(ALERT, (0, at))
    ledger = Ledger()
    for action in first.producer.actions:  # the restart: the ledger read back from dose.alert-actions
        ledger.add(action)
    restarted = _worker(log, ledger=ledger)
    restarted.states = first.states  # the alert state index outlives the worker
    log.append(0, WITHDRAWAL)  # published after the last poll; the group's offset is past the alert

    class Idle:
        def assignment(self):
            return [TopicPartition("dose.alerts", 0)]

        def position(self, tps):
            return [TopicPartition("dose.alerts", 0, -1001)]

    restarted.positions = lambda: _alert_positions(Idle())
    mail.fail = set()
    restarted.retry_failed()
    assert len(mail.sent) == 2 and not restarted.ledger.failed  # only the two failed tries before the restart


def test_positions_that_fail_are_retried_not_fatal(monkeypatch):
    from confluent_kafka import KafkaError, KafkaException

    from diana.access.alerts.delivery import Unavailable

    _Mail(monkeypatch)
    worker = _worker(AlertsLog())

    def broken() -> dict[int, int]:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    worker.positions = broken
    with pytest.raises(Unavailable):
        worker._still_open("h1", None)  # a state document with no place: the positions asked, and failing


def test_the_look_ahead_reads_each_record_once_for_a_backlog():
    log = AlertsLog()
    offsets = [log.append(0, {**ALERT, "alert_id": f"a{n}"}) for n in range(50)]
    log.append(0, {**WITHDRAWAL, "alert_id": "a49"})
    watch = WithdrawalWatch(log, default_codec())
    assert [watch.is_withdrawn(f"a{n}", {0: offsets[n] + 1}) for n in range(50)] == [False] * 49 + [True]
    assert log.polls == 50  # before each send the rest of the partition; read once, not 50 times


def test_with_retries_asks_before_each_try():
    answers, calls = iter([True, True, False]), []

    def send() -> str:
        calls.append(1)
        raise OSError("down")

    result = with_retries(send, 5, sleep=lambda _: None, still_open=lambda: next(answers))
    assert (len(calls), result.ok, result.withdrawn, result.attempts) == (2, False, True, 2)


# ---- 2. delivered, then withdrawn: a correction to the same recipients and channels, once


def test_a_delivered_alert_that_is_withdrawn_is_corrected_once_on_each_channel(monkeypatch):
    mail = _Mail(monkeypatch)
    worker = _worker(AlertsLog())
    worker.handle_alert(ALERT, (0, 0))
    worker.handle_alert(WITHDRAWAL, (0, 1))
    corrections = [(channel, text) for kind, channel, text in mail.sent if kind == "correction"]
    assert [c for c, _ in corrections] == ["email", "webhook"]
    text = corrections[0][1]
    assert "WITHDRAWN: superseded by the RDSR's value 62.5 (ctdivol_mGy)" in text and "h1" in text
    assert "95" in text and "ACC7" in text and "SECRET-ID" not in text
    assert "1.2.840.99.1.77" not in text  # the report's UID: the alert did not carry it
    actions = [a["action"] for a in worker.producer.actions]
    assert actions == ["DELIVERED", "DELIVERED", "CORRECTED", "CORRECTED"]
    for action in worker.producer.actions:  # read back from dose.alert-actions, as the worker does
        worker.handle_action(action)
    doc = worker.states.get("h1")
    assert [h["action"] for h in doc["history"]][-2:] == ["CORRECTED", "CORRECTED"]
    assert doc["status"] == "closed" and doc["corrections"] == 2

    # The withdrawal again (a redelivery, a replay), and a worker restarted with the ledger read back.
    worker.handle_alert(WITHDRAWAL, (0, 1))
    ledger = Ledger()
    for action in worker.producer.actions:
        ledger.add(action)
    _worker(ledger=ledger).handle_alert(WITHDRAWAL)
    assert len(mail.sent) == 4


def test_a_correction_that_fails_is_tried_again_by_the_retry_rounds_not_the_alert(monkeypatch):
    mail = _Mail(monkeypatch)
    worker = _worker()
    worker.handle_alert(ALERT)
    mail.fail = {"webhook"}
    worker.handle_alert(WITHDRAWAL)
    assert [a["action"] for a in worker.producer.actions][-2:] == ["CORRECTED", "CORRECTION_FAILED"]
    (key,) = worker.ledger.failed
    assert key.startswith("correction:")
    mail.fail = set()
    worker.retry_failed()
    assert mail.sent[-1][:2] == ("correction", "webhook") and not worker.ledger.failed
    assert worker.producer.actions[-1]["action"] == "CORRECTED"
    assert sum(1 for kind, _, _ in mail.sent if kind == "alert") == 2  # the alert itself never again


def test_an_alert_never_delivered_gets_no_correction(monkeypatch):
    mail = _Mail(monkeypatch, fail=("email", "webhook"))
    worker = _worker()
    worker.handle_alert(ALERT)
    worker.handle_alert(WITHDRAWAL)
    assert all(kind == "alert" for kind, _, _ in mail.sent) and not worker.ledger.failed


# ---- 3. a per-study value under its limit: the same, with the study's new value


def test_an_alert_withdrawn_under_its_limit_is_corrected_with_the_new_value_and_its_own_message(monkeypatch):
    mail = _Mail(monkeypatch)
    worker = _worker()
    study_sum = {**ALERT, "rule": "CT study DLP", "metric": "dlp_mGycm", "value": 1200.0, "threshold": 1000.0}
    study_sum["message"] = "CT study DLP: study dlp_mGycm 1200 exceeds 1000"
    worker.handle_alert(study_sum)
    note = "withdrawn: the study's value (now 800) is no longer over the limit since 1.2.840.99.1.77"
    withdrawal = {**study_sum, **{k: WITHDRAWAL[k] for k in ("superseded_by", "revision")}}
    withdrawal.update(withdrawn_reason="under_limit", replaced_value=800.0, message=note)
    worker.handle_alert(withdrawal)
    (text,) = {text for kind, _, text in mail.sent if kind == "correction"}
    assert "no longer over the limit 1000: dlp_mGycm is now 800" in text
    assert "study dlp_mGycm 1200 exceeds 1000" in text and "1.2.840.99.1.77" not in text
    closing = worker.states.get("h1")["history"][-1]
    assert (closing["action_id"], closing["note"]) == ("withdrawn:h1", note)


def test_a_superseded_withdrawal_with_no_value_is_corrected_without_one(monkeypatch):
    mail = _Mail(monkeypatch)
    worker = _worker()
    worker.handle_alert(ALERT)
    worker.handle_alert({**WITHDRAWAL, "replaced_value": None})
    texts = {text for kind, _, text in mail.sent if kind == "correction"}
    assert texts and all("superseded by the study's dose report (RDSR)" in t for t in texts)


def test_a_withdrawal_written_before_v3_and_replayed_sends_no_correction(monkeypatch):
    """A replay of the dose worker (or a delivery worker under a new group) reads withdrawals recorded
    before v3 again, long after; before, each delivered one was mailed a correction then."""
    mail = _Mail(monkeypatch)
    ledger = Ledger()
    for channel in ("email", "webhook"):
        ledger.add(delivery.delivery_action("h1", "physicist", channel, True, 1, "accepted"))
    worker = _worker(ledger=ledger)
    worker.handle_alert({**WITHDRAWAL, "withdrawn_reason": None, "replaced_value": None})
    assert mail.sent == [] and worker.producer.actions == []
    assert worker.states.get("h1")["status"] == "closed" and "h1" in worker.ledger.withdrawn


def test_a_replay_of_a_withdrawal_of_this_release_sends_no_correction_again(monkeypatch):
    mail = _Mail(monkeypatch)
    worker = _worker()
    worker.handle_alert(ALERT)
    worker.handle_alert(WITHDRAWAL)
    assert [k for k, _, _ in mail.sent].count("correction") == 2
    ledger = Ledger()  # a worker under a new group: the ledger read whole from dose.alert-actions
    for action in worker.producer.actions:
        ledger.add(action)
    replaying = _worker(ledger=ledger)
    replaying.handle_alert(ALERT)
    replaying.handle_alert(WITHDRAWAL)
    assert [k for k, _, _ in mail.sent].count("correction") == 2 and replaying.producer.actions == []


def test_a_correction_quotes_the_value_and_message_that_were_sent(monkeypatch):
    """Before: the alert's latest value and message (a re-evaluation's 1500), which was never sent."""
    mail = _Mail(monkeypatch)
    worker = _worker()
    sent = {**ALERT, "rule": "CT study DLP", "metric": "dlp_mGycm", "value": 1200.0, "threshold": 1000.0}
    sent["message"] = "CT study DLP: study dlp_mGycm 1200 exceeds 1000"
    worker.handle_alert(sent)
    reevaluated = {**sent, "revision": 2, "value": 1500.0, "message": "CT study DLP: study dlp_mGycm 1500 exceeds 1000"}
    worker.handle_alert(reevaluated)  # the same id: its state updated, not sent again
    withdrawal = {**reevaluated, "revision": 3, "superseded_by": "9.9", "message": "withdrawn: ..."}
    worker.handle_alert({**withdrawal, "withdrawn_reason": "under_limit", "replaced_value": 800.0})
    (text,) = {text for kind, _, text in mail.sent if kind == "correction"}
    assert "sent before with the value 1200" in text and "study dlp_mGycm 1200 exceeds 1000" in text
    assert "1500" not in text


def test_corrections_go_where_the_alert_was_delivered_not_where_routing_sends_now(monkeypatch):
    """Before: the recipients the routing rules choose now, at their addresses now."""
    mail = _Mail(monkeypatch)
    worker = _worker()
    worker.handle_alert(ALERT)
    # Since: the recipient takes only DRL alerts, and its mail goes to another address.
    worker.routing = Routing(
        (
            Recipient(
                "physicist", email="new@h.example", webhook="http://127.0.0.1:1/hook", rule_types=frozenset({"drl"})
            ),
        )
    )
    worker.handle_alert(WITHDRAWAL)
    corrections = [channel for kind, channel, _ in mail.sent if kind == "correction"]
    assert corrections == ["webhook"]  # the old mail address is not known any more: no mail to the new one
    assert [a["action"] for a in worker.producer.actions] == ["DELIVERED", "DELIVERED", "CORRECTED"]


def test_an_alert_closed_by_hand_is_not_sent_again_by_the_retry_rounds(monkeypatch):
    from diana.access.alerts.workflow import human_action

    mail = _Mail(monkeypatch, fail=("email", "webhook"))
    worker = _worker()
    worker.handle_alert(ALERT)
    assert len(worker.ledger.failed) == 2
    worker.handle_action(human_action("h1", "ACKNOWLEDGED", "physicist", "protocol"))
    worker.retry_failed()
    assert len(mail.sent) == 4  # acknowledged: still open, still sent
    worker.handle_action(human_action("h1", "CLOSED", "physicist"))
    worker.retry_failed()
    assert len(mail.sent) == 4 and not worker.ledger.failed


def test_a_look_ahead_cut_by_its_time_goes_on_from_where_it_stopped():
    from diana.access.alerts.lookahead import NotReadInTime

    log = AlertsLog()
    for n in range(10):
        log.append(0, {**ALERT, "alert_id": f"a{n}"})
    log.append(0, {**WITHDRAWAL, "alert_id": "a0"})
    ticks = iter(range(1000))
    watch = WithdrawalWatch(log, default_codec(), timeout_s=4, clock=lambda: float(next(ticks)))
    cut = 0
    while True:  # the alert waits meanwhile (Unavailable: its step tried again), it is not sent on a guess
        try:
            withdrawn = watch.is_withdrawn("a0", {0: 1})
            break
        except NotReadInTime:
            cut += 1
    assert withdrawn and cut >= 2
    assert log.polls == 10  # each record once across the tries: before, each try began again and never ended


def test_an_alert_closed_by_hand_is_counted_as_closed_not_withdrawn(monkeypatch):
    from diana.access.alerts.workflow import human_action

    def count(outcome: str) -> float:
        return delivery.SENT.labels("email", outcome)._value.get()

    _Mail(monkeypatch, fail=("email", "webhook"))
    worker = _worker()
    worker.handle_alert(ALERT)
    worker.handle_action(human_action("h1", "ACKNOWLEDGED", "physicist", "protocol"))
    worker.handle_action(human_action("h1", "CLOSED", "physicist"))
    closed, withdrawn = count("closed"), count("withdrawn")
    worker.retry_failed()
    assert (count("closed") - closed, count("withdrawn") - withdrawn) == (1, 0)


def test_the_look_ahead_holds_no_partition_between_reads_and_forgets_what_the_worker_read():
    log = AlertsLog()
    at = log.append(0, ALERT)
    log.append(0, WITHDRAWAL)
    worker = _worker(log)
    assert not worker._still_open("h1", {0: at + 1})
    assert not log.assigned  # before: still assigned, a real consumer fetching on between sends
    assert worker.watch.withdrawn == {"h1"}
    worker.handle_alert(WITHDRAWAL, (0, at + 1))  # read in turn: the ledger has it, the watch forgets it
    assert worker.watch.withdrawn == set() and not worker._still_open("h1", {0: at + 1})


def test_a_correction_never_says_no_longer_over_the_limit_of_a_value_over_it():
    alert = {**ALERT, "metric": "dlp_mGycm", "value": 1200.0, "threshold": 1000.0}
    text = correction_text({**alert, "withdrawn_reason": "under_limit", "replaced_value": 1200.0})
    assert "no longer over the limit" not in text.splitlines()[0] and "is now 1200" in text
    text = correction_text({**alert, "withdrawn_reason": "under_limit", "replaced_value": 800.0})
    assert (
        text.splitlines()[0] == "WITHDRAWN: the study's value is no longer over the limit 1000: dlp_mGycm is now 800."
    )


# ---- 4. a correction not sent: never to an address it cannot check, never naming what the alert did not;
# logged and counted by reason (diana_alert_corrections_not_sent_total)


def _not_sent(channel: str, reason: str) -> float:
    labels = {"channel": channel, "reason": reason}
    return REGISTRY.get_sample_value("diana_alert_corrections_not_sent_total", labels) or 0.0


@pytest.fixture
def captured(monkeypatch):
    # A logger already used stays bound to its handler (cache_logger_on_first_use): capture_logs needs a fresh one.
    monkeypatch.setattr(delivery, "log", structlog.get_logger("diana.alerts.delivery"))
    with capture_logs() as logs:
        yield logs


def test_an_alert_delivered_before_address_hashes_were_kept_gets_no_correction(monkeypatch, captured):
    """Before: the correction went to the recipient's address as it is now, unchecked: a dose alert
    naming a study, mailed to whoever has that address now."""
    mail = _Mail(monkeypatch)
    worker = _worker()
    worker.handle_alert(ALERT)
    worker.states.docs["h1"].pop("sent")  # as an older release kept it: no send, no address hash
    worker.routing = Routing((Recipient("physicist", email="now-someone-else@h.example", webhook="http://h/new"),))
    before = {c: _not_sent(c, "no_address_hash") for c in ("email", "webhook")}
    worker.handle_alert(WITHDRAWAL)
    worker.handle_alert(WITHDRAWAL)  # read again (a redelivery, a step tried again): logged and counted once
    assert [kind for kind, _, _ in mail.sent] == ["alert", "alert"]
    assert [a["action"] for a in worker.producer.actions] == ["DELIVERED", "DELIVERED"] and not worker.ledger.failed
    assert {c: _not_sent(c, "no_address_hash") - before[c] for c in before} == {"email": 1, "webhook": 1}
    lines = [e for e in captured if e["event"] == "alert.correction.not_sent"]
    assert [(e["channel"], e["reason"]) for e in lines] == [
        ("email", "no_address_hash"),
        ("webhook", "no_address_hash"),
    ]
    assert not any(v in str(lines) for v in ("1.2.840.99.1", "ACC7", "someone-else", "h/new"))


def test_a_lost_state_s_under_limit_withdrawal_corrects_no_one_with_the_report_s_uid(monkeypatch, captured):
    """The alert's state document lost (the index deleted, not rebuilt): before, the correction was built
    from the withdrawal record, whose message names the SOP Instance UID of the object that brought the
    value under its limit, and went to the address the recipient has now."""
    mail = _Mail(monkeypatch)
    ledger = Ledger()
    for channel in ("email", "webhook"):
        ledger.add(delivery.delivery_action("h1", "physicist", channel, True, 1, "accepted"))
    worker = _worker(ledger=ledger)
    note = "withdrawn: the study's value (now 800) is no longer over the limit since 1.2.840.99.1.77"
    withdrawal = {**WITHDRAWAL, "withdrawn_reason": "under_limit", "replaced_value": 800.0, "message": note}
    before = {c: _not_sent(c, "state_lost") for c in ("email", "webhook")}
    worker.handle_alert(withdrawal)
    assert "1.2.840.99.1.77" not in str(mail.sent)
    assert mail.sent == [] and worker.producer.actions == []
    assert {c: _not_sent(c, "state_lost") - before[c] for c in before} == {"email": 1, "webhook": 1}
    assert worker.states.get("h1")["status"] == "closed"
    # A worker restarted since reads it again: still nothing sent (the document it finds is the withdrawal's).
    ledger_again = Ledger()
    for channel in ("email", "webhook"):
        ledger_again.add(delivery.delivery_action("h1", "physicist", channel, True, 1, "accepted"))
    restarted = _worker(ledger=ledger_again)
    restarted.states = worker.states
    restarted.handle_alert(withdrawal)
    assert mail.sent == [] and _not_sent("email", "state_lost") - before["email"] == 2
    assert "1.2.840.99.1.77" not in str(captured)


def test_corrections_not_sent_are_counted_by_reason(monkeypatch, captured):
    """Before: a log line only, and none at all when a retry round dropped a failed correction whose
    recipient had left the routing file or whose alert state was gone."""
    mail = _Mail(monkeypatch)
    worker = _worker()
    worker.handle_alert(ALERT)
    # Since: the mail address changed, the webhook removed.
    worker.routing = Routing((Recipient("physicist", email="new@h.example"),))
    changed, removed = _not_sent("email", "address_changed"), _not_sent("webhook", "not_routed")
    worker.handle_alert(WITHDRAWAL)
    assert [kind for kind, _, _ in mail.sent] == ["alert", "alert"]
    assert (_not_sent("email", "address_changed") - changed, _not_sent("webhook", "not_routed") - removed) == (1, 1)

    # A correction that failed, its recipient then removed from the routing file: the retry round drops it.
    mail, worker = _Mail(monkeypatch), _worker()
    worker.handle_alert({**ALERT, "alert_id": "h2"})
    mail.fail = {"webhook"}  # its correction fails
    worker.handle_alert({**WITHDRAWAL, "alert_id": "h2"})
    assert len(worker.ledger.failed) == 1
    worker.routing = Routing(())
    removed = _not_sent("webhook", "not_routed")
    worker.retry_failed()
    assert not worker.ledger.failed and _not_sent("webhook", "not_routed") - removed == 1

    # The same with the alert's state document gone.
    mail, worker = _Mail(monkeypatch), _worker()
    worker.handle_alert({**ALERT, "alert_id": "h3"})
    mail.fail = {"webhook"}  # its correction fails
    worker.handle_alert({**WITHDRAWAL, "alert_id": "h3"})
    del worker.states.docs["h3"]
    lost = _not_sent("webhook", "state_lost")
    worker.retry_failed()
    assert not worker.ledger.failed and _not_sent("webhook", "state_lost") - lost == 1
    reasons = [e["reason"] for e in captured if e["event"] == "alert.correction.not_sent"]
    assert reasons == ["address_changed", "not_routed", "not_routed", "state_lost"]


def test_the_reasons_a_correction_is_not_sent_are_a_fixed_set():
    """Every reason reported from the start (0), and no other: a label Prometheus keeps bounded."""
    for channel in ("email", "webhook"):
        for reason in ("address_changed", "not_routed", "no_address_hash", "state_lost"):
            labels = {"channel": channel, "reason": reason}
            assert REGISTRY.get_sample_value("diana_alert_corrections_not_sent_total", labels) is not None
    assert delivery.CORRECTION_NOT_SENT_REASONS == ("address_changed", "not_routed", "no_address_hash", "state_lost")
