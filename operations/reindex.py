"""Zero-downtime index rebuild from the log (`diana reindex`).

1. Create the next version of each index (``diana-series-v2``) from the current template.
2. Read the topics from the beginning with a consumer of its own (no group commits) and write
   into the new version, while the live sink keeps writing through the alias to the old one.
3. Caught up: swap every alias in one atomic request.
4. Catch up once more, to the end offsets after the swap: what the live sink wrote to the old
   version just before the swap reaches the new one too (writes are idempotent).
The old versions are deleted only on request.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import structlog
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from opensearchpy import OpenSearch

from diana.clients import kafka_consumer
from diana.config import ConflictPolicy, KafkaConfig
from diana.schemas.layout import IndexLayout
from diana.sinks.consumer import DeadLetters, write_until_done
from diana.sinks.opensearch import OpenSearchSink, PreparedBatch, install_template

__all__ = ["Reindexer", "current_version"]

log = structlog.get_logger("diana.reindex")


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
    ):
        self.client, self.layout, self.kafka, self.dead = client, layout, kafka, dead
        self.number_of_replicas = number_of_replicas  # of the new versions ([opensearch])
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
            install_template(self.client, self.layout, kind, self.number_of_replicas)
            index = self.layout.index(kind, version)
            self.client.indices.create(index=index)
            settings = self.client.indices.get_settings(index=index)[index]["settings"]["index"]
            refresh[index] = settings.get("refresh_interval", "1s")
            self.client.indices.put_settings(index=index, body={"index": {"refresh_interval": "-1"}})
        return refresh

    def _catch_up(
        self,
        consumer: Consumer,
        sink: OpenSearchSink,
        position: dict[tuple[str, int], int],
        ends: dict[tuple[str, int], int],
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
        with ThreadPoolExecutor(1, thread_name_prefix="reindex-writer") as writer:
            writing: Future[None] | None = None
            while any(position[tp] < end for tp, end in ends.items()):
                consumed = consumer.consume(self.batch, timeout=1.0)
                messages = [m for m in consumed if m.error() is None]
                if messages:
                    try:
                        prepared: PreparedBatch | None = sink.prepare(messages)
                    except Exception:  # the writer writes it message by message, parking what raises
                        prepared = None
                    if writing is not None:
                        writing.result()  # raises what the writer raised
                    writing = writer.submit(self._write, sink, messages, prepared, progress)
                for m in consumed:  # in order: a partition's end event comes after its messages
                    tp = (m.topic(), m.partition())
                    if m.error() is None:
                        position[tp] = m.offset() + 1
                    elif m.error().code() == KafkaError._PARTITION_EOF:
                        position[tp] = max(position[tp], m.offset())
            if writing is not None:
                writing.result()

    def _write(
        self,
        sink: OpenSearchSink,
        messages: list[Message],
        prepared: PreparedBatch | None,
        progress: Callable[[int], None],
    ) -> None:
        # never asked to stop: retried until written
        write_until_done(_Prepared(sink, prepared), messages, self.dead, threading.Event())
        progress(len(messages))

    def run(
        self,
        kinds: list[str],
        progress: Callable[[int], None],
        set_total: Callable[[int], None],
        delete_old: bool = False,
    ) -> dict[str, tuple[int, int]]:
        """Rebuild ``kinds``; return kind -> (old version, new version)."""
        topics = [t for t, k in self.layout.kinds.items() if k in kinds]
        old = {kind: current_version(self.client, self.layout, kind) for kind in kinds}
        version = self.next_version(kinds)
        refresh = self._create(kinds, version)
        sink = OpenSearchSink(
            self.client,
            self.layout,
            max_bytes=self.max_bytes,
            index_version=version,
            conflict_policy=self.conflict_policy,
            parallel_requests=self.parallel_requests,
        )
        consumer = kafka_consumer(
            self.kafka, f"diana-reindex-{uuid.uuid4()}", {"enable.auto.commit": False, "enable.partition.eof": True}
        )
        try:
            ends, starts = {}, {}
            for topic in topics:
                meta = consumer.list_topics(topic, timeout=10).topics[topic]
                for p in meta.partitions:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    starts[(topic, p)], ends[(topic, p)] = low, high
            set_total(sum(ends[tp] - starts[tp] for tp in ends))
            consumer.assign([TopicPartition(t, p, starts[(t, p)]) for (t, p) in starts])
            position = dict(starts)
            self._catch_up(consumer, sink, position, ends, progress)
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
            later = {}
            for t, p in ends:
                later[(t, p)] = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            set_total(sum(later[tp] - starts[tp] for tp in later))
            self._catch_up(consumer, sink, position, later, progress)
        finally:
            consumer.close()
        for kind in kinds:
            self.client.indices.refresh(index=self.layout.index(kind, version))
            if delete_old and old[kind]:
                self.client.indices.delete(index=self.layout.index(kind, old[kind]))
                log.info("reindex.deleted", index=self.layout.index(kind, old[kind]))
        return {kind: (old[kind], version) for kind in kinds}
