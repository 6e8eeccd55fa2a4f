"""The stream worker's committed state in memory, with "cold" namespaces kept on local disk only.

partition -> namespace -> key -> JSON value. Most namespaces live wholly in memory. A *cold*
namespace (the aggregates' completed series, studies and digests: read only when an event of
theirs arrives, and what grows with the archive) of a partition whose local file backs it
(``backed``) holds in memory only what changed since the file's last successful write; every other
entry of it is read from the file (local_state.py) when asked for. In memory, ``None`` there means
"deleted, whatever the file still says" until the file has the deletion too.

Why it is never wrong: an entry leaves memory only after the committed transaction that wrote it
is in the file (``evict`` after a successful write); the file is written after every commit, and
once a write fails the partition's file is suspended (no later write, no eviction) until the next
restore, so an entry missing from memory is exactly what the file says, its last committed value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter

from diana.stream_apps.local_state import LocalStates

__all__ = ["StateStore"]

_SEP = "/"
_EMPTY: dict[str, dict[str, Any]] = {}  # never written: what a missing partition reads as

DISK_READS = Counter(
    "diana_stream_state_disk_reads_total", "State entries read from the local file, not memory (cold)", ["namespace"]
)


class StateStore:
    """Committed state: partition -> namespace -> key -> JSON value (cold namespaces: see module doc)."""

    def __init__(self, local: LocalStates | None = None, cold: Iterable[str] = ()) -> None:
        self.partitions: dict[int, dict[str, dict[str, Any]]] = {}
        self.local = local
        self.cold = frozenset(cold) if local is not None else frozenset()
        # Partitions whose cold namespaces are partly only in their local file.
        self.backed: set[int] = set()
        self._disk_reads: dict[str, Any] = {}

    def get(self, partition: int, namespace: str, key: str) -> Any:
        space = self.partitions.get(partition, _EMPTY).get(namespace)
        if space is not None and key in space:
            return space[key]  # None: deleted (a cold entry whose deletion the file lacks yet)
        if partition in self.backed and namespace in self.cold:
            assert self.local is not None
            counter = self._disk_reads.get(namespace)
            if counter is None:  # labels() on every read cost as much as a small lookup
                counter = self._disk_reads[namespace] = DISK_READS.labels(namespace)
            counter.inc()
            return self.local.file(partition).lookup(namespace, key)
        return None

    def apply(self, partition: int, composite_key: str, value: Any) -> None:
        """One changelog record (None: a deletion) applied to the partition's state."""
        namespace, _, key = composite_key.partition(_SEP)
        self.set(partition, namespace, key, value)

    def set(self, partition: int, namespace: str, key: str, value: Any) -> None:
        space = self.partitions.setdefault(partition, {}).setdefault(namespace, {})
        if value is None and not (partition in self.backed and namespace in self.cold):
            space.pop(key, None)
        else:
            space[key] = value  # a cold deletion stays as None until the file has it

    def evict(self, partition: int) -> None:
        """The partition's file now holds every committed change: its cold namespaces leave memory."""
        if partition not in self.backed:
            return
        for namespace in self.cold:
            self.partitions.get(partition, {}).pop(namespace, None)

    def drop(self, partition: int) -> None:
        """The partition was revoked or lost."""
        self.partitions.pop(partition, None)
        self.backed.discard(partition)
