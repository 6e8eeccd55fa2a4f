"""The at-least-once loop every sink runs: consume a batch, write it durably, then commit.

A sink supplies ``write(batch)``. If it raises ``RetryableError`` (the store is down or
overloaded) the same batch is written again after a backoff, without committing, for as long
as it takes; offsets move only after a write has succeeded. Messages the sink cannot use
are sent to ``dicom.deadletter`` (with their origin) before the commit, so nothing vanishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from diana.clients import kafka_consumer, kafka_producer, producer_size_limits
from diana.config import KafkaConfig
from diana.group_membership import TOPICS_MISSING_FIX, GroupWatch, close_within, stats_interval_s
from diana.schemas.topics import DEADLETTER, EVENT_COMPRESSION

__all__ = [
    "RetryableError",
    "DeadLetters",
    "Reporter",
    "BatchSink",
    "run_sink",
    "run_sinks",
    "write_until_done",
    "failure_reason",
    "oldest_retry_s",
    "commit_written",
    "commit_written_or_log",
    "log_failed_commits",
]

log = structlog.get_logger("diana.sink")
_STDLIB_LOG = logging.getLogger("diana.sink")

DEADLETTERED = Counter("diana_sink_deadletters_total", "Messages a sink parked in dicom.deadletter", ["sink"])
REPLACED_CONSUMERS = Counter(
    "diana_sink_consumers_replaced_total",
    "Consumers a sink closed and made anew because they had stopped taking part in their group",
    ["sink"],
)
TOPICS_MISSING = Counter(
    "diana_sink_topics_missing_total",
    "Times a sink's consumer, silent in its group, was kept because none of its topics exists",
    ["sink"],
)
# Where receipt-to-searchable goes in a sink (docs/PERFORMANCE.md, issue 19): how long a batch's write took,
# and how old its messages were (from their Kafka timestamp) when it was written. Replayed messages are old.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 120.0)
WRITE_SECONDS = Histogram(
    "diana_sink_write_seconds", "A batch's write, retries included", ["sink"], buckets=_LATENCY_BUCKETS
)
EVENT_AGE = Histogram(
    "diana_sink_event_age_seconds",
    "Age of each message (now minus its Kafka timestamp) when its batch was written",
    ["sink"],
    buckets=_LATENCY_BUCKETS,
)
# A sink that retries a batch commits nothing meanwhile: how long the oldest batch still being retried has
# failed (0: none), read at scrape time. An alert on it sees a partition held, whatever the log says.
RETRYING_SECONDS = Gauge(
    "diana_sink_retrying_seconds",
    "How long the oldest batch a sink is still retrying (nothing committed behind it) has been failing; 0: none",
    ["sink"],
)
_retrying: dict[object, tuple[str, float]] = {}  # one entry per batch being retried: (sink, first failure)
_retrying_lock = threading.Lock()
_retry_gauges: set[str] = set()


def oldest_retry_s(name: str, now: float | None = None) -> float:
    """Seconds since the first failure of the oldest batch sink ``name`` is still retrying; 0 when none."""
    with _retrying_lock:
        starts = [since for sink, since in _retrying.values() if sink == name]
    return max(0.0, (time.monotonic() if now is None else now) - min(starts)) if starts else 0.0


def _watch_retries(name: str) -> None:
    """Serve ``diana_sink_retrying_seconds{sink=name}`` (0 until a batch of that sink is retried)."""
    with _retrying_lock:
        if name in _retry_gauges:
            return
        _retry_gauges.add(name)
    RETRYING_SECONDS.labels(name).set_function(lambda: oldest_retry_s(name))


def _retry_started(name: str) -> object:
    _watch_retries(name)
    token = object()
    with _retrying_lock:
        _retrying[token] = (name, time.monotonic())
    return token


def _retry_ended(token: object | None) -> None:
    if token is not None:
        with _retrying_lock:
            _retrying.pop(token, None)


class RetryableError(RuntimeError):
    """The write failed for a reason that passes (unavailable, overloaded); try the batch again."""


class DeadLetters:
    """Parks messages a sink cannot process, with the reason and where they came from."""

    def __init__(self, kafka: KafkaConfig, sink_name: str):
        self.sink_name = sink_name
        self._producer = kafka_producer(
            kafka,
            {
                "acks": "all",
                "enable.idempotence": True,
                # A dead letter is the original event (up to [kafka] max_message_bytes) plus its headers;
                # lz4-compressed, the broker checks it against the topic's limit. A batch of them stays
                # under that limit (producer_size_limits: batch.size).
                **producer_size_limits(kafka.max_message_bytes),
                "message.max.bytes": kafka.max_message_bytes + 64 * 1024,
                "compression.type": EVENT_COMPRESSION,
            },
        )
        self._pending: list[tuple[Message, str]] = []

    def send(self, msg: Message, reason: str) -> None:
        """Park a message; it is produced by ``flush``, so a batch written again parks it once."""
        self._pending.append((msg, reason))

    def discard(self) -> None:
        """Forget what this attempt parked: the batch is written again (and parks again)."""
        self._pending.clear()

    def flush(self, timeout: float = 30.0) -> None:
        """Produce every parked message and block until acknowledged; raise if the broker does not answer."""
        for msg, reason in self._pending:
            origin = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            log.warning("deadletter", sink=self.sink_name, origin=origin, reason=reason)
            DEADLETTERED.labels(self.sink_name).inc()
            self._producer.produce(
                DEADLETTER.name,
                key=origin.encode(),
                value=msg.value(),
                headers=[("reason", reason.encode()), ("origin", origin.encode()), ("sink", self.sink_name.encode())],
            )
        self._pending.clear()
        if self._producer.flush(timeout) > 0:
            raise RetryableError("dead-letter messages not acknowledged")


class Reporter:
    """Publishes a sink's own reports (e.g. archive conflicts) with the project's codec."""

    def __init__(self, kafka: KafkaConfig, topic: str, schema: str, key_field: str):
        from diana.schemas.codec import default_codec

        self.topic, self.schema, self.key_field = topic, schema, key_field
        self.codec = default_codec()
        self._producer = kafka_producer(kafka, {"acks": "all", "enable.idempotence": True})

    def __call__(self, record: dict) -> None:
        self._producer.produce(
            self.topic, key=record[self.key_field].encode(), value=self.codec.encode(self.schema, record)
        )

    def flush(self, timeout: float = 30.0) -> None:
        if self._producer.flush(timeout) > 0:
            raise RetryableError(f"reports to {self.topic} not acknowledged")


class BatchSink(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def topics(self) -> Sequence[str]: ...

    def write(self, batch: list[Message], dead: DeadLetters) -> None: ...


def failure_reason(stage: str, exc: BaseException) -> str:
    """A dead letter's reason for an unexpected exception: where, which kind, its text (bounded)."""
    return f"{stage}: unexpected {type(exc).__name__}: {exc}"[:1000]


def _write_isolating_failures(sink: BatchSink, batch: list[Message], dead: DeadLetters) -> None:
    """Write the batch; if it raises anything but RetryableError, write its messages one by one and
    dead-letter each one that raises, so one bad message never stops the sink (or the others)."""
    try:
        sink.write(batch, dead)
        return
    except RetryableError:
        raise
    except Exception:
        log.exception("sink.batch_failed", sink=sink.name, messages=len(batch))
    dead.discard()
    for msg in batch:
        try:
            sink.write([msg], dead)
        except RetryableError:
            raise
        except Exception as exc:
            dead.send(msg, failure_reason(sink.name, exc))


def write_until_done(sink: BatchSink, batch: list[Message], dead: DeadLetters, stop: threading.Event) -> bool:
    """Write a batch (and its dead letters), retrying with backoff while the store is unavailable.

    Returns False if ``stop`` was set before the batch could be written: nothing may be committed.
    While it retries, ``diana_sink_retrying_seconds{sink}`` says for how long.
    """
    backoff = 0.5
    retrying = None
    try:
        while True:
            try:
                _write_isolating_failures(sink, batch, dead)
                dead.flush()
                return True
            except RetryableError as exc:
                dead.discard()
                if stop.is_set():
                    return False
                if retrying is None:
                    retrying = _retry_started(sink.name)
                log.warning("sink.retry", sink=sink.name, reason=str(exc), backoff_s=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
    finally:
        _retry_ended(retrying)


# No broker connection for this long: the sink says so, naming [kafka] bootstrap.
KAFKA_UNREACHABLE_S = 10.0


def run_sink(
    sink: BatchSink,
    kafka: KafkaConfig,
    group_id: str,
    stop: threading.Event,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
    max_wait_s: float = 0.05,
    session_timeout_s: float = 10.0,
    stuck_after_s: float | None = None,
    extra_settings: dict[str, Any] | None = None,
) -> None:
    """Consume, write, commit until ``stop``. A batch is what the consumer has already fetched (up to
    ``batch_size``), written at once; only a batch that starts on an empty queue waits, ``max_wait_s``
    after its first message, for more (``_next_batch``). Under load the batches grow by themselves
    (whatever arrived during the previous write), and no event waits for a batch to fill.

    Offsets are committed asynchronously, after the write: a synchronous commit waits without a
    bound inside librdkafka (confluent-kafka-python issue 1801), and one that never returned after a
    broker restart would stall this consumer for good. The offsets committed are the positions read
    right after the write (``commit_written``), never what librdkafka stores later. A commit that fails
    is logged; its batch may come again (after a rebalance or restart), and every write is idempotent.

    A consumer that has sent no group request (heartbeat, join) for ``stuck_after_s`` (three sessions)
    while connected to a broker has stopped taking part in its group (diana/group_membership.py): it is closed
    and replaced by a new one, which resumes from the group's committed offsets; unless none of its
    topics exists (``GroupWatch.kept_waiting_for``): such a consumer sends its group nothing until one is created,
    and is kept. ``extra_settings``: librdkafka settings added to the consumer's (e.g.
    ``group.instance.id``; never replacing its own; librdkafka's debug lines: [kafka] debug)."""

    # When did a commit last fail (0: it did not)? Served inside consume(), on this thread.
    commit_failed_at = [0.0]

    def committed(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:  # e.g. the coordinator is loading after a broker restart
            log.warning("sink.commit_failed", sink=sink.name, error=err.str())
            commit_failed_at[0] = time.monotonic()

    stuck_after_s = 3 * session_timeout_s if stuck_after_s is None else stuck_after_s

    def subscribed_consumer() -> tuple[Any, GroupWatch]:
        watch = GroupWatch(stuck_after_s, stats_interval_s(session_timeout_s))
        consumer = kafka_consumer(
            kafka,
            group_id,
            {
                **(extra_settings or {}),  # first: it adds settings, never replaces the ones below
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                # A sink may wait minutes for its store; stay in the group meanwhile.
                "max.poll.interval.ms": 30 * 60 * 1000,
                # A sink killed (kill -9, a lost host) holds its partitions until the broker drops it after
                # this long: its restart, or the other sink of the group, waits that long to get them.
                # librdkafka heartbeats from its own thread, so a long write does not count against it.
                "session.timeout.ms": int(session_timeout_s * 1000),
                "on_commit": committed,
                **watch.settings(),
            },
        )
        consumer.subscribe(list(sink.topics))
        return consumer, watch

    consumer, watch = subscribed_consumer()
    dead = DeadLetters(kafka, sink.name)
    _watch_retries(sink.name)
    log.info("sink.started", sink=sink.name, group=group_id, topics=list(sink.topics))
    said_unreachable = False
    try:
        while not stop.is_set():
            # librdkafka retries a broker that does not answer without end, in lines of its own that do
            # not name the setting: said once, with the address, and once more when it answers.
            unreachable_s = watch.unconnected_for(time.monotonic())
            if unreachable_s >= KAFKA_UNREACHABLE_S and not said_unreachable:
                log.warning(
                    "sink.waiting_for_kafka", sink=sink.name, bootstrap=kafka.bootstrap, seconds=round(unreachable_s)
                )
                said_unreachable = True
            elif said_unreachable and not unreachable_s:
                log.info("sink.kafka_reached", sink=sink.name)
                said_unreachable = False
            if watch.kept_waiting_for(consumer, sink.topics):
                # Not stuck: none of its topics exists yet, and it joins once one is created.
                log.warning("sink.topics_missing", sink=sink.name, topics=list(sink.topics), fix=TOPICS_MISSING_FIX)
                TOPICS_MISSING.labels(sink.name).inc()
            if watch.stuck:
                stuck, consumer = consumer, None  # closed by _replace_consumer, never twice
                replaced = _replace_consumer(sink.name, group_id, stuck, subscribed_consumer, session_timeout_s, stop)
                if replaced is None:
                    return
                consumer, watch = replaced
            asked_at = time.time()
            messages = _next_batch(consumer, batch_size, max_wait_s)
            batch = []
            for msg in messages:
                err = msg.error()
                if err is None:
                    batch.append(msg)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("sink.consume_error", sink=sink.name, error=err.str())
            if not batch:
                if commit_failed_at[0] and time.monotonic() - commit_failed_at[0] > 5.0:
                    # The last batch's commit failed (e.g. a rebalance during a broker outage) and no
                    # batch came since to commit past it: without this, its lag would stay for ever.
                    commit_failed_at[0] = 0.0
                    try:
                        commit_written(consumer)
                    except KafkaException as exc:
                        log.warning("sink.commit_failed", sink=sink.name, error=str(exc))
                continue
            write_started = time.time()
            if not write_until_done(sink, batch, dead, stop):
                log.info("sink.stopping_uncommitted", sink=sink.name, messages=len(batch))
                return
            _observe_batch(sink.name, batch, asked_at, write_started, time.time())
            try:
                commit_written(consumer)
            except KafkaException as exc:
                # e.g. a rebalance took the partitions: the batch comes again, and writes are idempotent
                log.warning("sink.commit_failed", sink=sink.name, error=str(exc))
                continue
            if on_batch:
                on_batch(len(batch))
    finally:
        if consumer is not None:
            consumer.close()
        log.info("sink.stopped", sink=sink.name)


def _replace_consumer(
    name: str,
    group_id: str,
    stuck: Any,
    subscribed_consumer: Callable[[], tuple[Any, GroupWatch]],
    close_wait_s: float,
    stop: threading.Event,
) -> tuple[Any, GroupWatch] | None:
    """A new consumer (and its watch) in place of one that stopped taking part in its group; None when
    ``stop`` was set meanwhile. The old one is closed on a thread of its own, waited for at most
    ``close_wait_s``: a client in that state may not finish closing, and the sink must not hang on it
    (one that never finishes is left to its thread). Everything it returned was written and its commit
    sent; what was not committed comes again to the new consumer, and every write is idempotent."""
    log.error("sink.outside_group", sink=name, group=group_id, action="replacing the consumer")
    REPLACED_CONSUMERS.labels(name).inc()
    if not close_within(stuck, close_wait_s, lambda: not stop.is_set(), f"close-{name}"):
        log.warning("sink.close_unfinished", sink=name, waited_s=close_wait_s)
    if stop.is_set():
        return None
    return subscribed_consumer()


def commit_written(consumer: Any) -> None:
    """Commit, asynchronously, where the consumer stands now: past every message ``consume`` has
    returned, all of which the caller has written.

    The offsets are taken here, on the caller's thread, before the next ``consume``. Without them,
    ``commit(asynchronous=True)`` lets librdkafka read the stored offsets later on its own thread,
    possibly after the next ``consume`` stored those of messages not written yet: a sink killed during
    that write lost them (librdkafka issue 4534; on CI the fault smoke's sinks-kill left 3 instances
    unarchived, their events committed). Positions, not the batch's last offsets + 1: on topics written
    in transactions (series, studies) the position is past the commit marker, which no message carries;
    committing before it would leave a lag of 1 for ever."""
    positions = [tp for tp in consumer.position(consumer.assignment()) if tp.offset >= 0]
    if positions:
        consumer.commit(offsets=positions, asynchronous=True)


def log_failed_commits(
    logger: Any, event: str, **fields: Any
) -> Callable[[KafkaError | None, list[TopicPartition]], None]:
    """An ``on_commit`` callback (served inside ``consume``/``poll``, on the caller's thread) that logs an
    asynchronous commit that failed, e.g. the coordinator moving during a broker restart: what it
    covered may come again (at least once)."""

    def committed(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            logger.warning(event, error=err.str(), **fields)

    return committed


def commit_written_or_log(consumer: Any, logger: Any, event: str, **fields: Any) -> None:
    """``commit_written``; a commit the client refuses at once (e.g. a rebalance took the partitions) is
    logged, not raised: what it covered comes again (at least once)."""
    try:
        commit_written(consumer)
    except KafkaException as exc:
        logger.warning(event, error=str(exc), **fields)


# How long an idle sink waits for a first message before it looks at ``stop`` (and owed commits) again.
_IDLE_WAIT_S = 0.5


def _next_batch(consumer: Any, batch_size: int, linger_s: float) -> list[Message]:
    """The next batch: what is already fetched, at once (the events that came during the previous write);
    on an empty queue the first event to come and what follows it within ``linger_s``.

    ``consume(n, timeout)`` alone returns only when it has ``n`` messages or the timeout passed: under a
    trickle every event waited the whole timeout for a batch that never filled (issue 19: up to 0.2 s of
    receipt -> searchable, 0.5 s before that)."""
    messages = consumer.consume(batch_size, timeout=0)
    if messages:
        return messages
    messages = consumer.consume(1, timeout=_IDLE_WAIT_S)
    if messages and batch_size > 1 and linger_s > 0:
        messages += consumer.consume(batch_size - 1, timeout=linger_s)
    return messages


def _observe_batch(name: str, batch: list[Message], asked_at: float, write_started: float, written_at: float) -> None:
    """Metrics of a written batch, and at debug level its timeline with its offsets (bench/latency_chain.py
    joins them with the events to split receipt-to-searchable into stages)."""
    WRITE_SECONDS.labels(name).observe(written_at - write_started)
    ages = EVENT_AGE.labels(name)
    for msg in batch:
        kind, stamp = msg.timestamp()
        if kind != TIMESTAMP_NOT_AVAILABLE:
            ages.observe(max(0.0, written_at - stamp / 1000))
    # Asked of the standard-library logger that structlog writes through: a structlog logger asked
    # before logging is configured (a sink run in a test's own process) has no such method.
    if _STDLIB_LOG.isEnabledFor(logging.DEBUG):
        offsets: dict[str, list[int]] = {}
        for msg in batch:
            span = offsets.setdefault(f"{msg.topic()}/{msg.partition()}", [msg.offset(), msg.offset()])
            span[0], span[1] = min(span[0], msg.offset()), max(span[1], msg.offset())
        log.debug(
            "sink.batch_written",
            sink=name,
            messages=len(batch),
            asked_at=asked_at,
            consumed_at=write_started,
            written_at=written_at,
            offsets=offsets,
        )


def run_sinks(
    sinks: Sequence[BatchSink], kafka: KafkaConfig, group_id: str, stop: threading.Event, **options: Any
) -> None:
    """Run several sinks of one group side by side, each with its own consumer (its own topics) and
    thread, so that a busy topic never delays another's batches; when one ends, all stop."""
    if len(sinks) == 1:
        run_sink(sinks[0], kafka, group_id, stop, **options)
        return

    failures: list[BaseException] = []

    def run(sink: BatchSink) -> None:
        try:
            run_sink(sink, kafka, group_id, stop, **options)
        except BaseException as exc:
            log.exception("sink.crashed", sink=sink.name, topics=list(sink.topics))
            failures.append(exc)
        finally:
            stop.set()

    threads = [
        threading.Thread(target=run, args=(sink,), name=f"sink-{i}", daemon=True) for i, sink in enumerate(sinks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:  # the process exits non-zero, as with a single consumer, and its supervisor sees it
        raise failures[0]
