"""The aggregates worker's state on local disk, one SQLite file per partition, with its checkpoint.

A file holds one partition's state (namespace, key, JSON value) and the changelog position it
reflects: every committed changelog record before ``position`` is in it, none after. It is written
after each transaction commits, its changes and the new checkpoint in one SQLite transaction, so a
crash mid-write (kill -9, disk full) leaves the previous checkpoint and its content, which are still
a true snapshot: a restart reads the changelog from there (state_restore.py). A file is never wrong,
only older, as long as no committed transaction is left out of it: a write that fails suspends the
partition's file (no later write may skip over the lost one) until the next assignment restores it.

When the tail cannot be trusted, the restore reads the whole changelog instead (``tail_refusal``).
Each row carries a CRC-32 of its namespace, key and value, checked on load, so a damaged file is
refused rather than read as state.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from diana.stream_apps.state_json import state_json

__all__ = ["Checkpoint", "LocalStateError", "LocalStates", "PartitionFile", "tail_refusal"]

log = structlog.get_logger("diana.stream.local_state")

# Bumped when the file layout changes: a file of another format is refused (a full restore).
FORMAT = 1
# The tail is trusted only while its checkpoint is this much younger than the changelog's
# delete.retention.ms: room for clocks that disagree and for the restore's own read.
_MARGIN_SHARE, _MARGIN_MIN_MS = 0.1, 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    namespace TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, crc INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1), format INTEGER NOT NULL, changelog TEXT NOT NULL,
    partition INTEGER NOT NULL, position INTEGER NOT NULL, written_ms INTEGER NOT NULL,
    topic_id TEXT NOT NULL
);
"""


class LocalStateError(Exception):
    """The file cannot be used as state: ``reason`` is no_local_state, damaged or other_changelog."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Checkpoint:
    # The next changelog offset the file does not reflect (every committed record before it is in).
    position: int
    # Wall time (ms) no later than the append of any changelog record at or after ``position``:
    # a tombstone the file has not seen is younger than this.
    written_ms: int


def tail_refusal(
    checkpoint: Checkpoint, log_start: int, log_end: int, now_ms: int, delete_retention_ms: int | None
) -> str | None:
    """Why the changelog tail after ``checkpoint`` cannot complete the file's state; None if it can.

    - ``beyond_end``: the changelog ends before the checkpoint (recreated, or another cluster).
    - ``before_log_start``: records after the checkpoint were deleted (not compacted: removed).
    - ``older_than_delete_retention``: the cleaner removes a tombstone delete.retention.ms after
      compacting it; a key deleted after the checkpoint whose tombstone is gone would stay in the
      file, alive again. Only a file younger than that (with a margin) is trusted, unless nothing at
      all was appended after it (``position == log_end``).
    """
    if checkpoint.position > log_end:
        return "beyond_end"
    if checkpoint.position < log_start:
        return "before_log_start"
    if checkpoint.position == log_end:
        return None  # nothing was written since: no tombstone can be missing
    if delete_retention_ms is None:
        return "delete_retention_unknown"
    margin = max(_MARGIN_MIN_MS, int(delete_retention_ms * _MARGIN_SHARE))
    if now_ms - checkpoint.written_ms > delete_retention_ms - margin:
        return "older_than_delete_retention"
    return None


def _namespaces(db: sqlite3.Connection) -> Iterator[str]:
    """The file's namespaces, one index seek each (the primary key starts with the namespace): a
    namespace left in the file is never scanned."""
    row = db.execute("SELECT min(namespace) FROM state").fetchone()
    while row is not None and row[0] is not None:
        yield row[0]
        row = db.execute("SELECT min(namespace) FROM state WHERE namespace > ?", (row[0],)).fetchone()


def _encode(changes: Iterable[tuple[str, str, Any]]) -> Iterator[tuple[str, str, str | None]]:
    for namespace, key, value in changes:
        yield namespace, key, None if value is None else state_json(value)


def _crc(namespace: str, key: str, value: str) -> int:
    return zlib.crc32(f"{namespace}\0{key}\0{value}".encode())


class PartitionFile:
    """One partition's state file (SQLite in WAL mode: a writer's crash leaves the last commit)."""

    def __init__(self, path: Path, changelog: str, partition: int, topic_id: str = "") -> None:
        # topic_id: the changelog topic's id (the broker's, per incarnation of the topic): a file
        # of a changelog that was deleted and made again under the same name is refused.
        self.path, self.changelog, self.partition, self.topic_id = path, changelog, partition, topic_id
        self._db: sqlite3.Connection | None = None

    def _connect(self, create: bool) -> sqlite3.Connection:
        if self._db is None:
            if not create and not self.path.exists():
                raise LocalStateError("no_local_state")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # NORMAL: a process crash loses nothing committed; a power loss may lose the last
                # commits, never the file's consistency (it is then only older).
                db.execute("PRAGMA synchronous=NORMAL")
                if create:
                    db.executescript(_SCHEMA)
            except sqlite3.DatabaseError:
                db.close()
                raise
            self._db = db
        return self._db

    def load(self, skip: frozenset[str] = frozenset()) -> tuple[Checkpoint, dict[str, dict[str, Any]]]:
        """The checkpoint and the state (namespace -> key -> value); LocalStateError if unusable.

        ``skip``: namespaces left in the file (read with ``lookup`` when needed, their CRCs then)."""
        try:
            db = self._connect(create=False)
            db.execute("BEGIN")  # one snapshot: the checkpoint and the rows it describes
            try:
                return self._read(db, skip)
            finally:
                db.execute("COMMIT")
        except (sqlite3.DatabaseError, ValueError, TypeError) as exc:  # damaged, or not SQLite at all
            self.close()
            raise LocalStateError("damaged", f"{type(exc).__name__}: {exc}") from exc

    def _read(self, db: sqlite3.Connection, skip: frozenset[str]) -> tuple[Checkpoint, dict[str, dict[str, Any]]]:
        row = db.execute(
            "SELECT format, changelog, partition, position, written_ms, topic_id FROM checkpoint"
        ).fetchone()
        if row is None:
            raise LocalStateError("damaged", "no checkpoint")
        if (row[0], row[1], row[2], row[5]) != (FORMAT, self.changelog, self.partition, self.topic_id):
            raise LocalStateError(
                "other_changelog", f"format {row[0]}, changelog {row[1]!r} (id {row[5]}) partition {row[2]}"
            )
        state: dict[str, dict[str, Any]] = {}
        for name in _namespaces(db):
            if name in skip:
                continue
            space = state.setdefault(name, {})
            for namespace, key, value, crc in db.execute(
                "SELECT namespace, key, value, crc FROM state WHERE namespace = ?", (name,)
            ):
                if _crc(namespace, key, value) != crc:
                    raise LocalStateError("damaged", f"a row of {namespace}/ whose CRC does not match")
                space[key] = json.loads(value)
        return Checkpoint(int(row[3]), int(row[4])), state

    def lookup(self, namespace: str, key: str) -> Any:
        """One entry (None: absent), its CRC checked; LocalStateError if the file cannot answer."""
        try:
            row = (
                self._connect(create=False)
                .execute("SELECT value, crc FROM state WHERE namespace = ? AND key = ?", (namespace, key))
                .fetchone()
            )
        except sqlite3.DatabaseError as exc:
            self.close()
            raise LocalStateError("damaged", f"{type(exc).__name__}: {exc}") from exc
        if row is None:
            return None
        if _crc(namespace, key, row[0]) != row[1]:
            raise LocalStateError("damaged", f"a row of {namespace}/ whose CRC does not match")
        return json.loads(row[0])

    def write(self, changes: Iterable[tuple[str, str, Any]], checkpoint: Checkpoint, encoded: bool = False) -> None:
        """Apply changes (value None: deleted) and move the checkpoint, atomically.

        ``encoded``: the values are JSON text already (the changelog records' own encoding)."""
        self._commit(changes if encoded else _encode(changes), checkpoint)

    def replace(self, state: Mapping[str, Mapping[str, Any]], checkpoint: Checkpoint) -> None:
        """The whole state at ``checkpoint`` (after a full restore), in a new file.

        The old file (older, or damaged) is removed first: a crash before the new one's single
        transaction commits leaves no checkpoint, hence a full restore next time, never a mix.
        """
        self.remove()
        changes = ((ns, key, value) for ns, space in state.items() for key, value in space.items() if value is not None)
        self._commit(_encode(changes), checkpoint)

    def remove(self) -> None:
        self.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _commit(self, changes: Iterable[tuple[str, str, str | None]], checkpoint: Checkpoint) -> None:
        db = self._connect(create=True)
        db.execute("BEGIN IMMEDIATE")
        try:
            upserts, deletes = [], []
            for namespace, key, text in changes:
                if text is None:
                    deletes.append((namespace, key))
                else:
                    upserts.append((namespace, key, text, _crc(namespace, key, text)))
            if deletes:
                db.executemany("DELETE FROM state WHERE namespace = ? AND key = ?", deletes)
            if upserts:
                db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?)", upserts)
            db.execute(
                "INSERT OR REPLACE INTO checkpoint VALUES (1, ?, ?, ?, ?, ?, ?)",
                (FORMAT, self.changelog, self.partition, checkpoint.position, checkpoint.written_ms, self.topic_id),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None


class LocalStates:
    """The worker's state folder: ``<state_dir>/<app_id>-<worker_id>/partition-<n>.sqlite``.

    One folder per worker id, so two workers on one host never share a file. A partition whose
    write failed is suspended: no write until it is assigned (and restored) again.
    """

    def __init__(self, folder: Path, changelog: str, cold: frozenset[str] = frozenset()) -> None:
        self.folder, self.changelog = folder, changelog
        # Namespaces kept out of memory once in the file (state_store.py): not loaded on restore.
        self.cold = cold
        # The changelog topic's id, as the last restore read it from the broker ("" unknown).
        self.topic_id = ""
        self._files: dict[int, PartitionFile] = {}
        self.suspended: dict[int, str] = {}

    def file(self, partition: int) -> PartitionFile:
        if partition not in self._files:
            path = self.folder / f"partition-{partition}.sqlite"
            self._files[partition] = PartitionFile(path, self.changelog, partition, self.topic_id)
        found = self._files[partition]
        found.topic_id = self.topic_id
        return found

    def resume(self, partition: int) -> None:
        """The partition was restored: its file is written again from here on."""
        self.suspended.pop(partition, None)

    def write(
        self, partition: int, changes: Iterable[tuple[str, str, Any]], checkpoint: Checkpoint, encoded: bool = False
    ) -> bool:
        """Write one committed transaction's changes; False (and suspended) if that failed."""
        if partition in self.suspended:
            return False
        try:
            self.file(partition).write(changes, checkpoint, encoded)
            return True
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:  # disk full, damaged file...
            self.suspend(partition, f"{type(exc).__name__}: {exc}")
            return False

    def replace(self, partition: int, state: Mapping[str, Mapping[str, Any]], checkpoint: Checkpoint) -> bool:
        """Write the partition's whole state (after a full restore); False (and suspended) if that failed."""
        try:
            self.file(partition).replace(state, checkpoint)
            return True
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            self.suspend(partition, f"{type(exc).__name__}: {exc}")
            return False

    def suspend(self, partition: int, reason: str) -> None:
        """Stop writing the partition's file: it stays a true, older snapshot (a later restore reads more)."""
        log.warning("local_state.suspended", partition=partition, reason=reason)
        self.suspended[partition] = reason
        self.close(partition)

    def close(self, partition: int) -> None:
        found = self._files.pop(partition, None)
        if found is not None:
            found.close()

    def close_all(self) -> None:
        for partition in list(self._files):
            self.close(partition)


def now_ms() -> int:
    return int(time.time() * 1000)
