"""An exactly-once consume-transform-produce loop on Kafka transactions, with per-partition state.

Why not Faust here: with faust-streaming 0.15 a kill -9 and restart of the aggregates worker
undercounted, completed series early, or stopped fetching a partition (faust-streaming issues 216,
629), and its exactly_once mode crashed on a rebalance. This loop is the textbook alternative
(Kafka Streams does the same), built on confluent-kafka:

- Each batch of input messages is one Kafka transaction holding the output records, the state
  changes (each changed key once, to a compacted changelog topic co-partitioned with the input)
  and the input offsets. Either all of a batch's effects become visible to read_committed readers, or none do.
- State lives in memory, per input partition, and in a local file per partition written after each
  commit with the changelog position it reflects (local_state.py). On assignment a partition's state
  is rebuilt from that file plus the changelog's tail, or from the whole changelog when the file
  cannot be trusted (state_restore.py), after the broker reports its committed offsets stable (no
  transaction of a dead predecessor pending), so state and input position always agree.
- A failed transaction is aborted, its uncommitted state changes dropped, and the input rewound
  to the committed offsets: the batch is processed again from the same state.

The handler sees a ``Batch``: state reads and writes (namespace, key) and sends.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter

from diana.clients import kafka_consumer, kafka_producer
from diana.config import KafkaConfig
from diana.stream_apps.local_state import Checkpoint, LocalStateError, LocalStates, now_ms
from diana.stream_apps.state_restore import GiveUp, restore_partitions
from diana.stream_apps.state_store import StateStore

__all__ = ["Batch", "GiveUp", "Handler", "TransactionalLoop", "LoopSettings"]

log = structlog.get_logger("diana.stream.transactional")

TRANSACTIONS = Counter("diana_stream_transactions_total", "Transactions of the stream worker, by outcome", ["outcome"])
MESSAGES = Counter("diana_stream_messages_total", "Input messages processed in committed transactions", ["topic"])
FAILED_MESSAGES = Counter(
    "diana_stream_failed_messages_total", "Input messages whose handling raised, dead-lettered", ["topic"]
)
UNENCODABLE = Counter(
    "diana_stream_unencodable_total", "Records of the worker's own the schema refused (not published)", ["topic"]
)

_DELETED = object()
_ABSENT = object()
_SEP = "/"
# Every broker call of a transaction must end well inside transaction.timeout.ms: past it the
# broker aborts the transaction anyway, so waiting longer only delays the retry.
_CALL_SHARE = 0.5  # a call's own timeout, as a share of the transaction timeout
_WATCHDOG_SHARE = 0.8  # the watchdog around a call that may ignore its timeout (librdkafka 5456)


@contextmanager
def _slow(step: str, warn_after_s: float = 5.0) -> Iterator[None]:
    """Log a broker call that took long: where a stalled worker waited, in its log."""
    started = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - started
        if took > warn_after_s:
            log.warning("slow.step", step=step, seconds=round(took, 1))


class _ConsumerFatal(Exception):
    def __init__(self, error: KafkaError) -> None:
        super().__init__(str(error))
        self.error = error


class _Stopped(Exception):
    """A stop was requested while waiting for the broker."""


class Handler(Protocol):
    def partition_started(
        self, partition: int, next_offsets: dict[str, int], state: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """State of ``partition`` is (re)loaded; input resumes at ``next_offsets`` (topic -> offset).

        ``state`` is the partition's committed state (namespace -> key -> value), for indexes the
        handler keeps beside it; read it, never change it."""

    def partition_stopped(self, partition: int) -> None:
        """The partition was revoked or lost: forget anything kept outside the state."""

    def handle(self, batch: Batch, message: Message) -> None:
        """Process one input message inside the current transaction."""


_Store = StateStore  # committed state (state_store.py)


class Batch:
    """One transaction's view: committed state plus this batch's changes, and the sends."""

    def __init__(self, store: _Store, producer: Producer, changelog: str) -> None:
        self._store, self._producer, self._changelog = store, producer, changelog
        self._pending: dict[tuple[int, str], dict[str, Any]] = {}
        # One message's undo journal and held-back sends: a message whose handling raises leaves
        # no trace in the transaction (message_failed), the ones before and after it stay.
        self._undo: list[tuple[tuple[int, str], str, Any]] = []
        self._held: list[tuple[str, bytes | None, bytes, dict[str, bytes] | None]] = []
        # Per (topic, key), the value last published in this transaction and how to encode it: one
        # encode and one record per changed key per transaction, not one per message.
        self._latest: dict[tuple[str, bytes], tuple[Any, Callable[[Any], bytes]]] = {}
        self._latest_undo: list[tuple[tuple[str, bytes], Any]] = []
        # Per changelog partition: records sent, delivered, the highest offset delivered (the
        # local file's checkpoint after the commit), and partitions with a failed delivery.
        self.sent: dict[int, int] = {}
        self.delivered: dict[int, int] = {}
        self.last_offset: dict[int, int] = {}
        self.undelivered: set[int] = set()
        # Per partition, each changelog record's (namespace, key, JSON text or None): the local
        # file gets the same encoding, not a second one.
        self.encoded: dict[int, list[tuple[str, str, str | None]]] = {}

    def get(self, partition: int, namespace: str, key: str) -> Any:
        value = self._pending.get((partition, namespace), {}).get(key)
        if value is _DELETED:
            return None
        if value is not None:
            return value
        return self._store.get(partition, namespace, key)

    def put(self, partition: int, namespace: str, key: str, value: Any) -> None:
        self._change(partition, namespace, key, value)

    def delete(self, partition: int, namespace: str, key: str) -> None:
        self._change(partition, namespace, key, _DELETED)

    def _change(self, partition: int, namespace: str, key: str, value: Any) -> None:
        space = self._pending.setdefault((partition, namespace), {})
        self._undo.append(((partition, namespace), key, space.get(key, _ABSENT)))
        space[key] = value

    def message_done(self) -> None:
        """The message was handled: its changes stay, its sends go out."""
        for topic, key, value, headers in self._held:
            self._producer.produce(topic, key=key, value=value, headers=headers)
        self._held.clear()
        self._undo.clear()
        self._latest_undo.clear()

    def message_failed(self) -> None:
        """The message's handling raised: undo its state changes and drop its sends."""
        for space_key, key, previous in reversed(self._undo):
            space = self._pending[space_key]
            if previous is _ABSENT:
                space.pop(key, None)
            else:
                space[key] = previous
        for latest_key, previous in reversed(self._latest_undo):
            if previous is _ABSENT:
                self._latest.pop(latest_key, None)
            else:
                self._latest[latest_key] = previous
        self._undo.clear()
        self._held.clear()
        self._latest_undo.clear()

    def publish_latest(self, topic: str, key: bytes, value: Any, encode: Callable[[Any], bytes]) -> None:
        """Publish ``value`` under ``key`` unless a later call of this transaction replaces it.

        Only the last value per (topic, key) is encoded and sent, when the transaction ends
        (send_latest): readers of a compacted, versioned topic (the aggregates) lose nothing by
        skipping the intermediate revisions. ``value`` must not be changed afterwards.
        """
        latest_key = (topic, key)
        self._latest_undo.append((latest_key, self._latest.get(latest_key, _ABSENT)))
        self._latest[latest_key] = (value, encode)

    def send_latest(self) -> None:
        """Encode and send, in the transaction, the last value of each key given to publish_latest."""
        for (topic, key), (value, encode) in self._latest.items():
            try:
                encoded = encode(value)
            except Exception as exc:  # a record of ours the schema refuses: a bug, never a stopped worker
                log.error("publish.unencodable", topic=topic, reason=f"{type(exc).__name__}: {exc}")
                UNENCODABLE.labels(topic).inc()
                continue  # the state moved on; the key's next change publishes it again
            self._producer.produce(topic, key=key, value=encoded)
        self._latest.clear()

    def write_changelog(self) -> None:
        """Each key changed in this batch, once, with its final value (None: deleted)."""
        for (partition, namespace), changes in self._pending.items():
            for key, value in changes.items():
                if value is _DELETED and self._store.get(partition, namespace, key) is None:
                    continue  # created and deleted within the batch, or never there
                text = None if value is _DELETED else json.dumps(value, separators=(",", ":"))
                self._producer.produce(
                    self._changelog,
                    key=f"{namespace}{_SEP}{key}".encode(),
                    partition=partition,
                    value=None if text is None else text.encode(),
                    on_delivery=self._delivered,
                )
                self.encoded.setdefault(partition, []).append((namespace, key, text))
                self.sent[partition] = self.sent.get(partition, 0) + 1

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        partition = message.partition()
        if error is not None:
            self.undelivered.add(partition)
            return
        self.delivered[partition] = self.delivered.get(partition, 0) + 1
        self.last_offset[partition] = max(self.last_offset.get(partition, -1), message.offset())

    def all_delivered(self) -> bool:
        return all(self.delivered.get(p, 0) >= n for p, n in self.sent.items()) or bool(self.undelivered)

    def changes(self, partition: int) -> Iterator[tuple[str, str, Any]]:
        """The partition's changes in this batch: (namespace, key, value or None for deleted)."""
        for (p, namespace), changes in self._pending.items():
            if p == partition:
                for key, value in changes.items():
                    yield namespace, key, None if value is _DELETED else value

    def items(self, partition: int, namespace: str) -> Iterator[tuple[str, Any]]:
        """The namespace's entries as this batch sees them, without copying the committed ones
        (this runs for every instance: a copy of every open series each time was most of its cost).
        Do not change the namespace while iterating. Not for a cold namespace (state_store.py): most
        of it is on disk only."""
        pending = self._pending.get((partition, namespace), {})
        for key, value in self._store.partitions.get(partition, {}).get(namespace, {}).items():
            if key not in pending:
                yield key, value
        for key, value in pending.items():
            if value is not _DELETED:
                yield key, value

    def send(self, topic: str, key: bytes | None, value: bytes, headers: dict[str, bytes] | None = None) -> None:
        """Sent in the transaction once the message being handled is done (see message_done)."""
        self._held.append((topic, key, value, headers))

    def commit_locally(self) -> None:
        """The transaction committed: its changes become the committed state."""
        for (partition, namespace), changes in self._pending.items():
            for key, value in changes.items():
                self._store.set(partition, namespace, key, None if value is _DELETED else value)


@dataclass(frozen=True)
class LoopSettings:
    kafka: KafkaConfig
    group_id: str
    transactional_id: str
    topics: tuple[str, ...]
    changelog: str
    max_batch: int = 500
    # Where a message whose handling raised goes, with its origin and the reason.
    deadletter: str = "dicom.deadletter"
    # A dead worker's open transaction holds back read_committed readers for at most this long.
    transaction_timeout_ms: int = 10_000
    # A killed worker's partitions move to the others after this long; a worker that restarts
    # within it under the same group_instance_id gets them back with no rebalance at all.
    session_timeout_ms: int = 10_000
    # Static membership (KIP-345): the worker's stable id; None: a dynamic member.
    group_instance_id: str | None = None
    # init_transactions, and the committed-offsets read on assignment, retry this long, then the
    # worker exits with the reason (a supervisor restarts it) instead of waiting for ever.
    give_up_after_s: float = 120.0
    # The worker's own folder of local state files (one per partition, local_state.py); None: none
    # kept, every assignment reads the whole changelog.
    state_dir: Path | None = None
    # Namespaces kept on local disk only once in the file, read on demand (state_store.py): what
    # grows with the archive and is read rarely. Only with a state_dir.
    cold_namespaces: frozenset[str] = frozenset()

    @property
    def call_timeout_s(self) -> float:
        return self.transaction_timeout_ms / 1000 * _CALL_SHARE

    @property
    def watchdog_s(self) -> float:
        return self.transaction_timeout_ms / 1000 * _WATCHDOG_SHARE


class TransactionalLoop:
    def __init__(
        self, settings: LoopSettings, handler: Handler, every_second: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.every_second = every_second
        self.local = (
            LocalStates(settings.state_dir, settings.changelog, settings.cold_namespaces)
            if settings.state_dir
            else None
        )
        self.store = StateStore(self.local, settings.cold_namespaces)
        self.running = True
        consumer_settings: dict[str, Any] = {
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            # range: partition p of every input topic goes to the same worker (co-partitioning of
            # dicom.instances and dicom.ticks). cooperative-sticky does not keep that promise; static
            # membership below is what keeps a restart from moving anyone's partitions.
            "partition.assignment.strategy": "range",
            "session.timeout.ms": settings.session_timeout_ms,
        }
        if settings.group_instance_id:
            consumer_settings["group.instance.id"] = settings.group_instance_id
        self._consumer_settings = consumer_settings
        self.consumer = kafka_consumer(settings.kafka, settings.group_id, consumer_settings)
        self.producer = self._new_producer()
        self._fatal_times: list[float] = []
        self._consumer_fatal_times: list[float] = []

    def _new_producer(self) -> Producer:
        return kafka_producer(
            self.settings.kafka,
            {
                "transactional.id": self.settings.transactional_id,
                "transaction.timeout.ms": self.settings.transaction_timeout_ms,
                "linger.ms": 5,
            },
        )

    # -- assignment -------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Blocks until the group's offsets for these partitions are stable: a transaction of a
        # worker that died is committed or aborted first, so the changelog read next is final.
        committed = self._committed(partitions)
        numbers = sorted({tp.partition for tp in committed})
        self._restore(numbers)
        self._started(committed)
        consumer.assign(committed)
        log.info("partitions.assigned", partitions=numbers)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for partition in sorted({tp.partition for tp in partitions}):
            self.store.drop(partition)
            self.handler.partition_stopped(partition)
            if self.local is not None:
                self.local.close(partition)
        consumer.unassign()
        log.info("partitions.revoked", partitions=sorted({tp.partition for tp in partitions}))

    def _committed(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Committed offsets, or the start of the log for a partition never committed.

        Both are broker calls made inside the assignment callback: an error there would end the
        worker from within ``consume`` (seen in the fault suite: "Not leader for partition" right
        after a broker restart), so both are retried until ``give_up_after_s``.
        """
        deadline = time.monotonic() + self.settings.give_up_after_s
        while True:
            try:
                with _slow("offsets.committed"):
                    return [self._or_log_start(tp) for tp in self.consumer.committed(partitions, timeout=30)]
            except KafkaException as exc:
                self._still_running()
                if time.monotonic() > deadline:
                    raise GiveUp(
                        f"the group's committed offsets stayed unavailable for {self.settings.give_up_after_s:.0f} s "
                        f"({exc}); check that the broker is up and reachable, then start the worker again"
                    ) from exc
                log.warning("offsets.unavailable", reason=str(exc))
                time.sleep(1.0)

    def _or_log_start(self, tp: TopicPartition) -> TopicPartition:
        if tp.offset >= 0:
            return TopicPartition(tp.topic, tp.partition, tp.offset)
        low, _ = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=30)
        return TopicPartition(tp.topic, tp.partition, low)

    def _restore(self, partitions: list[int]) -> None:
        """Rebuild the state of ``partitions``: local file plus changelog tail, or the whole changelog."""
        self.store.backed.difference_update(partitions)
        report = restore_partitions(
            self.settings.kafka,
            self.settings.group_id,
            self.settings.changelog,
            partitions,
            self.store.partitions,
            self.local,
            self.settings.give_up_after_s,
            self._still_running,
        )
        self.store.backed.update(p for p in report.backed if p in partitions)

    # -- the loop ---------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self.running = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        last_second = 0.0
        try:
            self._retry("init_transactions", lambda: self.producer.init_transactions(self.settings.call_timeout_s))
            self._subscribe()
            while self.running:
                if self.every_second and time.monotonic() - last_second >= 1.0:
                    last_second = time.monotonic()
                    self.every_second()
                messages = self.consumer.consume(num_messages=self.settings.max_batch, timeout=0.2)
                try:
                    messages = [m for m in messages if not self._is_error(m)]
                except _ConsumerFatal as fatal:
                    self._replace_consumer(fatal.error)
                    continue
                if messages:
                    self._transaction(messages)
        except _Stopped:
            # An open transaction is aborted by the broker after transaction.timeout.ms, or at
            # once when this worker starts again.
            log.info("stopped.waiting_for_broker")
        finally:
            self.consumer.close()
            self.producer.flush(10)
            if self.local is not None:
                self.local.close_all()

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            list(self.settings.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _is_error(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        # A fatal consumer error comes as code _FATAL; its fatal() flag is not set (librdkafka 2.16).
        if error.code() == KafkaError._FATAL or error.fatal():
            raise _ConsumerFatal(error)
        log.warning("consume.error", reason=str(error))
        return True

    def _replace_consumer(self, error: KafkaError) -> None:
        """A fatal consumer error leaves the consumer unusable for good: join again with a new one.

        Seen after a broker restart (fault suite, librdkafka 2.16): "Static consumer fenced by other
        consumer with same group.instance.id" while no other worker ran; the old consumer then
        only returned that error, and the worker's partitions stood still. No transaction is open
        between two consume calls, so nothing is lost: the partitions' state is dropped and restored
        from the changelog on the new assignment, as after a restart.
        """
        now = time.monotonic()
        self._consumer_fatal_times = [t for t in self._consumer_fatal_times if now - t < 600] + [now]
        if len(self._consumer_fatal_times) > 5:
            raise GiveUp(
                f"the consumer failed fatally {len(self._consumer_fatal_times)} times in 10 minutes ({error}); "
                "if another worker runs with the same [stream] worker_id, give each its own"
            )
        log.error("consumer.fatal", reason=str(error), action="joining the group again with a new consumer")
        for partition in sorted(self.store.partitions):
            self.store.drop(partition)
            self.handler.partition_stopped(partition)
            if self.local is not None:
                self.local.close(partition)
        try:
            self.consumer.close()
        except KafkaException as exc:  # it is unusable already; closing is only housekeeping
            log.warning("consumer.close_failed", reason=str(exc))
        self.consumer = kafka_consumer(self.settings.kafka, self.settings.group_id, self._consumer_settings)
        self._subscribe()

    def _transaction(self, messages: list[Message]) -> None:
        batch = Batch(self.store, self.producer, self.settings.changelog)
        offsets: dict[tuple[str, int], int] = {}
        starts: dict[tuple[str, int], int] = {}
        for message in messages:
            starts.setdefault((message.topic(), message.partition()), message.offset())
        began, began_ms = time.monotonic(), now_ms()
        try:
            self.producer.begin_transaction()
            for message in messages:
                self._handle_one(batch, message)
                offsets[(message.topic(), message.partition())] = message.offset() + 1
                self.producer.poll(0)
            batch.send_latest()
            batch.write_changelog()
            with _slow("transaction.send_offsets"):
                self._send_offsets([TopicPartition(t, p, o) for (t, p), o in offsets.items()])
            self._commit(began)
        except KafkaException as exc:
            self._abort(exc, starts)
            return
        batch.commit_locally()
        if self.local is not None:
            self._write_local(batch, began_ms)
        TRANSACTIONS.labels("committed").inc()
        for message in messages:
            MESSAGES.labels(message.topic()).inc()

    def _write_local(self, batch: Batch, began_ms: int) -> None:
        """The committed batch's changes to each partition's local file, with the checkpoint.

        The checkpoint is the offset after the batch's last changelog record in the partition (from
        the delivery reports; commit_transaction has flushed them all) and the wall time before the
        transaction began, which no later record predates. Without a delivery report the position
        is unknown: the partition's file is suspended (left as the true, older snapshot it is).
        """
        assert self.local is not None
        deadline = time.monotonic() + 2.0
        while not batch.all_delivered() and time.monotonic() < deadline:
            self.producer.poll(0.05)
        for partition, sent in batch.sent.items():
            if partition in batch.undelivered or batch.delivered.get(partition, 0) < sent:
                self.local.suspend(partition, "the delivery reports of its changelog records are missing")
                continue
            checkpoint = Checkpoint(batch.last_offset[partition] + 1, began_ms)
            if self.local.write(partition, batch.encoded.get(partition, []), checkpoint, encoded=True):
                self.store.evict(partition)  # committed and in the file: cold entries leave memory

    def _handle_one(self, batch: Batch, message: Message) -> None:
        """Handle one message; if that raises (anything but the broker's own errors), the message
        leaves no state change and goes to dicom.deadletter with its origin and the reason, in this
        same transaction, and the worker goes on with the next one."""
        try:
            self.handler.handle(batch, message)
        except (KafkaException, BufferError, _Stopped, LocalStateError):
            # LocalStateError: a cold entry could not be read from the local file; a dead letter
            # would lose the event, so the worker exits and its restart restores the whole state.
            raise
        except Exception as exc:
            batch.message_failed()
            origin = f"{message.topic()}/{message.partition()}/{message.offset()}"
            reason = f"{self.settings.group_id}: unexpected {type(exc).__name__}: {exc}"[:1000]
            log.exception("deadletter", origin=origin, reason=reason)
            FAILED_MESSAGES.labels(message.topic()).inc()
            batch.send(
                self.settings.deadletter,
                origin.encode(),
                message.value() or b"",
                {"reason": reason.encode(), "origin": origin.encode(), "sink": self.settings.group_id.encode()},
            )
        batch.message_done()

    def _send_offsets(self, offsets: list[TopicPartition]) -> None:
        """send_offsets_to_transaction, given up on if it outlives its own timeout.

        After a broker restart it blocked forever here (librdkafka issue 5456, open: the
        coordinator request's timeout is never checked). The call runs in a thread; if it has not
        returned within the watchdog (shorter than the transaction timeout, after which the broker
        aborts the transaction anyway), the transaction counts as failed: the abort path gives a new
        producer, whose init_transactions fences the stuck one (its thread then ends).
        """
        producer, metadata = self.producer, self.consumer.consumer_group_metadata()
        outcome: dict[str, BaseException] = {}
        done = threading.Event()

        def call() -> None:
            try:
                producer.send_offsets_to_transaction(offsets, metadata, self.settings.call_timeout_s)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=call, name="send-offsets", daemon=True).start()
        limit = self.settings.watchdog_s
        if not done.wait(limit):
            log.warning("transaction.send_offsets_stuck", seconds=limit)
            raise KafkaException(
                KafkaError(
                    KafkaError._TIMED_OUT,
                    f"send_offsets_to_transaction did not return within {limit} s (librdkafka issue 5456)",
                )
            )
        if "error" in outcome:
            raise outcome["error"]

    def _commit(self, began: float) -> None:
        """commit_transaction, retried while the transaction can still commit.

        Past the transaction timeout (counted from begin_transaction) the broker has aborted it:
        the last error is raised, and the abort path does the batch again.
        """
        while True:
            try:
                with _slow("transaction.commit"):
                    self.producer.commit_transaction(self.settings.call_timeout_s)
                return
            except KafkaException as exc:
                spent = time.monotonic() - began
                if exc.args[0].retriable() and spent < self.settings.watchdog_s:
                    self._still_running()
                    log.warning("transaction.commit_retry", reason=str(exc), seconds=round(spent, 1))
                    continue
                raise

    def _abort(self, exc: KafkaException, starts: dict[tuple[str, int], int]) -> None:
        """Give up the batch: a new producer aborts it, and the input goes back to the committed offsets.

        The new producer's init_transactions (same transactional id) aborts whatever the old one
        left open. Reusing the old producer did not work: after a broker restart its
        send_offsets_to_transaction hung for minutes despite its 30 s timeout (librdkafka 2.16),
        until the group dropped the worker; a fresh producer looks the coordinator up anew.
        """
        error: KafkaError = exc.args[0]
        TRANSACTIONS.labels("aborted").inc()
        log.warning("transaction.aborted", reason=str(error))
        if error.fatal():
            now = time.monotonic()
            self._fatal_times = [t for t in self._fatal_times if now - t < 60] + [now]
            if len(self._fatal_times) > 3:
                # Fenced again and again: another worker holds the same transactional id.
                log.error(
                    "transaction.fenced_repeatedly",
                    transactional_id=self.settings.transactional_id,
                    reason=str(error),
                    fix="give each aggregates worker its own [stream] worker_id",
                )
                raise GiveUp(
                    f"fenced {len(self._fatal_times)} times in a minute: another worker runs with the "
                    f"transactional id {self.settings.transactional_id}; give each worker its own [stream] worker_id"
                ) from exc
        self.producer.purge()
        self.producer = self._new_producer()
        self._retry("init_transactions", lambda: self.producer.init_transactions(self.settings.call_timeout_s))
        self._rewind(starts)

    def _rewind(self, starts: dict[tuple[str, int], int]) -> None:
        """Back to where the aborted batch began (the committed offsets): it is processed again.

        The batch's first offsets are known here, so no broker call is needed: asking the broker
        for committed offsets right after a restart timed out again and again (CI, fault suite).
        """
        assignment = self.consumer.assignment()
        assigned = {(tp.topic, tp.partition) for tp in assignment}
        back = [TopicPartition(t, p, o) for (t, p), o in starts.items() if (t, p) in assigned]
        try:
            for tp in back:
                self.consumer.seek(tp)
        except KafkaException as exc:  # a partition not fetching yet cannot seek: set all positions anew
            log.warning("rewind.reassign", reason=str(exc))
            others = [tp for tp in self.consumer.position(assignment) if (tp.topic, tp.partition) not in starts]
            self.consumer.assign(back + others)
        self._started(back)

    def _started(self, positions: list[TopicPartition]) -> None:
        """Tell the handler where each partition resumes (topic -> next offset)."""
        for partition in sorted({tp.partition for tp in positions}):
            self.handler.partition_started(
                partition,
                {tp.topic: tp.offset for tp in positions if tp.partition == partition},
                self.store.partitions.get(partition, {}),
            )

    def _retry(self, what: str, call: Callable[[], None]) -> None:
        """Retry a retriable broker error for up to ``give_up_after_s``, then give up with the reason."""
        deadline = time.monotonic() + self.settings.give_up_after_s
        while True:
            try:
                with _slow(what):
                    call()
                return
            except KafkaException as exc:
                if not exc.args[0].retriable():
                    raise
                self._still_running()
                if time.monotonic() > deadline:
                    raise GiveUp(
                        f"{what} kept failing for {self.settings.give_up_after_s:.0f} s ({exc}); check that the "
                        "broker is up and that the transaction coordinator is available, then start the worker again"
                    ) from exc
                log.warning("transaction.retry", step=what, reason=str(exc))
                time.sleep(1.0)

    def _still_running(self) -> None:
        """Called while waiting for the broker: a stop request ends the wait."""
        if not self.running:
            raise _Stopped()
