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
  to the committed offsets: the batch is processed again from the same state; if transactions keep
  failing with none committed for ``transaction_max_retry_s`` (recovery steps left out) and at least
  10 times, the worker stops naming the cause (failing_transactions.py). When
  commit_transaction itself failed, whether the batch committed is unknown: its partitions' state
  is dropped and restored as on an assignment, and the input resumes at the committed offsets; only
  a batch found not committed counts as failed.

The handler sees a ``Batch`` (batch.py): state reads and writes (namespace, key) and sends. The
loop's settings and call bounds are in loop_settings.py, assignment and restore in
partition_assignment.py.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Gauge

from diana.clients import kafka_producer, producer_size_limits
from diana.group_membership import TOPICS_MISSING_FIX
from diana.stream_apps.batch import Batch, Handler, RecordTooLarge
from diana.stream_apps.failing_transactions import FailureStreak
from diana.stream_apps.local_state import Checkpoint, LocalStateError, LocalStates, now_ms
from diana.stream_apps.loop_settings import ConsumerFatal, LoopSettings, Stopped, slow
from diana.stream_apps.partition_assignment import PartitionAssignment
from diana.stream_apps.state_restore import GiveUp
from diana.stream_apps.state_store import StateStore

__all__ = ["Batch", "GiveUp", "Handler", "LoopSettings", "TransactionalLoop"]

log = structlog.get_logger("diana.stream.transactional")

TRANSACTIONS = Counter("diana_stream_transactions_total", "Transactions of the stream worker, by outcome", ["outcome"])
MESSAGES = Counter("diana_stream_messages_total", "Input messages processed in committed transactions", ["topic"])
FAILED_MESSAGES = Counter(
    "diana_stream_failed_messages_total", "Input messages whose handling raised, dead-lettered", ["topic"]
)
FAILURES = Counter(
    "diana_stream_transaction_failures_total",
    "Failed transactions of the stream worker, by the Kafka error that failed them",
    ["cause"],
)
# How long transactions have failed with none committed since (the recovery steps left out; 0: the
# last one committed, or partitions were revoked or assigned), read at scrape time: a worker redoing
# a batch for a lasting cause shows here before it stops.
FAILING_SECONDS = Gauge(
    "diana_stream_failing_seconds",
    "How long the stream worker's transactions have been failing with none committed, its recovery steps "
    "left out; 0: the last committed, or partitions were revoked or assigned since",
)
# Delivery reports of records the abort purged: the abort's doing, not a cause.
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})

# A record refused for its size (by librdkafka at produce(), or by the broker): deterministic, the
# batch done again refuses it again.
_SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


class TransactionalLoop(PartitionAssignment):
    """The consume-transform-produce loop: one transaction per batch, commit, abort and rewind."""

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
        self.consumer = self._new_consumer()
        self.producer = self._new_producer()
        self._fatal_times: list[float] = []
        self._consumer_fatal_times: list[float] = []
        # Error codes and topics of this transaction's failed deliveries (the producer's on_delivery).
        self._delivery_errors: set[int] = set()
        self._failed_topics: set[str] = set()
        self._streak = FailureStreak(settings.transaction_max_retry_s)
        FAILING_SECONDS.set_function(self._streak.seconds)

    def _new_producer(self) -> Producer:
        return kafka_producer(
            self.settings.kafka,
            {
                "transactional.id": self.settings.transactional_id,
                "transaction.timeout.ms": self.settings.transaction_timeout_ms,
                "linger.ms": 5,
                # The topics' limit ([kafka] max_message_bytes), for one record and for a batch of them
                # (producer_size_limits). librdkafka's default (1,000,000) refused a completed series'
                # digest or a large dead letter at produce(), and the batch was aborted for ever. A dead
                # letter over the limit drops its bytes (Batch.send_dead_letter): no headroom needed.
                **producer_size_limits(self.settings.kafka.max_message_bytes),
                # Every record's delivery report without a callback of its own: a record the broker
                # refused for its size shows only here (commit_transaction says _INCONSISTENT).
                "on_delivery": self._delivery_failed,
            },
        )

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
                if self._watch.kept_waiting_for(self.consumer, self.settings.topics):
                    # Not stuck: none of its topics exists yet, and it joins once one is created.
                    log.warning("consumer.topics_missing", topics=list(self.settings.topics), fix=TOPICS_MISSING_FIX)
                if self._watch.stuck:
                    self._rejoin_outside_group()
                if self.every_second and time.monotonic() - last_second >= 1.0:
                    last_second = time.monotonic()
                    self.every_second()
                messages = self.consumer.consume(num_messages=self.settings.max_batch, timeout=0.2)
                try:
                    messages = [m for m in messages if not self._is_error(m)]
                except ConsumerFatal as fatal:
                    self._replace_consumer(fatal.error)
                    continue
                if messages:
                    self._transaction(messages)
        except Stopped:
            # An open transaction is aborted by the broker after transaction.timeout.ms, or at
            # once when this worker starts again.
            log.info("stopped.waiting_for_broker")
        finally:
            self.consumer.close()
            self.producer.flush(10)
            if self.local is not None:
                self.local.close_all()

    def _transaction(self, messages: list[Message]) -> None:
        batch = Batch(self.store, self.producer, self.settings.changelog, self.settings.kafka.max_message_bytes)
        offsets: dict[tuple[str, int], int] = {}
        starts: dict[tuple[str, int], int] = {}
        per_topic: dict[str, int] = {}
        for message in messages:
            topic = message.topic()
            starts.setdefault((topic, message.partition()), message.offset())
            per_topic[topic] = per_topic.get(topic, 0) + 1
        began, began_ms = time.monotonic(), now_ms()
        self._delivery_errors, self._failed_topics = set(), set()
        committing = False
        try:
            self.producer.begin_transaction()
            for index, message in enumerate(messages):
                self._handle_one(batch, message)
                offsets[(message.topic(), message.partition())] = message.offset() + 1
                if index % 64 == 63:  # delivery reports now and then: a poll per message cost a C call each
                    self.producer.poll(0)
            batch.send_latest()
            batch.write_changelog()
            with slow("transaction.send_offsets"):
                self._send_offsets([TopicPartition(t, p, o) for (t, p), o in offsets.items()])
            committing = True
            self._commit(began)
        except RecordTooLarge as exc:
            raise self._record_too_large(str(exc)) from exc
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() in _SIZE_ERRORS:
                raise self._record_too_large(f"a record refused for its size ({error.str()})") from exc
            refused = self._refused_for_size(batch)
            if refused is not None:
                # librdkafka reports a record the broker refused as an abortable _INCONSISTENT
                # "N message(s) failed delivery" of commit_transaction; the cause is in the reports.
                raise self._record_too_large(f"a record refused by the broker for its size ({refused})") from exc
            cause, topics = self._cause(error, batch)
            if committing:
                # Whether the batch committed is known only after the restore: a commit that went
                # through (its answer lost) is no failure, and must not stop the worker as one.
                with self._streak.recovering():
                    self._abort(exc, "commit_failed")
                    committed = self._reload_after_failed_commit(batch, starts, offsets, per_topic)
                if committed:
                    return
                self._failed(cause, topics, error)
            else:
                self._failed(cause, topics, error)
                with self._streak.recovering():
                    self._abort(exc, "aborted")
                self._rewind(starts)
            self._pause(self._streak.backoff_s())
            return
        self._streak.reset()
        batch.commit_locally()
        if self.local is not None:
            self._write_local(batch, began_ms)
        TRANSACTIONS.labels("committed").inc()
        for topic, count in per_topic.items():  # labels() per message was a visible share of the profile
            MESSAGES.labels(topic).inc(count)

    def _record_too_large(self, what: str) -> GiveUp:
        """A record too large for the topics: the same batch would make it again, so retrying it is an
        endless abort that stalls every partition of the worker. It stops, naming the setting."""
        limit = self.settings.kafka.max_message_bytes
        log.error("transaction.record_too_large", record=what, max_message_bytes=limit)
        TRANSACTIONS.labels("record_too_large").inc()
        return GiveUp(
            f"{what}: over [kafka] max_message_bytes ({limit}) or the topic's limit; nothing of the batch was committed. Raise "
            "[kafka] max_message_bytes (and with it the topics' max.message.bytes: diana topics) and start "
            "the worker again"
        )

    def _cause(self, error: KafkaError, batch: Batch) -> tuple[str, set[str]]:
        """Why the transaction failed, and the topics of its refused records.

        The cause is the error of the failed delivery reports when there are any (commit_transaction
        says only _INCONSISTENT, "N message(s) failed delivery"), else the call's own error.
        """
        failed = {KafkaError(code).name() for code in (self._delivery_errors | batch.failed_codes) - _PURGED}
        cause = ",".join(sorted(failed)) if failed else error.name()
        topics = self._failed_topics | ({self.settings.changelog} if batch.undelivered else set())
        return cause, topics

    def _failed(self, cause: str, topics: set[str], error: KafkaError) -> None:
        """Count a failed transaction under its cause; stop when failures have lasted, none committed,
        longer than ``transaction_max_retry_s`` (recovery steps left out), MIN_FAILURES of them at least."""
        self._streak.failed(cause, topics)
        FAILURES.labels(cause).inc()
        streak = self._streak
        log.warning(
            "transaction.failing",
            cause=cause,
            topics=sorted(topics),
            failures=streak.failures,
            failing_s=round(streak.seconds(), 1),
            transaction_max_retry_s=streak.give_up_after_s,
        )
        if streak.lasting():
            log.error(
                "transaction.failing_lasting",
                causes=streak.summary(),
                topics=sorted(streak.topics),
                failing_s=round(streak.seconds(), 1),
                transaction_max_retry_s=streak.give_up_after_s,
            )
            TRANSACTIONS.labels("given_up").inc()
            raise GiveUp(streak.give_up_message(f"{cause}: {error.str()}"))

    def _pause(self, seconds: float) -> None:
        """Wait before the next redo (a stop request ends the wait)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._still_running()
            time.sleep(min(left, 0.2))

    def _reload_after_failed_commit(
        self,
        batch: Batch,
        starts: dict[tuple[str, int], int],
        ends: dict[tuple[str, int], int],
        per_topic: dict[str, int],
    ) -> bool:
        """commit_transaction failed: the batch may have committed (its answer lost, or the retries
        ran out after the coordinator had the commit; the new producer's init_transactions then
        completes it) or not. Its partitions' state is dropped and restored as on an assignment
        (``_reload``), so whatever the outcome, state, local files and input position are what Kafka
        holds: a committed batch is not done again, an aborted one is, from the state before it.

        Before, the outcome was guessed from the committed offsets alone and a batch taken as committed
        kept its in-memory state and suspended its local files until the next restore; after two failed
        commits in a row an uncommitted redo could be kept as committed.
        """
        numbers = sorted({p for _, p in starts} | set(batch.sent))
        offsets = self._reload(numbers)
        # Each batch begins at the committed offsets (a restore puts the input there): at its ends,
        # this batch committed; anything else, it did not.
        committed = all(offsets.get(key) == end for key, end in ends.items())
        log.warning("transaction.commit_outcome", committed=committed, partitions=numbers)
        if committed:
            self._streak.reset()
            TRANSACTIONS.labels("committed_after_failed_commit").inc()
            for topic, count in per_topic.items():
                MESSAGES.labels(topic).inc(count)
        return committed

    def _delivery_failed(self, error: KafkaError | None, message: Message) -> None:
        """The producer's delivery report of every record without a callback of its own."""
        if error is not None:
            self._delivery_errors.add(error.code())
            if error.code() not in _PURGED:
                self._failed_topics.add(message.topic())

    def _refused_for_size(self, batch: Batch) -> str | None:
        """The name of a size error in this transaction's failed delivery reports, if any."""
        try:
            self.producer.poll(0)  # reports still queued (commit_transaction serves most of them)
        except (KafkaException, RuntimeError):
            pass
        for code in sorted(self._delivery_errors | batch.failed_codes):
            if code in _SIZE_ERRORS:
                return "MSG_SIZE_TOO_LARGE" if code == KafkaError.MSG_SIZE_TOO_LARGE else "RECORD_LIST_TOO_LARGE"
        return None

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
        except (KafkaException, BufferError, Stopped, LocalStateError):
            # LocalStateError: a cold entry could not be read from the local file; a dead letter
            # would lose the event, so the worker exits and its restart restores the whole state.
            raise
        except Exception as exc:
            batch.message_failed()
            origin = f"{message.topic()}/{message.partition()}/{message.offset()}"
            reason = f"{self.settings.group_id}: unexpected {type(exc).__name__}: {exc}"[:1000]
            log.exception("deadletter", origin=origin, reason=reason)
            FAILED_MESSAGES.labels(message.topic()).inc()
            batch.send_dead_letter(
                self.settings.deadletter,
                origin.encode(),
                message.value(),
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
                with slow("transaction.commit"):
                    self.producer.commit_transaction(self.settings.call_timeout_s)
                return
            except KafkaException as exc:
                spent = time.monotonic() - began
                if exc.args[0].retriable() and spent < self.settings.watchdog_s:
                    self._still_running()
                    log.warning("transaction.commit_retry", reason=str(exc), seconds=round(spent, 1))
                    continue
                raise

    def _abort(self, exc: KafkaException, outcome: str = "aborted") -> None:
        """Give up the batch: a new producer aborts it (the caller then rewinds the input, or after a
        failed commit restores the batch's partitions).

        The new producer's init_transactions (same transactional id) aborts whatever the old one
        left open, or completes a commit the coordinator had already begun (_reload_after_failed_commit).
        Reusing the old producer did not work: after a broker restart its
        send_offsets_to_transaction hung for minutes despite its 30 s timeout (librdkafka 2.16),
        until the group dropped the worker; a fresh producer looks the coordinator up anew.
        """
        error: KafkaError = exc.args[0]
        TRANSACTIONS.labels(outcome).inc()
        log.warning(f"transaction.{outcome}", reason=str(error))
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

    def _rewind(self, starts: dict[tuple[str, int], int]) -> None:
        """Back to where the aborted batch began (the committed offsets): it is processed again.

        The batch's first offsets are known here, so no broker call is needed: asking the broker
        for committed offsets right after a restart timed out again and again (CI, fault suite).
        """
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        back = [TopicPartition(t, p, o) for (t, p), o in starts.items() if (t, p) in assigned]
        self._seek(back)
        self._started(back)

    def _retry(self, what: str, call: Callable[[], None]) -> None:
        """Retry a retriable broker error for up to ``give_up_after_s``, then give up with the reason."""
        deadline = time.monotonic() + self.settings.give_up_after_s
        while True:
            try:
                with slow(what):
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
