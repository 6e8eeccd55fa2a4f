"""The local-filesystem object store: a folder, each key a file under it (today's archive layout).

Writes go through diana/durable.py (temp file, fsync, rename, fsync of the folder), so a crash
leaves the whole object or none. Two writers of one key each rename their own complete temp file
over it: the last rename wins, whole. So every object of a store was fsync'd before its name
appeared (the landing store's writers, producers/landing.py, keep the same rule), and a hard link
from one store to another needs no fsync of its source (``copy_from``). Files put into a store's
folder by other means (a copy by hand) break that rule.

Reads, writes and deletes (``entry_path``) resolve an object's folder once and remember it: resolving
every key (``realpath``: one ``lstat`` per path component, and pathlib around it) was a quarter of
the CPU of a WADO-RS series retrieval (docs/PERFORMANCE.md, issue 17), and of the archive sink's
(issue 19). The object's own name is never resolved: it is opened without following a symlink, and
renamed over or unlinked as itself, so nothing outside the folder is read or written through a key.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from diana.durable import (
    DigestMismatch,
    contained_path,
    place_file,
    sha256_file,
    write_stream_atomic,
)
from diana.storage.base import IntegrityError, ObjectNotFound, ObjectStore, StorageError, check_key

__all__ = ["FilesystemStore"]

# Resolved folders remembered (a study's series folders; forgotten all at once past this).
_FOLDERS = 4096


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


class FilesystemStore:
    def __init__(self, root: Path):
        # Created by the first put (durable.py makes each folder it needs), not by a reader.
        self.root = Path(root).resolve()
        self._folders: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds ``key`` (for callers that can use a local file directly)."""
        return contained_path(self.root, check_key(key))

    def entry_path(self, key: str) -> str:
        """The file that holds ``key``: its folder resolved (and checked to be under the root) once, then
        remembered; the name itself is not resolved (``open`` refuses a symlink there, a rename or an
        unlink acts on the name)."""
        folder, _, name = check_key(key).rpartition("/")
        parent = self._folders.get(folder)
        if parent is None:
            parent = str(contained_path(self.root, folder)) if folder else str(self.root)
            if len(self._folders) >= _FOLDERS:
                self._folders.clear()
            self._folders[folder] = parent
        return os.path.join(parent, name)

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def put_file(
        self, key: str, source: Path, sha256: str | None = None, link: bool = False, synced: bool = False
    ) -> str:
        """``synced``: ``source`` is durable already (fsync'd), so a hard link to it needs no fsync of it."""
        target = Path(self.entry_path(key))
        if sha256 is not None:
            actual = sha256_file(source)[0]
            if actual != sha256:
                raise IntegrityError(f"{source} does not have the expected SHA-256; not stored under {key}")
        linked = place_file(source, target, link=link, synced=synced)
        if linked and sha256 is not None:
            return sha256  # the very inode we just hashed
        stored = sha256_file(target)[0]
        if sha256 is not None and stored != sha256:
            # The source was right and the copy is not: the storage failed; the caller retries.
            target.unlink(missing_ok=True)
            raise StorageError(f"the copy stored under {key} failed verification and was removed")
        return stored

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> str:
        try:
            return write_stream_atomic(Path(self.entry_path(key)), stream, expected_sha256=sha256)[0]
        except DigestMismatch:
            raise IntegrityError(f"the bytes sent for {key} do not have the expected SHA-256; not stored") from None

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        try:
            fd = os.open(self.entry_path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None
        return os.fdopen(fd, "rb")

    def open_seekable(self, key: str) -> AbstractContextManager[BinaryIO]:
        """The object's file, open ('rb'): a new version renamed over the key meanwhile leaves this one
        readable through it. Opened by its path, not from a descriptor as ``open`` is: pydicom reads a
        value it deferred from a buffered file by opening the file's name again (of a descriptor it
        cannot; so that read, unlike the others, is of the version there then). Anything but a regular
        file there (a symlink, a folder: ``exists`` is False) is ObjectNotFound."""
        try:
            return open(self.entry_path(key), "rb", opener=_no_follow)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
                raise ObjectNotFound(f"no object {key}") from None
            raise

    def exists(self, key: str) -> bool:
        """True when ``key`` is a regular file that ``open`` would read (a symlink is not)."""
        try:
            return stat.S_ISREG(os.lstat(self.entry_path(key)).st_mode)
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None

    def modified(self, key: str) -> float:
        try:
            return self.path(key).stat().st_mtime
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None

    def sha256(self, key: str) -> str:
        try:
            return sha256_file(self.path(key))[0]
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        start = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not start.is_dir():
            return
        for folder, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith("."):  # temp files of writes in progress
                    continue
                yield Path(folder, name).relative_to(self.root).as_posix()

    def copy(self, source_key: str, target_key: str, sha256: str | None = None) -> str:
        return self.copy_from(self, source_key, target_key, sha256)

    def copy_from(self, other: ObjectStore, source_key: str, target_key: str, sha256: str | None = None) -> str:
        if isinstance(other, FilesystemStore):
            if not other.exists(source_key):  # a regular file: a symlink there is not followed
                raise ObjectNotFound(f"no object {source_key}")
            # Stored objects are never changed in place (every write renames a new file over the
            # key), so a hard link is a faithful copy; and every put fsync'd its object before it
            # returned, so the source is durable already.
            return self.put_file(target_key, Path(other.entry_path(source_key)), sha256, link=True, synced=True)
        with other.open(source_key) as stream:
            return self.put_stream(target_key, stream, sha256)

    def delete(self, key: str) -> None:
        Path(self.entry_path(key)).unlink(missing_ok=True)
