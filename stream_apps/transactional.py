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
from prometheus_client import Counter

from diana.clients import kafka_producer
from diana.group_membership import TOPICS_MISSING_FIX
from diana.stream_apps.batch import Batch, Handler, RecordTooLarge
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

# A record refused for its size (by librdkafka at produce(), or by the broker): deterministic, the
# batch done again refuses it again.
_SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
# How long a failed commit's outcome is asked for (the group's committed offsets) before the batch
# is done again as if aborted.
_OUTCOME_WAIT_S = 30.0


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

    def _new_producer(self) -> Producer:
        return kafka_producer(
            self.settings.kafka,
            {
                "transactional.id": self.settings.transactional_id,
                "transaction.timeout.ms": self.settings.transaction_timeout_ms,
                "linger.ms": 5,
                # The topics' limit ([kafka] max_message_bytes), with the sinks' headroom for a dead
                # letter's headers. librdkafka's default (1,000,000) refused a completed series'
                # digest or a large dead letter at produce(), and the batch was aborted for ever.
                "message.max.bytes": self.settings.kafka.max_message_bytes + 64 * 1024,
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
            if exc.args[0].code() in _SIZE_ERRORS:
                raise self._record_too_large(f"a record refused for its size ({exc.args[0].str()})") from exc
            self._abort(exc)
            if not (committing and self._committed_after_all(offsets)):
                self._rewind(starts)
                return
            # The commit went through although commit_transaction failed: the batch is the state now.
            # The local files of its partitions are left as they were, the older true snapshot
            # (suspended until the next restore reads their changelog tail): its changelog positions
            # came with the replaced producer's delivery reports, and are not worth the doubt.
            TRANSACTIONS.labels("commit_outcome_committed").inc()
            batch.commit_locally()
            if self.local is not None:
                for partition in batch.sent:
                    self.local.suspend(partition, "the commit's outcome was learnt from the committed offsets")
            return
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

    def _committed_after_all(self, ends: dict[tuple[str, int], int]) -> bool:
        """Did the batch commit although commit_transaction failed (its answer lost, or the retries
        ran out after the coordinator had the commit)? Asked after the new producer's
        init_transactions, which completes a commit the coordinator had begun and aborts anything
        else: the group's committed offsets (stable ones: read_committed) are then at the batch's
        ends, or where the batch began.

        Before, such a batch was always rewound and done again from the state before it: its
        outputs published twice, and a revision number given to two contents where a tick's wall
        clock made the second run differ. If the offsets cannot be read, the batch is rewound as
        before (logged ``transaction.commit_outcome_unknown``).
        """
        wanted = [TopicPartition(t, p) for (t, p) in ends]
        deadline = time.monotonic() + _OUTCOME_WAIT_S
        while True:
            try:
                with slow("transaction.commit_outcome"):
                    answer = self.consumer.committed(wanted, timeout=self.settings.call_timeout_s)
                if not any(tp.error for tp in answer):
                    break
                reason = "; ".join(str(tp.error) for tp in answer if tp.error)
            except KafkaException as exc:
                reason = str(exc)
            self._still_running()
            if time.monotonic() > deadline:
                log.warning("transaction.commit_outcome_unknown", reason=reason, fix="the batch is done again")
                return False
            time.sleep(0.5)
        at_end = [tp.offset == ends[(tp.topic, tp.partition)] for tp in answer]
        if at_end and all(at_end):
            log.warning("transaction.commit_outcome_committed", partitions=sorted({p for _, p in ends}))
            return True
        if any(at_end):  # not this transaction's doing (it commits all its offsets or none): another owner's
            log.warning("transaction.commit_outcome_unexpected", fix="the batch is done again")
        return False

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

    def _abort(self, exc: KafkaException) -> None:
        """Give up the batch: a new producer aborts it (the caller then rewinds the input).

        The new producer's init_transactions (same transactional id) aborts whatever the old one
        left open, or completes a commit the coordinator had already begun (_committed_after_all).
        Reusing the old producer did not work: after a broker restart its
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
