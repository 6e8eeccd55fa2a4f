"""The landing store: received Part-10 objects made durable before anything is published.

Content-addressed (``ab/abcdef….dcm`` by SHA-256): identical re-sends land on the same file,
different bytes for the same SOP Instance UID never overwrite each other, and no header
value ever becomes part of a path. ``.incoming/`` (same filesystem) holds objects while they
are received, so that accepting one is a hard link, not a copy.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from diana.durable import place_file, sha256_file, write_atomic

__all__ = ["LandingStore", "StoredObject"]


@dataclass(frozen=True)
class StoredObject:
    relative_path: str
    sha256: str
    size: int


@dataclass
class _Entry:
    """The callers currently landing the same bytes."""

    preexisting: bool
    holders: int = 0
    published: bool = False


class LandingStore:
    """``shared``: several processes land into this store at once (``[receiver] processes`` > 1).
    A process then cannot know whether another one published the same bytes meanwhile, so a failed
    publish leaves the object in place instead of removing it; reconcile publishes it later (an
    event for bytes the sender was told to send again: harmless, every consumer is idempotent)."""

    def __init__(self, root: Path, shared: bool = False):
        self.root = Path(root).resolve()
        self.shared = shared
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _target(self, digest: str) -> tuple[str, Path]:
        relative = f"{digest[:2]}/{digest}.dcm"
        return relative, self.root / relative

    @staticmethod
    def _complete(target: Path, size: int) -> bool:
        try:
            return target.stat().st_size == size
        except FileNotFoundError:
            return False

    def put(self, data: bytes) -> StoredObject:
        """Store bytes durably (tests and tools; the receiver uses ``landed``)."""
        digest = hashlib.sha256(data).hexdigest()
        relative, target = self._target(digest)
        if not self._complete(target, len(data)):
            write_atomic(target, data)
        return StoredObject(relative, digest, len(data))

    @contextmanager
    def landed(self, source: Path, owned: bool, synced_digest: tuple[str, int] | None = None) -> Iterator[StoredObject]:
        """Store ``source`` durably while its event is published inside the block.

        If the block fails (no acknowledgement), the object is removed again unless it was
        there before or another caller with the same bytes published it: the sender hears
        failure and retries, and nothing stays that no event points to.
        ``owned``: the file is ours (received into .incoming) and may be hard-linked into
        place; otherwise (an import) it is copied, so later edits of the source cannot reach us.
        ``synced_digest``: (SHA-256, size) of an owned source already fsync'd by the caller, which
        hashed it while it arrived (spill.py): the file is then not read again here.
        """
        digest, size = synced_digest if synced_digest is not None else sha256_file(source)
        relative, target = self._target(digest)
        with self._lock:
            entry = self._entries.get(relative)
            if entry is None:
                entry = self._entries[relative] = _Entry(preexisting=self._complete(target, size))
            entry.holders += 1
        published = False
        try:
            if not self._complete(target, size):
                place_file(source, target, link=owned, synced=synced_digest is not None)
            yield StoredObject(relative, digest, size)
            published = True
        finally:
            with self._lock:
                entry.holders -= 1
                entry.published |= published
                if entry.holders == 0:
                    del self._entries[relative]
                    if not (entry.published or entry.preexisting or self.shared):
                        target.unlink(missing_ok=True)

    def in_flight(self, relative: str) -> bool:
        """Some caller is landing these bytes right now (its event is not acknowledged yet)."""
        with self._lock:
            return relative in self._entries

    def stored_objects(self) -> Iterator[tuple[str, Path]]:
        """Every complete object in the store (temp files and .incoming excluded)."""
        for shard in sorted(self.root.iterdir()):
            if shard.name.startswith(".") or not shard.is_dir():
                continue
            for path in sorted(shard.glob("*.dcm")):
                if not path.name.startswith("."):
                    yield f"{shard.name}/{path.name}", path

    def sweep(self, older_than_s: float) -> int:
        """Delete what a crash or an aborted association left half-written; return how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        candidates = list(self.incoming.iterdir()) + list(self.root.glob("*/.*.tmp"))
        for path in candidates:
            try:
                if path.is_file() and path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
