"""The landing store: received Part-10 objects made durable before anything is published.

Content-addressed (``ab/abcdef….dcm`` by SHA-256): identical re-sends land on the same file,
different bytes for the same SOP Instance UID never overwrite each other, and no header
value ever becomes part of a path. ``.incoming/`` (same filesystem) holds objects while they
are received, so that accepting one is a hard link, not a copy.

Where the objects land: the local folder (``[storage] backend = "filesystem"``, the fast path: a
hard link, no copy) or, with a ``remote`` store (``backend = "s3"``, ``open_store(cfg, "landing")``),
that store under the same content-addressed key: the received file is put there (SHA-256 verified)
before the event is published, and ``.incoming/`` stays a local scratch folder. Events name the
object by its URI (``StoredObject.uri``): ``file:///...`` or ``s3://bucket/landing/...``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from diana.config import Config
from diana.durable import copy_hashed, place_file, sha256_file, write_atomic
from diana.scratch import ScratchFile, remove_unless_held
from diana.storage import FilesystemStore, ObjectStore, local_file, open_store

__all__ = ["SWEEP_AFTER_S", "LandingStore", "StoredObject", "open_landing"]

# The age past which the receiver's periodic sweep removes a half-written file (a crashed writer's), and
# past which a file whose lock cannot be tested is removed by any sweep (LandingStore.sweep).
SWEEP_AFTER_S = 3600.0


@dataclass(frozen=True)
class StoredObject:
    relative_path: str  # the content-addressed key: <sha256[:2]>/<sha256>.dcm
    sha256: str
    size: int
    uri: str  # where it is: file:///<root>/<key> or s3://<bucket>/landing/<key>


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
    event for bytes the sender was told to send again: harmless, every consumer is idempotent).

    ``remote``: land into this store (S3) instead of the folder; ``root`` then holds only the
    local scratch folder ``.incoming/``. A remote landing store is always shared (other hosts land
    into it), so a failed publish never removes the object either."""

    def __init__(self, root: Path, shared: bool = False, remote: ObjectStore | None = None):
        self.root = Path(root).resolve()
        self.remote = remote
        self.shared = shared or remote is not None
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _target(self, digest: str) -> tuple[str, Path]:
        relative = f"{digest[:2]}/{digest}.dcm"
        return relative, self.root / relative

    @staticmethod
    def _complete(target: Path, size: int) -> bool:
        """An object of this size is there: enough to know it was there before (not ours to remove)."""
        try:
            return target.stat().st_size == size
        except FileNotFoundError:
            return False

    @classmethod
    def _intact(cls, target: Path, digest: str, size: int) -> bool:
        """The object there holds these very bytes. Read back only when one of that size is there (the
        same bytes sent again while the first copy waits for the archive sink): a copy damaged on disk
        since is then replaced by the bytes just received, instead of a sender told "success" for bytes
        the archive sink would refuse."""
        try:
            return cls._complete(target, size) and sha256_file(target) == (digest, size)
        except FileNotFoundError:  # archived and removed meanwhile by the archive sink: placed again
            return False

    def put(self, data: bytes) -> StoredObject:
        """Store bytes durably (tests and tools; the receiver uses ``landed``)."""
        digest = hashlib.sha256(data).hexdigest()
        relative, target = self._target(digest)
        if self.remote is not None:
            self.remote.put_stream(relative, io.BytesIO(data), sha256=digest)
            return StoredObject(relative, digest, len(data), self.remote.uri(relative))
        if not self._intact(target, digest, len(data)):
            write_atomic(target, data)
        return StoredObject(relative, digest, len(data), target.as_uri())

    @contextmanager
    def landed(self, source: Path, owned: bool, synced_digest: tuple[str, int] | None = None) -> Iterator[StoredObject]:
        """Store ``source`` durably while its event is published inside the block.

        If the block fails (no acknowledgement), the object is removed again unless it was
        there before or another caller with the same bytes published it: the sender hears
        failure and retries, and nothing stays that no event points to. Except when the failure
        says the event may have gone out all the same (``possibly_published``, a timeout): then the
        object stays, and is republished later if no event took it.
        ``owned``: the file is ours (received into .incoming) and may be hard-linked into
        place; otherwise (an import) it is first copied into .incoming, hashed as it is copied
        (``private_copy``), and that copy is landed: a source rewritten meanwhile cannot land under
        another bytes' hash, nor reach us later.
        ``synced_digest``: (SHA-256, size) of an owned source already fsync'd by the caller, which
        hashed it while it arrived (spill.py): the file is then not read again here.
        """
        if not owned:
            with self.private_copy(source) as (copy, copied), self.landed(copy, True, copied) as stored:
                yield stored
            return
        digest, size = synced_digest if synced_digest is not None else sha256_file(source)
        relative, target = self._target(digest)
        with self._lock:
            entry = self._entries.get(relative)
            if entry is None:
                entry = self._entries[relative] = _Entry(preexisting=self._complete(target, size))
            entry.holders += 1
        published = False
        try:
            if self.remote is not None:
                # Durable in the store before the event exists. Always put (no HEAD first): a new
                # object needs the put anyway, and a put of a content-addressed key is idempotent,
                # also against another host putting the same bytes at this moment (base.py).
                self.remote.put_file(relative, source, sha256=digest)
                uri = self.remote.uri(relative)
            else:
                if not self._intact(target, digest, size):
                    place_file(source, target, link=owned, synced=synced_digest is not None)
                uri = target.as_uri()
            yield StoredObject(relative, digest, size, uri)
            published = True
        except BaseException as exc:
            # The block could not tell whether its event went out (a broker timeout can still
            # append it): keep the object, so that such an event finds it. If it did not go out,
            # the sender's retry or the periodic republish of old landed objects publishes it.
            published = bool(getattr(exc, "possibly_published", False))
            raise
        finally:
            with self._lock:
                entry.holders -= 1
                entry.published |= published
                if entry.holders == 0:
                    del self._entries[relative]
                    if not (entry.published or entry.preexisting or self.shared):
                        target.unlink(missing_ok=True)

    @contextmanager
    def private_copy(self, source: Path) -> Iterator[tuple[Path, tuple[str, int]]]:
        """A copy of ``source`` in .incoming, fsync'd, and its (SHA-256, size), for the block; removed after.

        For a file that is not ours (a user's, imported): it may change while it is read, so its header,
        hash and landed bytes are all taken from this copy, which nothing else writes. Its digest is that
        of the bytes written (one read of the source), so it lands as ``owned``, hard-linked."""
        # Locked while it exists: a receiver starting meanwhile sweeps .incoming, and leaves it (scratch.py).
        with ScratchFile(self.incoming, prefix=".copy-", suffix=".tmp") as copy:
            with copy.open("wb") as dst, open(source, "rb") as src:
                digest = copy_hashed(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            yield copy.path, digest

    def in_flight(self, relative: str) -> bool:
        """Some caller is landing these bytes right now (its event is not acknowledged yet)."""
        with self._lock:
            return relative in self._entries

    def landed_objects(self) -> Iterator[tuple[str, float]]:
        """(key, time it landed, POSIX seconds) of every complete object, local or remote."""
        if self.remote is not None:
            for key in self.remote.list():
                if key.endswith(".dcm"):
                    try:
                        yield key, self.remote.modified(key)
                    except FileNotFoundError:
                        continue  # archived and removed meanwhile
            return
        for key, path in self.stored_objects():
            try:
                yield key, path.stat().st_mtime
            except FileNotFoundError:
                continue

    def uri(self, key: str) -> str:
        """The URI of the landed object ``key`` (what events carry)."""
        return self.remote.uri(key) if self.remote is not None else (self.root / key).as_uri()

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """The landed object as a local file for the block (remote: a temp copy); FileNotFoundError when gone."""
        if self.remote is None:
            path = self.root / key
            if not path.is_file():
                raise FileNotFoundError(f"no landed object {key}")
            yield path
            return
        with local_file(self.remote, key) as path:
            yield path

    def stored_objects(self) -> Iterator[tuple[str, Path]]:
        """Every complete object in the local folder (temp files and .incoming excluded)."""
        for shard in sorted(self.root.iterdir()):
            if shard.name.startswith(".") or not shard.is_dir():
                continue
            for path in sorted(shard.glob("*.dcm")):
                if not path.name.startswith("."):
                    yield f"{shard.name}/{path.name}", path

    def sweep(self, older_than_s: float, untested_after_s: float = SWEEP_AFTER_S) -> int:
        """Delete what a crash or an aborted association left half-written; return how many.

        A file a live writer holds locked (``scratch.ScratchFile``: an import's copy, extracted member or
        inflated data set, a STOW-RS body and its parts, and their hard links beside the landed objects) is
        left, whatever its age: a receiver starting while an import runs removed the files the import was
        working on. A crashed writer's locks went with it: its files are removed as before. A file whose
        lock cannot be tested (a symlink; another user's, which this process may not open: a crashed
        root-run import's 0600 copy) is removed once ``untested_after_s`` old, whatever ``older_than_s``."""
        cutoff = time.time() - older_than_s
        removed = 0
        candidates = list(self.incoming.iterdir()) + list(self.root.glob("*/.*.tmp"))
        for path in candidates:
            try:
                entry = path.lstat()  # a symlink by its own age: it may point nowhere
                if (
                    (stat.S_ISREG(entry.st_mode) or stat.S_ISLNK(entry.st_mode))
                    and entry.st_mtime <= cutoff
                    and remove_unless_held(path, untested_after_s)
                ):
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def open_landing(config: Config, shared: bool = False) -> LandingStore:
    """The configured landing store: the folder [storage] landing_dir, or (backend "s3") the bucket's
    prefix ``landing/`` with landing_dir as the local scratch folder."""
    store = open_store(config, "landing")
    remote = None if isinstance(store, FilesystemStore) else store
    return LandingStore(config.path(config.storage.landing_dir), shared=shared, remote=remote)
