"""One transaction's view of the worker's state and sends (``Batch``), and the handler that gets it.

A handler (aggregates.py) reads and writes state by (partition, namespace, key) and sends records
through a Batch; the transactional loop (transactional.py) makes one Batch per transaction and,
at its end, writes each changed key once to the changelog and commits it all together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import Counter

from diana.clients import RECORD_FRAMING
from diana.stream_apps.state_json import state_json
from diana.stream_apps.state_store import StateStore

__all__ = ["RECORD_FRAMING", "Batch", "Handler", "RecordTooLarge"]

log = structlog.get_logger("diana.stream.transactional")

UNENCODABLE = Counter(
    "diana_stream_unencodable_total", "Records of the worker's own the schema refused (not published)", ["topic"]
)


_DELETED = object()
_ABSENT = object()
_SEP = "/"


class RecordTooLarge(Exception):
    """A record of the worker's own (state or output) exceeds [kafka] max_message_bytes.

    The same batch would make it again: the transaction cannot commit, the worker must stop. The
    message names the record's topic (and namespace) and its size, never its key (UIDs)."""


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

    def __init__(self, store: _Store, producer: Producer, changelog: str, max_record_bytes: int | None = None) -> None:
        self._store, self._producer, self._changelog = store, producer, changelog
        # [kafka] max_message_bytes less the framing: the largest record the topics accept. None: unchecked.
        self._limit = None if max_record_bytes is None else max_record_bytes - RECORD_FRAMING
        self._pending: dict[tuple[int, str], dict[str, Any]] = {}
        # One message's undo journal and held-back sends: a message whose handling raises leaves
        # no trace in the transaction (message_failed), the ones before and after it stay.
        self._undo: list[tuple[tuple[int, str], str, Any]] = []
        self._held: list[tuple[str, bytes | None, bytes, dict[str, bytes] | None]] = []
        # Per (topic, key), the value last published in this transaction and how to encode it: one
        # encode and one record per changed key per transaction, not one per message.
        self._latest: dict[tuple[str, bytes], tuple[Any, Callable[[Any], bytes]]] = {}
        self._latest_undo: list[tuple[tuple[str, bytes], Any]] = []
        # Per changelog partition: delivery reports awaited and received (one: its last record's,
        # see write_changelog), the offset delivered (the local file's checkpoint after the commit),
        # and partitions with a failed delivery.
        self.sent: dict[int, int] = {}
        self.delivered: dict[int, int] = {}
        self.last_offset: dict[int, int] = {}
        self.undelivered: set[int] = set()
        # Error codes of failed delivery reports (a size refusal stops the worker: transactional.py).
        self.failed_codes: set[int] = set()
        # Per partition, each changelog record's (namespace, key, JSON text or None): the local
        # file gets the same encoding, not a second one.
        self.encoded: dict[int, list[tuple[str, str, str | None]]] = {}

    def get(self, partition: int, namespace: str, key: str) -> Any:
        space = self._pending.get((partition, namespace))  # read several times per instance: no {} made
        if space is not None:
            value = space.get(key)
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
            if self._limit is not None and len(encoded) + len(key) > self._limit:
                raise RecordTooLarge(f"a {topic} record of {len(encoded)} bytes")
            self._producer.produce(topic, key=key, value=encoded)
        self._latest.clear()

    def write_changelog(self) -> None:
        """Each key changed in this batch, once, with its final value (None: deleted).

        Only each partition's last record asks for a delivery report, for the offset the local
        file's checkpoint needs: the producer is idempotent, so a partition's records are written
        in order without gaps, and the transaction commits only if every one of them was written
        (a failed one fails the commit). A report per record was a Python callback per instance.
        """
        held: dict[int, tuple[bytes, bytes | None]] = {}  # partition -> its latest record, not yet produced
        produce, changelog, limit = self._producer.produce, self._changelog, self._limit
        for (partition, namespace), changes in self._pending.items():
            encoded = None
            for key, value in changes.items():
                if value is _DELETED and self._store.get(partition, namespace, key) is None:
                    continue  # created and deleted within the batch, or never there
                text = None if value is _DELETED else state_json(value)
                if limit is not None and text is not None and len(text) + len(key) > limit:
                    raise RecordTooLarge(f"a {changelog} record of {len(text)} bytes (namespace {namespace})")
                before = held.get(partition)
                if before is not None:
                    produce(changelog, key=before[0], partition=partition, value=before[1])
                held[partition] = (f"{namespace}{_SEP}{key}".encode(), None if text is None else text.encode())
                if encoded is None:
                    encoded = self.encoded.setdefault(partition, [])
                encoded.append((namespace, key, text))
        for partition, (key_bytes, value_bytes) in held.items():
            produce(changelog, key=key_bytes, partition=partition, value=value_bytes, on_delivery=self._delivered)
            self.sent[partition] = 1

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        partition = message.partition()
        if error is not None:
            self.undelivered.add(partition)
            self.failed_codes.add(error.code())
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

    def send_dead_letter(self, topic: str, key: bytes, value: bytes | None, headers: dict[str, bytes]) -> None:
        """A dead letter (``send``), its value dropped if the record would exceed the limit.

        An event read from an lz4-compressed topic can be larger uncompressed than the limit, and
        the headers come on top; a record the broker refuses would fail every retry of the batch.
        What stays says why and where from: its headers (origin, reason) and ``value_dropped``.
        """
        value = value or b""
        size = len(key) + len(value) + sum(len(name) + len(v) for name, v in headers.items())
        if self._limit is not None and size > self._limit:
            headers = {**headers, "value_dropped": f"{len(value)} bytes, over [kafka] max_message_bytes".encode()}
            value = b""
        self.send(topic, key, value, headers)

    def commit_locally(self) -> None:
        """The transaction committed: its changes become the committed state."""
        for (partition, namespace), changes in self._pending.items():
            for key, value in changes.items():
                self._store.set(partition, namespace, key, None if value is _DELETED else value)
