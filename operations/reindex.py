"""Zero-downtime index rebuild from the log (`diana reindex`).

1. Create the next version of each index (``diana-series-v2``) from the current template. An index
   whose topic expires (dead letters, kept 90 days) first gets the old version's documents, copied by
   this process (scroll and bulk): the topic no longer has the older ones.
2. Read the topics from the beginning with a consumer of its own (no group commits) and write
   into the new version, while the live sink keeps writing through the alias to the old one.
   With ``processes`` > 1 the partitions are shared out among up to that many processes (no more
   than one per ``min_events_per_process`` events to read), each with its own consumer and bulk
   writer: the decoding and document building (53-65 µs of CPU per event, docs/PERFORMANCE.md) is
   what limits one process, and one partition's events stay in one process, in order.
3. Caught up: swap every alias in one atomic request.
4. Catch up once more, to the end offsets after the swap: what the live sink wrote to the old
   version just before the swap reaches the new one too (writes are idempotent).
The old versions are deleted only on request.
"""

from __future__ import annotations

import gc
import multiprocessing
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from opensearchpy import OpenSearch
from opensearchpy.exceptions import TransportError
from opensearchpy.helpers import scan, streaming_bulk

from diana.clients import kafka_admin, kafka_consumer, opensearch_client
from diana.config import ConflictPolicy, KafkaConfig, LogConfig, OpenSearchConfig
from diana.logs import configure_logging
from diana.schemas.codec import default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import ALL_TOPICS, expires
from diana.sinks.consumer import DeadLetters, write_until_done
from diana.sinks.opensearch import (
    REFUSED_WHOLE_FIX,
    OpenSearchSink,
    PreparedBatch,
    install_template,
    refused_whole_status,
)

__all__ = ["Reindexer", "ReindexFailed", "current_version", "share_out", "spare_the_collector"]

Partition = tuple[str, int]
_TOPICS = {t.name: t for t in ALL_TOPICS}

# How long one consume() gathers a batch. librdkafka returns only with a full batch or at the
# timeout, so the last batch of a partition's end (and the catch-up after the swap, which finds
# nothing) waited the whole timeout: 1 s of a 2.5 s reindex of 5,904 events (docs/PERFORMANCE.md).
_BATCH_WAIT_S = 0.05

# Fewer events than this per catch-up process and one more process costs more than it saves: a
# spawned process imports the pipeline (about 0.6 s of CPU) and joins on its own, and one process
# decodes about 18,000 events a second. On 2 cores (docs/PERFORMANCE.md, issue 19, stop 25): one
# process beat two at 5,904 events; at 20,000 and 50,000 two were faster on a freshly started
# OpenSearch (6,544 against 4,565/s; 10,060 against 7,029/s) and level or slower once it was warm.
MIN_EVENTS_PER_PROCESS = 20_000

log = structlog.get_logger("diana.reindex")


def spare_the_collector() -> None:
    """Collect garbage less often in a catch-up process: what start-up imported is frozen out of every
    collection, and the young generation is collected after 50,000 allocations, not 700. Decoding
    allocates a few dozen objects per event, freed by their counts (no cycles), yet each allocation
    counted towards a collection, and every third one walked all the modules' objects: 60 ms of CPU
    of a 0.7 s reindex of 5,904 events (docs/PERFORMANCE.md, issue 19, stop 27)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def current_version(client: OpenSearch, layout: IndexLayout, kind: str) -> int:
    """The version the alias points to (0 if there is no alias yet)."""
    if not client.indices.exists_alias(name=layout.alias(kind)):
        return 0
    names = client.indices.get_alias(name=layout.alias(kind))
    versions = [int(m.group(1)) for n in names if (m := re.search(r"-v(\d+)$", n))]
    return max(versions, default=0)


class _Prepared:
    """The sink, with one batch prepared ahead: written as prepared, or by the sink itself when the
    preparation raised (``None``) or ``write_until_done`` writes the messages one by one (after an
    unexpected error), so a message that makes the sink raise is parked as in the live sink."""

    def __init__(self, sink: OpenSearchSink, prepared: PreparedBatch | None):
        self.sink, self.prepared = sink, prepared
        self.name, self.topics = sink.name, sink.topics

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        if self.prepared is not None and batch is self.prepared.messages:
            self.sink.write_prepared(self.prepared, dead)
        else:
            self.sink.write(batch, dead)


@dataclass(frozen=True)
class _Plan:
    """Kafka's side of a reindex, made ready while OpenSearch creates the new versions."""

    consumer: Consumer
    admin: AdminClient
    starts: dict[Partition, int]
    ends: dict[Partition, int]
    shares: list[list[Partition]]  # one (or none): the consumer is assigned already


class ReindexFailed(RuntimeError):
    """A catch-up process failed or died; the new index versions are left unaliased."""


def catch_up(
    consumer: Consumer,
    sink: OpenSearchSink,
    dead: DeadLetters,
    position: dict[Partition, int],
    ends: dict[Partition, int],
    batch: int,
    progress: Callable[[int], None],
) -> None:
    """Consume until every partition's ``position`` reached its end offset in ``ends``; return when
    everything consumed is written.

    Two stages: this thread consumes and prepares a batch (decoding, documents, request bodies)
    while a writer thread sends the batch before it. Batches are written one after the other, in
    the order consumed, so a document's later event is never overtaken by an earlier one.

    A partition's end-of-partition event also moves its position: a topic written in Kafka
    transactions (dicom.series) ends with commit markers that take offsets but are never
    delivered, so the last message's offset + 1 can stay below the end for good.
    """

    def write(messages: list[Message], prepared: PreparedBatch | None) -> None:
        # never asked to stop: retried until written
        write_until_done(_Prepared(sink, prepared), messages, dead, threading.Event())
        progress(len(messages))

    with ThreadPoolExecutor(1, thread_name_prefix="reindex-writer") as writer:
        writing: Future[None] | None = None
        while any(position[tp] < end for tp, end in ends.items()):
            consumed = consumer.consume(batch, timeout=_BATCH_WAIT_S)
            messages = [m for m in consumed if m.error() is None]
            if messages:
                try:
                    prepared: PreparedBatch | None = sink.prepare(messages)
                except Exception:  # the writer writes it message by message, parking what raises
                    prepared = None
                if writing is not None:
                    writing.result()  # raises what the writer raised
                writing = writer.submit(write, messages, prepared)
            for m in consumed:  # in order: a partition's end event comes after its messages
                tp = (m.topic(), m.partition())
                if m.error() is None:
                    position[tp] = m.offset() + 1
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    position[tp] = max(position[tp], m.offset())
        if writing is not None:
            writing.result()


def _offsets(
    admin: AdminClient, partitions: list[Partition], spec: OffsetSpec, timeout_s: float = 10.0
) -> dict[Partition, int]:
    """Each partition's earliest or latest offset, in one request per broker. Not the consumer's own
    queries: one request per partition, and on the consumer's connection each waited behind its
    pending fetch, up to [kafka] fetch_wait_max_ms (43 ms each after a catch-up).

    Read committed, as the catch-up consumer reads: the latest offset is the last stable one, not
    past a transaction still open on dicom.series or dicom.studies, which the consumer could not read
    until it ends. Asked again on a retriable error (a leader moving) until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        asked = admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=timeout_s,
        )
        try:
            return {(tp.topic, tp.partition): future.result().offset for tp, future in asked.items()}
        except KafkaException as exc:
            if not exc.args[0].retriable() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def share_out(work: dict[Partition, int], processes: int, min_events: int = 1) -> list[list[Partition]]:
    """Partitions with events to read, shared among at most ``processes`` by their event counts
    (largest first, each to the least loaded share), and among no more shares than leave each at least
    ``min_events`` events on average."""
    busy = sorted((tp for tp, events in work.items() if events > 0), key=lambda tp: (-work[tp], tp))
    worth = sum(work[tp] for tp in busy) // max(1, min_events)
    shares: list[list[Partition]] = [[] for _ in range(max(1, min(processes, len(busy), worth)))]
    loads = [0] * len(shares)
    for tp in busy:
        least = loads.index(min(loads))
        shares[least].append(tp)
        loads[least] += work[tp]
    return [share for share in shares if share]


@dataclass(frozen=True)
class _Share:
    """One catch-up process's part: its partitions from ``starts`` to ``ends``, and how to write them."""

    number: int
    kafka: KafkaConfig
    opensearch: OpenSearchConfig
    log: LogConfig
    index_prefix: str
    version: int
    max_bytes: int
    batch: int
    conflict_policy: str
    parallel_requests: int
    starts: dict[Partition, int]
    ends: dict[Partition, int]


def _catch_up_consumer(kafka: KafkaConfig) -> Consumer:
    """A consumer of its own (no group commits) that reports each partition's end."""
    return kafka_consumer(
        kafka, f"diana-reindex-{uuid.uuid4()}", {"enable.auto.commit": False, "enable.partition.eof": True}
    )


def _catch_up_share(share: _Share, events: multiprocessing.Queue) -> None:
    """A catch-up process (spawned): its own consumer, sink and dead letters; reports progress and
    its final positions through ``events``."""
    configure_logging(share.log.level, share.log.format)
    spare_the_collector()
    try:
        sink = OpenSearchSink(
            opensearch_client(share.opensearch, timeout=60),
            IndexLayout(share.index_prefix),
            max_bytes=share.max_bytes,
            index_version=share.version,
            conflict_policy=share.conflict_policy,
            parallel_requests=share.parallel_requests,
        )
        consumer = _catch_up_consumer(share.kafka)
        try:
            consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in share.starts.items()])
            position = dict(share.starts)
            catch_up(
                consumer,
                sink,
                DeadLetters(share.kafka, "reindex"),
                position,
                share.ends,
                share.batch,
                lambda n: events.put(("progress", share.number, n)),
            )
        finally:
            consumer.close()
    except BaseException as exc:
        events.put(("failed", share.number, f"{type(exc).__name__}: {exc}"))
        raise
    events.put(("done", share.number, position))


class Reindexer:
    def __init__(
        self,
        client: OpenSearch,
        layout: IndexLayout,
        kafka: KafkaConfig,
        dead: DeadLetters,
        max_bytes: int = 5_000_000,
        batch: int = 2000,
        conflict_policy: str = ConflictPolicy.KEEP_FIRST,
        parallel_requests: int = 4,
        number_of_replicas: int = 0,
        refresh_interval: str | None = None,
        processes: int = 1,
        min_events_per_process: int = 1,
        opensearch: OpenSearchConfig | None = None,
        log_config: LogConfig | None = None,
    ):
        self.client, self.layout, self.kafka, self.dead = client, layout, kafka, dead
        # Catch-up processes for the first pass (the second, after the swap, is short: this one).
        # They build their own clients, so they need the settings, not the client.
        if processes > 1 and opensearch is None:
            raise ValueError("several reindex processes need the [opensearch] settings")
        self.processes, self.opensearch = processes, opensearch
        # Fewer processes when the topics hold too few events for each to pay for its start.
        self.min_events_per_process = min_events_per_process
        self.log_config = log_config or LogConfig()
        self.number_of_replicas = number_of_replicas  # of the new versions ([opensearch])
        self.refresh_interval = refresh_interval  # put on the new versions before the swap ([opensearch])
        self.max_bytes, self.batch = max_bytes, batch
        # Bulk requests in flight at once: OpenSearch indexes them on all its cores while the
        # next batch is decoded here.
        self.parallel_requests = parallel_requests
        # The rebuilt index keeps the same copy of a conflicting instance as the live one.
        self.conflict_policy = conflict_policy

    def next_version(self, kinds: list[str]) -> int:
        existing = []
        for kind in kinds:
            existing += [
                int(m.group(1))
                for n in self.client.indices.get(index=f"{self.layout.alias(kind)}-v*")
                if (m := re.search(r"-v(\d+)$", n))
            ]
        return max(existing, default=0) + 1

    def _create(self, kinds: list[str], version: int) -> dict[str, str]:
        """Create the new versions with refresh off while they fill (nobody searches them yet);
        return each index's refresh interval from its template, put back before the swap."""
        refresh = {}
        for kind in kinds:
            settings = install_template(self.client, self.layout, kind, self.number_of_replicas, self.refresh_interval)[
                "settings"
            ]
            index = self.layout.index(kind, version)
            # Created with refresh off (the request's settings take precedence over the template's):
            # one cluster state update instead of three requests (docs/PERFORMANCE.md, issue 19, stop 25).
            self.client.indices.create(index=index, body={"settings": {"index": {"refresh_interval": "-1"}}})
            refresh[index] = settings.get("refresh_interval", "1s")  # OpenSearch's default where unset
        return refresh

    def _carry_over(self, kinds: list[str], old: dict[str, int], version: int) -> set[str]:
        """Copy the old version of a kind whose topic expires (dead letters: 90 days) into the new one
        before the catch-up overwrites what the topic still has (same ids). Rebuilt from the topic alone,
        the index lost every dead letter older than the topic's retention. Read and written by this
        process (scroll and bulk): OpenSearch's `_reindex` is a module the minimal distribution lacks.
        Returns the kinds whose old version holds documents the new one refused: never deleted."""
        keep_old: set[str] = set()
        for kind in kinds:
            topics = [_TOPICS[t] for t, k in self.layout.kinds.items() if k == kind]
            if not old[kind] or not any(expires(t) for t in topics):
                continue
            source, target = self.layout.index(kind, old[kind]), self.layout.index(kind, version)
            documents = scan(self.client, index=source, query={"query": {"match_all": {}}}, size=1000)
            copied, refused, unavailable = 0, 0, 0
            try:
                for ok, item in streaming_bulk(
                    self.client,
                    ({"_index": target, "_id": d["_id"], "_source": d["_source"]} for d in documents),
                    chunk_size=1000,
                    max_chunk_bytes=self.max_bytes,  # as the sink's requests: under a proxy's limit too
                    max_retries=5,  # a 429 (OpenSearch busy) is waited out, up to 1+2+...+16 s
                    initial_backoff=1,
                    raise_on_error=False,
                ):
                    status = next(iter(item.values())).get("status", 500)
                    copied += ok
                    refused += not ok and 400 <= status < 500 and status != 429
                    unavailable += not ok and (status == 429 or status >= 500)
            except TransportError as exc:
                whole = refused_whole_status(exc)
                if whole is None:
                    raise
                # Sent again it is refused again: said with the fix, before any swap (the new versions dropped).
                why = (
                    REFUSED_WHOLE_FIX[whole]
                    if whole != 400  # 413, or a 429 for a request over the node's indexing pressure limit
                    else f"OpenSearch found it malformed ({exc.error if isinstance(exc.info, dict) else 'not its answer'})"
                )
                raise ReindexFailed(
                    f"OpenSearch refused a bulk request copying {source} as a whole (HTTP {whole}); "
                    f"nothing was swapped: {why}"
                ) from exc
            if unavailable:
                raise ReindexFailed(f"OpenSearch did not take {unavailable} documents of {source}; nothing was swapped")
            if refused:  # the new template refuses them: kept in the old version (even with --delete-old), said
                log.warning("reindex.carry_over_refused", kind=kind, source=source, documents=refused)
                keep_old.add(kind)
            log.info("reindex.carried_over", kind=kind, source=source, documents=copied)
        return keep_old

    def _drop(self, kinds: list[str], version: int) -> None:
        """Delete the half-built ``version`` of ``kinds``, so that a failed reindex leaves nothing behind."""
        for kind in kinds:
            index = self.layout.index(kind, version)
            try:
                self.client.indices.delete(index=index, ignore_unavailable=True)
                log.warning("reindex.dropped", index=index, reason="the reindex failed before the swap")
            except Exception as exc:  # the failure being raised matters more than this one
                log.error("reindex.drop_failed", index=index, error=type(exc).__name__)

    def _catch_up_in_processes(
        self,
        version: int,
        shares: list[list[Partition]],
        starts: dict[Partition, int],
        ends: dict[Partition, int],
        progress: Callable[[int], None],
    ) -> dict[Partition, int]:
        """``catch_up`` in spawned processes, one of ``shares`` each; every partition's final position."""
        assert self.opensearch is not None
        context = multiprocessing.get_context("spawn")  # never fork a process holding librdkafka threads
        events = context.Queue()
        position = dict(starts)
        procs = {}
        for number, partitions in enumerate(shares):
            share = _Share(
                number,
                self.kafka,
                self.opensearch,
                self.log_config,
                self.layout.prefix,
                version,
                self.max_bytes,
                self.batch,
                self.conflict_policy,
                self.parallel_requests,
                {tp: starts[tp] for tp in partitions},
                {tp: ends[tp] for tp in partitions},
            )
            procs[number] = context.Process(
                target=_catch_up_share, args=(share, events), name=f"diana-reindex-{number}"
            )
            procs[number].start()
        log.info("reindex.processes", processes=len(procs), partitions=[len(s) for s in shares])
        done: set[int] = set()
        try:
            while len(done) < len(procs):
                try:
                    kind, number, value = events.get(timeout=1.0)
                except queue.Empty:
                    gone = [n for n, proc in procs.items() if n not in done and proc.exitcode is not None]
                    if gone:
                        raise ReindexFailed(
                            f"reindex process {gone[0]} exited ({procs[gone[0]].exitcode}) before it was done"
                        ) from None
                    continue
                if kind == "progress":
                    progress(value)
                elif kind == "done":
                    position.update(value)
                    done.add(number)
                else:
                    raise ReindexFailed(f"reindex process {number} failed: {value}")
        finally:
            failed = len(done) < len(procs)
            for proc in procs.values():
                if failed and proc.exitcode is None:
                    proc.terminate()
                proc.join(30)
        return position

    def _connected_admin(self, topic: str) -> AdminClient:
        """An admin client connected to the cluster. Asked for offsets straight after it was made, it
        waited exactly 1 s in 1 of 25 runs: librdkafka drops the bootstrap connection once it learns
        the broker's own address, and a request it held is sent again later (docs/PERFORMANCE.md)."""
        admin = kafka_admin(self.kafka)
        admin.list_topics(topic, timeout=10)
        return admin

    def _plan(self, topics: list[str], admin_ready: Future[AdminClient]) -> _Plan:
        """The catch-up's consumer, partitions, offsets and shares. With one share, the consumer is
        assigned at once: it fetches while OpenSearch creates the new versions."""
        consumer = _catch_up_consumer(self.kafka)
        try:
            # The consumer's own metadata request: assigned without it, its first fetch waited
            # about 1 s in 1 run of 8 (a fresh consumer learning the partitions' leaders).
            partitions = [(t, p) for t in topics for p in consumer.list_topics(t, timeout=10).topics[t].partitions]
            admin = admin_ready.result()
            starts = _offsets(admin, partitions, OffsetSpec.earliest())
            ends = _offsets(admin, partitions, OffsetSpec.latest())
            shares = share_out({tp: ends[tp] - starts[tp] for tp in ends}, self.processes, self.min_events_per_process)
            if len(shares) <= 1:
                consumer.assign([TopicPartition(t, p, starts[(t, p)]) for (t, p) in starts])
            default_codec()  # the schemas parsed (10 ms) here, not on the way to the first batch
        except BaseException:
            consumer.close()
            raise
        return _Plan(consumer, admin, starts, ends, shares)

    def run(
        self,
        kinds: list[str],
        progress: Callable[[int], None],
        set_total: Callable[[int], None],
        delete_old: bool = False,
    ) -> dict[str, tuple[int, int]]:
        """Rebuild ``kinds``; return kind -> (old version, new version)."""
        topics = [t for t, k in self.layout.kinds.items() if k in kinds]
        # Kafka's side is planned while OpenSearch creates the new versions: each is mostly a wait on
        # a server (about 50 ms apiece for a fresh client's first metadata and for the index creation).
        with ThreadPoolExecutor(2, thread_name_prefix="reindex-kafka") as planning:
            admin_ready = planning.submit(self._connected_admin, topics[0])
            plan_ready = planning.submit(self._plan, topics, admin_ready)
            version = 0
            try:
                old = {kind: current_version(self.client, self.layout, kind) for kind in kinds}
                version = self.next_version(kinds)
                refresh = self._create(kinds, version)
                keep_old = self._carry_over(kinds, old, version)
            except BaseException:
                if version:  # one kind's version may be created already
                    self._drop(kinds, version)
                if plan_ready.exception() is None:
                    plan_ready.result().consumer.close()
                raise
        try:
            plan = plan_ready.result()
        except BaseException:
            self._drop(kinds, version)
            raise
        consumer, admin, starts, ends = plan.consumer, plan.admin, plan.starts, plan.ends
        sink = OpenSearchSink(
            self.client,
            self.layout,
            max_bytes=self.max_bytes,
            index_version=version,
            conflict_policy=self.conflict_policy,
            parallel_requests=self.parallel_requests,
        )
        try:
            try:
                set_total(sum(ends[tp] - starts[tp] for tp in ends))
                if len(plan.shares) > 1:
                    position = self._catch_up_in_processes(version, plan.shares, starts, ends, progress)
                else:
                    position = dict(starts)
                    catch_up(consumer, sink, self.dead, position, ends, self.batch, progress)
            except BaseException:
                self._drop(kinds, version)  # before the swap: the aliases still name the old versions
                raise
            for index, interval in refresh.items():
                self.client.indices.put_settings(index=index, body={"index": {"refresh_interval": interval}})
                self.client.indices.refresh(index=index)
            actions = []
            for kind in kinds:
                alias = self.layout.alias(kind)
                if old[kind]:
                    actions.append({"remove": {"index": self.layout.index(kind, old[kind]), "alias": alias}})
                actions.append({"add": {"index": self.layout.index(kind, version), "alias": alias}})
            self.client.indices.update_aliases(body={"actions": actions})
            log.info("reindex.swapped", version=version, kinds=kinds)
            later = _offsets(admin, list(ends), OffsetSpec.latest())
            set_total(sum(later[tp] - starts[tp] for tp in later))
            before = dict(position)
            consumer.assign([TopicPartition(t, p, position[(t, p)]) for (t, p) in position])
            catch_up(consumer, sink, self.dead, position, later, self.batch, progress)
        finally:
            consumer.close()
        # Refreshed before the swap; again only if the catch-up after it wrote more.
        wrote_after_swap = position != before
        for kind in kinds:
            if wrote_after_swap:
                self.client.indices.refresh(index=self.layout.index(kind, version))
            if not (delete_old and old[kind]):
                continue
            previous = self.layout.index(kind, old[kind])
            if kind in keep_old:
                log.warning("reindex.old_kept", index=previous, reason="documents not copied")
            else:
                self.client.indices.delete(index=previous)
                log.info("reindex.deleted", index=previous)
        return {kind: (old[kind], version) for kind in kinds}
