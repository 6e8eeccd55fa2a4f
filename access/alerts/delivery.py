"""`diana alerts deliver`: each dose alert to each routed recipient once, by e-mail and webhook.

The ledger of what was delivered is ``dose.alert-actions`` itself: at start the worker reads it
from the beginning; for every alert on ``dose.alerts`` (from the worker's consumer group offset) it
sends to each (recipient, channel) not in the ledger, then writes DELIVERED (or DELIVERY_FAILED
after the configured attempts) and waits for the broker's acknowledgment before committing the
alert's offset (asynchronously, as the sinks and `diana route` do: a synchronous commit can wait for
ever inside librdkafka after a broker restart, confluent-kafka-python issue 1801; a commit lost so
brings the alert again, and the ledger does not send it twice). So a redelivered alert (the dose
worker re-publishing after a restart, a replay, this worker restarted after kill -9 anywhere but
inside one send) is not sent again. The gap left —
stopped after the receiver accepted and before the broker acknowledged the ledger write (a few
milliseconds, or the length of a broker outage) — resends with the same Message-ID / Idempotency-Key,
so the receiver can tell (docs/DOSE.md).

The same worker keeps the alert state index (workflow.py) from both topics.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConflictError, NotFoundError, TransportError
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from prometheus_client import Counter, start_http_server

from diana.access.alerts.channels import (
    EXTRA_FIELDS,
    Delivery,
    SmtpServer,
    send_correction_email,
    send_correction_webhook,
    send_email,
    send_webhook,
    with_retries,
)
from diana.access.alerts.lookahead import NotReadInTime, WithdrawalWatch
from diana.access.alerts.routing import Routing
from diana.access.alerts.workflow import (
    STATE_MAPPING,
    apply_action,
    correction_key,
    delivery_action,
    delivery_action_id,
    delivery_key,
    is_correction,
    is_withdrawal,
    raised_state,
    withdrawal_action,
)
from diana.clients import kafka_consumer, kafka_producer, opensearch_client
from diana.config import AlertsConfig, Config, ConfigError, remote_plain_http_hosts, warn_clear_text
from diana.credentials import secret_value
from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import ALERT_ACTIONS, DOSE_ALERTS
from diana.sinks.consumer import commit_written_or_log, log_failed_commits

__all__ = [
    "AlertStates",
    "Ledger",
    "read_ledger",
    "run_delivery",
    "serve",
    "webhooks_in_clear",
    "DeliveryWorker",
    "handle_then_commit",
]

log = structlog.get_logger("diana.alerts.delivery")
SENT = Counter("diana_alert_deliveries_total", "Alert deliveries by channel and outcome", ["channel", "outcome"])
# Why a correction owed (the alert was DELIVERED there, then withdrawn) was not sent: the address changed
# since (its hash differs), the recipient or channel left the routing file, the delivery kept no address
# hash (an older release, a rebuilt state index), or the alert's state document was lost.
CORRECTION_NOT_SENT_REASONS = ("address_changed", "not_routed", "no_address_hash", "state_lost")
CORRECTIONS_NOT_SENT = Counter(
    "diana_alert_corrections_not_sent_total",
    "Corrections of delivered, then withdrawn, alerts not sent, by channel and reason",
    ["channel", "reason"],
)
for _channel in ("email", "webhook"):
    for _reason in CORRECTION_NOT_SENT_REASONS:
        CORRECTIONS_NOT_SENT.labels(_channel, _reason)  # reported as 0 from the start
# A delivery failing again for the same reason is recorded at most this often: a dead address retried
# every 5 minutes wrote 288 DELIVERY_FAILED a day into its alert's history.
SAME_FAILURE_RECORDED_EVERY = timedelta(hours=1)


class Unavailable(RuntimeError):
    """The broker or the alert state index did not take a write for now: the step is tried again."""


def _passes(exc: Exception) -> bool:
    """What stops a step for now, not for good: OpenSearch not answering or overloaded (429, 5xx), the
    broker not acknowledging. The step (an alert, an action, a retry round) is tried again with
    backoff instead of ending the worker. Anything else (a 400, a 403: a request that will never be
    taken) still ends it, loudly, rather than hold every later alert behind it unnoticed."""
    if isinstance(exc, (OSConnectionError, Unavailable, NotReadInTime)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, TransportError) and (not isinstance(status, int) or status == 429 or status >= 500)


class AlertStates:
    """The alert state documents in OpenSearch, updated with optimistic concurrency."""

    def __init__(self, client: OpenSearch, prefix: str):
        self.client, self.index = client, IndexLayout(prefix).alias("dose-alert-state")

    def ensure(self) -> None:
        if not self.client.indices.exists(index=self.index):
            try:
                self.client.indices.create(index=self.index, body=STATE_MAPPING)
            except Exception as exc:  # created meanwhile by another worker
                if "resource_already_exists" not in str(exc):
                    raise

    def get(self, alert_id: str) -> dict | None:
        try:
            return self.client.get(index=self.index, id=alert_id)["_source"]
        except NotFoundError:
            return None

    def update(self, alert_id: str, change) -> dict:
        for _ in range(20):
            try:
                found = self.client.get(index=self.index, id=alert_id)
                doc, seq = found["_source"], {"if_seq_no": found["_seq_no"], "if_primary_term": found["_primary_term"]}
            except NotFoundError:
                doc, seq = None, {"op_type": "create"}
            new = change(doc)
            try:
                self.client.index(index=self.index, id=alert_id, body=new, refresh="wait_for", **seq)
                return new
            except ConflictError:
                continue  # written meanwhile: read again
        raise Unavailable(f"alert state {alert_id}: too many concurrent updates")

    def search(self, status: str | None, size: int = 100) -> list[dict]:
        if not self.client.indices.exists(index=self.index):
            return []
        query = {"term": {"status": status}} if status else {"match_all": {}}
        body = {"size": size, "query": query, "sort": [{"raised_at": {"order": "desc", "unmapped_type": "date"}}]}
        return [h["_source"] for h in self.client.search(index=self.index, body=body)["hits"]["hits"]]


@dataclass
class Ledger:
    """What dose.alert-actions says so far: deliveries made, failed ones not made since (tried again), and
    those refused for good (a DELIVERY_FAILED marked permanent: never tried again)."""

    delivered: set[str] = field(default_factory=set)
    failed: dict[str, dict] = field(default_factory=dict)  # delivery key -> its latest DELIVERY_FAILED action
    refused: set[str] = field(default_factory=set)
    withdrawn: set[str] = field(default_factory=set)  # alert ids the dose worker withdrew: sent to no one
    closed: set[str] = field(default_factory=set)  # alert ids closed by hand: no longer sent either
    # Corrections this run decided not to send (logged and counted once, though a step tried again or a
    # withdrawal read again decides so again; nothing is recorded on the topic: nothing was sent).
    not_corrected: set[str] = field(default_factory=set)

    def add(self, action: dict) -> None:
        """A correction (CORRECTED, CORRECTION_FAILED: key ``correction:...``) is kept as a delivery is; a
        withdrawal drops the alert's failed deliveries, not its failed corrections."""
        key = delivery_key(action)
        if action.get("action") == "CLOSED" and not is_withdrawal(action):
            self.closed.add(action["alert_id"])
        if is_withdrawal(action):
            self.withdrawn.add(action["alert_id"])
            self.failed = {
                k: a for k, a in self.failed.items() if a["alert_id"] != action["alert_id"] or is_correction(k)
            }
        elif action.get("action") in ("DELIVERED", "CORRECTED"):
            self.delivered.add(key)
            self.failed.pop(key, None)
            self.refused.discard(key)
        elif action.get("action") in ("DELIVERY_FAILED", "CORRECTION_FAILED") and key not in self.delivered:
            if action.get("permanent"):
                self.refused.add(key)
                self.failed.pop(key, None)
            elif key not in self.refused and (action["alert_id"] not in self.withdrawn or is_correction(key)):
                self.failed[key] = action

    def done(self, key: str) -> bool:
        """Delivered, or refused for good: not sent again."""
        return key in self.delivered or key in self.refused


def read_ledger(cfg: Config, codec: Codec, timeout: float = 30.0) -> Ledger:
    """Every delivery action on dose.alert-actions, read from the beginning to its end."""
    # never commits: assign() reads without the group
    consumer = kafka_consumer(
        cfg.kafka, "diana-alert-ledger", {"enable.auto.commit": False, "isolation.level": "read_committed"}
    )
    ledger = Ledger()
    try:
        meta = consumer.list_topics(ALERT_ACTIONS.name, timeout=timeout).topics.get(ALERT_ACTIONS.name)
        if meta is None or not meta.partitions:
            return ledger
        ends = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(ALERT_ACTIONS.name, p), timeout=timeout)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(ALERT_ACTIONS.name, p, 0) for p in ends])
        deadline = time.monotonic() + timeout * 4
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            try:
                _, action = codec.decode(msg.value(), expect=ALERT_ACTIONS.value_schema)
            except DecodeError:
                action = {}
            if action:
                ledger.add(action)
            if (msg.offset() or 0) + 1 >= ends.get(msg.partition() or 0, 0):
                ends.pop(msg.partition() or 0, None)
        if ends:
            raise RuntimeError(f"could not read {ALERT_ACTIONS.name} to its end within {timeout * 4:.0f} s")
        return ledger
    finally:
        consumer.close()


def smtp_server(alerts: AlertsConfig) -> SmtpServer:
    """[alerts] smtp_*, the password read (DIANA_ALERTS_SMTP_PASSWORD or smtp_password_file) once, at start."""
    password = secret_value("alerts", "smtp_password", alerts.smtp_password, alerts.smtp_password_file)
    if not (alerts.smtp_username.isascii() and password.isascii()):
        # smtplib sends a login as ASCII: anything else failed every delivery, its error quoting a character.
        raise ConfigError("[alerts] smtp_username and the SMTP password: an SMTP login takes ASCII characters only")
    return SmtpServer(
        alerts.smtp_host,
        alerts.smtp_port,
        alerts.smtp_from,
        alerts.smtp_security,
        alerts.smtp_ca_file,
        alerts.smtp_username,
        password,
    )


@dataclass
class DeliveryWorker:
    cfg: Config
    routing: Routing
    states: AlertStates
    codec: Codec = field(default_factory=default_codec)
    ledger: Ledger = field(default_factory=Ledger)
    # Reads dose.alerts ahead of the consumer for withdrawals not yet read (lookahead.py); ``positions``:
    # the consumer's next offset on each partition of dose.alerts it is assigned (for retries).
    watch: WithdrawalWatch | None = None
    positions: Callable[[], dict[int, int]] | None = None

    def __post_init__(self) -> None:
        # No delivery timeout: librdkafka's (5 min) dropped an action the broker had not taken, and its
        # flush then reported nothing pending: the alert was committed without its record.
        self.producer = kafka_producer(
            self.cfg.kafka, {"enable.idempotence": True, "acks": "all", "message.timeout.ms": 0}
        )
        self.smtp = smtp_server(self.cfg.alerts)
        unknown = sorted(set(self.cfg.alerts.message_extra_fields) - set(EXTRA_FIELDS))
        if unknown:
            raise ConfigError(f"[alerts] message_extra_fields: {unknown[0]!r} is not one of {', '.join(EXTRA_FIELDS)}")
        # Actions the producer reported as not taken (purged, refused): a flush then says nothing is
        # pending, so ``acknowledged`` looks here too.
        self._not_taken: list[tuple[bytes, bytes, str]] = []

    def _reported(self, err: KafkaError | None, msg: Message) -> None:
        """A delivery report, served inside flush() on this thread."""
        if err is not None:
            self._not_taken.append((msg.key(), msg.value(), err.name()))

    def _produce(self, key: bytes, value: bytes) -> None:
        self.producer.produce(ALERT_ACTIONS.name, key=key, value=value, on_delivery=self._reported)

    def _record(self, action: dict) -> None:
        """Queue the action and put it in this run's ledger at once: a step tried again while the broker
        does not acknowledge it (``until_done``) must not send the same message again, once per try."""
        self._produce(action["alert_id"].encode(), self.codec.encode(ALERT_ACTIONS.value_schema, action))
        self.ledger.add(action)
        self.acknowledged()

    def acknowledged(self) -> None:
        """Every action queued so far acknowledged by the broker, or Unavailable (the step is tried again;
        the producer keeps them queued meanwhile, and one it reported as not taken is produced again)."""
        if self.producer.flush(30) != 0:
            raise Unavailable(f"{ALERT_ACTIONS.name}: the broker did not acknowledge the action in 30 s")
        if self._not_taken:
            not_taken, self._not_taken = self._not_taken, []
            for key, value, _ in not_taken:
                self._produce(key, value)
            raise Unavailable(f"{ALERT_ACTIONS.name}: {len(not_taken)} actions not taken ({not_taken[0][2]})")

    def _send(
        self,
        channel: str,
        address: str,
        alert: dict,
        key: str,
        attempts: int | None = None,
        still_open: Callable[[], bool] | None = None,
        correction: bool = False,
    ) -> Delivery:
        a = self.cfg.alerts
        tries, extra = attempts or a.attempts, a.message_extra_fields
        if channel == "email":
            mail = send_correction_email if correction else send_email
            return with_retries(
                lambda: mail(self.smtp, address, alert, key, a.timeout_s, extra), tries, still_open=still_open
            )
        post = send_correction_webhook if correction else send_webhook
        return with_retries(lambda: post(address, alert, key, a.timeout_s, extra), tries, still_open=still_open)

    def _still_open(self, alert_id: str, after: dict[int, int] | None) -> bool:
        """Asked just before each try of a send: False once the alert is withdrawn, as far as ``dose.alerts``
        says now. The ledger first (a withdrawal or closing read already), then the partitions read ahead
        (lookahead.py): ``after``, the alert's partition from past its offset; for a retry (None), every
        partition of ``dose.alerts`` this worker consumes, from its consumer's position."""
        if alert_id in self.ledger.withdrawn or alert_id in self.ledger.closed:
            return False
        if self.watch is None:
            return True
        try:
            # Without the alert's place (a state document written before it was kept): the consumer's
            # positions, which confluent-kafka gives only on partitions it consumed from since its start.
            reach = after if after is not None else (self.positions() if self.positions is not None else {})
            withdrawn = self.watch.is_withdrawn(alert_id, reach)
        except KafkaException as exc:
            raise Unavailable(f"{DOSE_ALERTS.name}: not read ahead ({type(exc).__name__})") from exc
        if withdrawn:
            # Seen ahead of the consumer: its withdrawal is handled (closed, corrected) when read in turn.
            self.ledger.withdrawn.add(alert_id)
            self.ledger.failed = {
                k: a for k, a in self.ledger.failed.items() if a["alert_id"] != alert_id or is_correction(k)
            }
        return not withdrawn

    def _deliver(
        self,
        alert: dict,
        recipient: str,
        channel: str,
        address: str,
        again: bool = False,
        after: dict[int, int] | None = None,
        kept: bool = False,
    ) -> Delivery | None:
        """``again``: a failed delivery is tried (retry_failed), once: the retry interval is its wait;
        otherwise it is left to retry_failed, so a step tried again while the broker is down does not
        send and record it once per try. Each try only while the alert is still open (_still_open;
        ``after``: where on dose.alerts its withdrawal would be). ``kept``: what it sends is in the state
        document already (handle_alert's one update). The send's result; None when nothing was sent."""
        key = delivery_action_id(alert["alert_id"], recipient, channel)
        if self.ledger.done(key) or (key in self.ledger.failed and not again):
            return None  # the ledger says it went out already or was refused for good, or it failed: retry_failed's
        # What goes out, kept before the send (a correction quotes it, to the same address): a state
        # update that fails stops the step before anything is sent.
        if not kept:
            entry = _sent_entry(alert, recipient, channel, address)
            self.states.update(
                alert["alert_id"], lambda doc: _with_sent(doc or raised_state(alert, None), {key: entry})
            )
        result = self._send(
            channel,
            address,
            alert,
            key,
            attempts=1 if again else None,
            still_open=lambda: self._still_open(alert["alert_id"], after),
        )
        return self._outcome(alert["alert_id"], recipient, channel, key, result, correction=False)

    def _correct(self, doc: dict, recipient: str, channel: str, again: bool = False) -> Delivery | None:
        """The correction of a withdrawn alert (``doc``: its state document) to a (recipient, channel) it
        was delivered to, once (its own key in the ledger), with the alert's retry rules: quoting the
        value and message that delivery went with, to the address it went to. None when nothing was sent."""
        delivered = delivery_action_id(doc["alert_id"], recipient, channel)
        if delivered not in self.ledger.delivered:
            return None  # never delivered there: nothing to correct
        key = correction_key(doc["alert_id"], recipient, channel)
        if self.ledger.done(key) or (key in self.ledger.failed and not again):
            return None
        entry = (doc.get(_SENT) or {}).get(delivered) or {}
        address = self._address(recipient, channel)
        # Sent only to the address the alert went to, as its kept hash shows: the old address is not known
        # any more, and a dose alert's correction names its study, so an address that may be someone else's
        # now (changed, or no hash to check it by) gets nothing. A document rebuilt from the withdrawal
        # (the alert's own lost) has no hash either, and its message is the withdrawal's, naming an object.
        if doc.get(_FROM_WITHDRAWAL):
            why = "state_lost"
        elif address is None:
            why = "not_routed"
        elif not entry.get("address_sha256"):
            why = "no_address_hash"
        elif entry["address_sha256"] != _address_hash(address):
            why = "address_changed"
        else:
            why = None
        if why is not None:
            self.ledger.failed.pop(key, None)
            self._not_corrected(key, {"alert_id": doc["alert_id"], "recipient": recipient, "channel": channel}, why)
            return None
        assert address is not None  # else not_routed
        as_sent = {**doc, **{f: entry[f] for f in _AS_SENT if f in entry}}
        result = self._send(channel, address, as_sent, key, attempts=1 if again else None, correction=True)
        return self._outcome(doc["alert_id"], recipient, channel, key, result, correction=True)

    def _not_corrected(self, key: str, delivery: dict, reason: str) -> None:
        """A correction owed and not sent (``reason``, one of CORRECTION_NOT_SENT_REASONS): logged and counted,
        once per run, for an operator to follow up (the alert id; no study, no address)."""
        if key in self.ledger.not_corrected:
            return
        self.ledger.not_corrected.add(key)
        CORRECTIONS_NOT_SENT.labels(delivery.get("channel"), reason).inc()
        log.warning(
            "alert.correction.not_sent",
            alert_id=delivery.get("alert_id"),
            recipient=delivery.get("recipient"),
            channel=delivery.get("channel"),
            reason=reason,
        )

    def _address(self, recipient: str, channel: str) -> str | None:
        """The address of ``recipient``'s ``channel`` in the routing file now (None: not there)."""
        found = next((r for r in self.routing.recipients if r.name == recipient), None)
        return dict(found.channels()).get(channel) if found else None

    def _delivered_to(self, doc: dict) -> list[tuple[str, str]]:
        """The (recipient, channel) pairs the alert may have been delivered to: those its document kept
        a send for, and every recipient's channel in the routing file (an alert delivered before sends
        were kept); _correct keeps those the ledger has DELIVERED, whatever the routing rules say now."""
        pairs = [(e.get("recipient"), e.get("channel")) for e in (doc.get(_SENT) or {}).values()]
        pairs += [(r.name, c) for r in self.routing.recipients for c, _ in r.channels()]
        return [p for p in dict.fromkeys(pairs) if p[0] and p[1]]

    def _outcome(
        self, alert_id: str, recipient: str, channel: str, key: str, result: Delivery, correction: bool
    ) -> Delivery:
        """Count, log and record a send's result (a failure like the last one recorded lately is not)."""
        if result.withdrawn:
            self.ledger.failed.pop(key, None)
            # Closed by hand (diana alerts close), not withdrawn by the dose worker: its own outcome.
            by_hand = alert_id in self.ledger.closed and alert_id not in self.ledger.withdrawn
            outcome = "closed" if by_hand else "withdrawn"
            SENT.labels(channel, outcome).inc()
            log.info(f"alert.delivery.{outcome}", alert_id=alert_id, recipient=recipient, channel=channel)
            return result
        outcome = "delivered" if result.ok else "refused" if result.permanent else "failed"
        SENT.labels(channel, f"correction_{outcome}" if correction else outcome).inc()
        log.info(
            "alert.correction" if correction else "alert.delivery",
            alert_id=alert_id,
            recipient=recipient,
            channel=channel,
            ok=result.ok,
            attempts=result.attempts,
            permanent=result.permanent,
        )
        previous = self.ledger.failed.get(key)
        if not result.ok and not result.permanent and previous is not None and _recorded_lately(previous, result):
            return result  # the same failure, recorded less than SAME_FAILURE_RECORDED_EVERY ago
        action = delivery_action(
            alert_id, recipient, channel, result.ok, result.attempts, result.detail, result.permanent, correction
        )
        self._record(action)
        return result

    def handle_alert(self, alert: dict, origin: tuple[int, int] | None = None) -> None:
        """``origin``: the alert's (partition, offset) on dose.alerts, where its withdrawal is looked for."""
        after = None if origin is None else {origin[0]: origin[1] + 1}
        if alert.get("superseded_by"):
            # Withdrawn: closed (the dose worker's action, applied here too in case this comes first), its
            # failed deliveries not tried again, nothing sent; the state keeps when it was raised. Where
            # it was delivered, a correction goes, once.
            action = withdrawal_action(alert)
            self.ledger.add(action)
            if self.watch is not None:
                self.watch.forget(alert["alert_id"])  # the ledger has it now: the look-ahead's set stays small
            withdrawn = {k: alert.get(k) for k in ("superseded_by", "withdrawn_reason", "replaced_value")}
            doc = self.states.update(
                alert["alert_id"],
                lambda doc: apply_action({**(doc or _from_withdrawal(alert)), **withdrawn}, action),
            )
            log.info("alert.withdrawn", alert_id=alert["alert_id"], reason=alert.get("withdrawn_reason"))
            # Only a withdrawal that carries its reason (DoseAlert v3, written by this release) is
            # corrected: one without is a withdrawal recorded before, re-published by a replay of the
            # dose worker (or read again under a new group), possibly months after the alert. Each
            # correction quotes the alert as that delivery sent it (its document's sends), never the
            # withdrawal's own message (under_limit: the note, naming an object).
            if alert.get("withdrawn_reason"):
                for name, channel in self._delivered_to(doc):
                    self._correct(doc, name, channel)
            self.acknowledged()
            return
        targets = [(r.name, c, a) for r in self.routing.route(alert) for c, a in r.channels()]
        # What each delivery still to make sends, kept in the same update as the alert (one index
        # refresh per alert, not one per delivery).
        sends = {
            key: _sent_entry(alert, name, channel, address)
            for name, channel, address in targets
            if not self.ledger.done(key := delivery_action_id(alert["alert_id"], name, channel))
        }
        self.states.update(alert["alert_id"], lambda doc: _with_sent(_placed(raised_state(alert, doc), origin), sends))
        if alert["alert_id"] in self.ledger.withdrawn:
            self.acknowledged()
            return
        for name, channel, address in targets:
            self._deliver(alert, name, channel, address, after=after, kept=True)
        self.acknowledged()  # tried again after Unavailable: nothing is sent again, the actions are awaited

    def handle_action(self, action: dict) -> None:
        self.ledger.add(action)
        self.states.update(action["alert_id"], lambda doc: apply_action(doc, action))

    def retry_failed(self, budget_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """Send again what failed before (this run or an earlier one), from the alert's state document,
        each once. The round ends after ``budget_s`` (the send under way finished), and the next one
        starts with the deliveries this one did not reach; a server found unreachable is not tried again
        in the round (its other deliveries would each wait for its timeout): a round holds the new
        alerts behind it for the budget and one send at most, not 65 s per failed delivery."""
        recipients = {r.name: r for r in self.routing.recipients}
        started, unreachable = clock(), set()
        for key, failed in list(self.ledger.failed.items()):
            if budget_s is not None and clock() - started >= budget_s:
                log.info("alert.delivery.retry_round_cut", left=len(self.ledger.failed), budget_s=budget_s)
                break
            recipient = recipients.get(failed.get("recipient") or "")
            address = dict(recipient.channels()).get(failed.get("channel") or "") if recipient else None
            if recipient is None or address is None:
                self.ledger.failed.pop(key, None)  # recipient or channel no longer routed
                if is_correction(key):
                    self._not_corrected(key, failed, "not_routed")
                continue
            server = "smtp" if failed["channel"] == "email" else urlsplit(address).netloc
            if server in unreachable:
                continue
            alert = self.states.get(failed["alert_id"])
            if alert is None:
                self.ledger.failed.pop(key, None)
                if is_correction(key):
                    self._not_corrected(key, failed, "state_lost")
                continue
            if is_correction(key):
                result = self._correct(alert, recipient.name, failed["channel"], again=True)
            else:
                # Looked ahead from the alert's own place on dose.alerts, as its first send was.
                after = _after(alert.get(_PLACE))
                result = self._deliver(alert, recipient.name, failed["channel"], address, again=True, after=after)
            if key in self.ledger.failed:  # still failing: to the end of the queue, behind those not tried
                self.ledger.failed[key] = self.ledger.failed.pop(key)
            if result is not None and result.unreachable:
                unreachable.add(server)
        self.acknowledged()  # tried again after Unavailable: the ledger has what was sent, await its record


# The state document's field with the alert's first place on dose.alerts ({"partition", "offset"}): where
# its withdrawal is looked for before a retry (not indexed: the mapping is not dynamic).
_PLACE = "dose_alerts_place"


# The state document's field with what each delivery sent ({delivery key: the fields of _AS_SENT,
# recipient, channel, address_sha256}), kept before the send: a correction quotes it.
_SENT = "sent"
_AS_SENT = ("value", "threshold", "message")


# The state document's field set when it was made from a withdrawal record, the alert's own document lost
# (its fields are the withdrawal's: an under_limit one's message names the object that withdrew it).
_FROM_WITHDRAWAL = "state_from_withdrawal"


def _from_withdrawal(alert: dict) -> dict:
    return {**raised_state(alert, None), _FROM_WITHDRAWAL: True}


def _address_hash(address: str) -> str:
    """An address kept as its hash: a webhook URL may carry a token."""
    return hashlib.sha256(address.encode()).hexdigest()


def _sent_entry(alert: dict, recipient: str, channel: str, address: str) -> dict:
    entry = {f: alert.get(f) for f in _AS_SENT} | {"recipient": recipient, "channel": channel}
    return entry | {"address_sha256": _address_hash(address)}


def _with_sent(doc: dict, entries: dict[str, dict]) -> dict:
    return {**doc, _SENT: {**(doc.get(_SENT) or {}), **entries}} if entries else doc


def _placed(doc: dict, origin: tuple[int, int] | None) -> dict:
    """``doc`` with the alert's place on dose.alerts; the first one kept (a withdrawal is behind every
    publication of its alert, so looking from the earliest is never too late)."""
    if origin is None:
        return doc
    known = doc.get(_PLACE)
    if known and known.get("partition") == origin[0] and known.get("offset", origin[1]) <= origin[1]:
        return doc
    return {**doc, _PLACE: {"partition": origin[0], "offset": origin[1]}}


def _after(place: Any) -> dict[int, int] | None:
    """Where to look for the withdrawal of the alert at ``place``: its partition, from past it."""
    if not isinstance(place, dict) or not isinstance(place.get("offset"), int):
        return None
    return {int(place["partition"]): place["offset"] + 1}


def _recorded_lately(previous: dict, result: Delivery) -> bool:
    """True when ``previous`` (the delivery's latest DELIVERY_FAILED) says the same and is recent."""
    at = previous.get("at")
    if not isinstance(at, datetime):
        return False
    recent = datetime.now(UTC) - (at if at.tzinfo else at.replace(tzinfo=UTC)) < SAME_FAILURE_RECORDED_EVERY
    return recent and previous.get("detail") == result.detail[:500]


def handle_then_commit(worker: DeliveryWorker, consumer: Any, msg: Message) -> None:
    """One message of dose.alerts (delivered) or dose.alert-actions (folded into the ledger and state),
    then committed asynchronously at the consumer's positions, once it is done: at least once."""
    try:
        schema = DOSE_ALERTS.value_schema if msg.topic() == DOSE_ALERTS.name else ALERT_ACTIONS.value_schema
        _, record = worker.codec.decode(msg.value(), expect=schema)
    except DecodeError as exc:
        log.warning("alert.delivery.undecodable", topic=msg.topic(), offset=msg.offset(), reason=str(exc))
    else:
        if msg.topic() == DOSE_ALERTS.name:
            worker.handle_alert(record, (msg.partition() or 0, msg.offset() or 0))
        else:
            worker.handle_action(record)
    commit_written_or_log(consumer, log, "alert.delivery.commit_failed")


def until_done(
    step: Callable[[], None],
    running: Callable[[], bool],
    what: str,
    backoff_s: float = 1.0,
    backoff_max_s: float = 30.0,
) -> bool:
    """Run ``step`` until it ends without a passing failure (``_passes``), waiting longer each time (up to
    ``backoff_max_s``); False if ``running()`` turned false first (the step not done: nothing committed).
    Logged by the failure's type and status only: OpenSearch's errors can quote the alert's document."""
    backoff = backoff_s
    while running():
        try:
            step()
            return True
        except Exception as exc:
            if not _passes(exc):
                raise
            status = getattr(exc, "status_code", None)
            log.warning("alert.delivery.retry", step=what, error=type(exc).__name__, status=status, retry_in_s=backoff)
            until = time.monotonic() + backoff
            while running() and (left := until - time.monotonic()) > 0:
                time.sleep(min(0.25, left))
            backoff = min(backoff * 2, backoff_max_s)
    return False


def webhooks_in_clear(routing: Routing) -> dict[str, list[str]]:
    """The hosts off this machine that http:// webhooks reach in clear (an alert carries the accession)."""
    return {"[alerts] routing: webhook": remote_plain_http_hosts(r.webhook for r in routing.recipients if r.webhook)}


def run_delivery(cfg: Config, routing: Routing, stop_after: float | None = None) -> None:
    """Deliver until SIGTERM/SIGINT (or ``stop_after`` seconds, for tests)."""
    codec = default_codec()
    warn_clear_text(webhooks_in_clear(routing))
    if cfg.alerts.metrics_port:
        start_http_server(cfg.alerts.metrics_port, addr="127.0.0.1")
    states = AlertStates(opensearch_client(cfg.opensearch, timeout=30), cfg.opensearch.index_prefix)
    states.ensure()
    worker = DeliveryWorker(cfg, routing, states, codec, read_ledger(cfg, codec))
    log.info(
        "alert.delivery.start",
        recipients=len(routing.recipients),
        delivered_before=len(worker.ledger.delivered),
        failed_before=len(worker.ledger.failed),
    )
    consumer = kafka_consumer(
        cfg.kafka,
        cfg.alerts.consumer_group,
        {
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "on_commit": log_failed_commits(log, "alert.delivery.commit_failed"),
            # A step waited out (OpenSearch or the broker down for a while) must not cost the group's
            # membership: librdkafka's default (5 min) left the group, and the commit after it failed.
            "max.poll.interval.ms": 24 * 3600 * 1000,
        },
    )
    consumer.subscribe([DOSE_ALERTS.name, ALERT_ACTIONS.name])
    # The withdrawal look-ahead (lookahead.py): assigned, never in the group, never committing; an end of
    # partition event says it read all a read_committed reader may.
    ahead = kafka_consumer(
        cfg.kafka,
        f"{cfg.alerts.consumer_group}-lookahead",
        {"enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": True},
    )
    worker.watch = WithdrawalWatch(ahead, codec, timeout_s=cfg.alerts.timeout_s)
    worker.positions = partial(_alert_positions, consumer)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    started = time.monotonic()

    def still_running() -> bool:
        return running[0] and (stop_after is None or time.monotonic() - started < stop_after)

    try:
        serve(consumer, worker, still_running, cfg.alerts.retry_interval_s, cfg.alerts.retry_budget_s)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        ahead.close()


def _alert_positions(consumer: Any) -> dict[int, int]:
    """The consumer's next offset on each partition of dose.alerts it is assigned (where it has one)."""
    mine = [tp for tp in consumer.assignment() if tp.topic == DOSE_ALERTS.name]
    return {tp.partition: tp.offset for tp in consumer.position(mine) if tp.offset >= 0} if mine else {}


def serve(
    consumer: Any,
    worker: DeliveryWorker,
    still_running: Callable[[], bool],
    retry_interval_s: float,
    retry_budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """The loop: each message handled and committed; failed deliveries tried again, every
    ``retry_interval_s``, only when no message is waiting (new alerts first) and for ``retry_budget_s``
    at a time. Before, a round ran first whatever waited, each failed delivery with all its attempts
    (about 65 s each with an unreachable relay), and held every new alert behind it."""
    last_retry = clock()
    while still_running():
        msg = consumer.poll(0.5)
        if msg is None:
            if worker.ledger.failed and clock() - last_retry >= retry_interval_s:
                until_done(partial(worker.retry_failed, retry_budget_s), still_running, "retry_failed")
                last_retry = clock()
            continue
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("alert.delivery.kafka", error=str(error))
            continue
        if not until_done(partial(handle_then_commit, worker, consumer, msg), still_running, msg.topic()):
            break  # stopped while it waited: not committed, handled again at the next start
