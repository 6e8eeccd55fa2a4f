"""The local-filesystem object store: a folder, each key a file under it (today's archive layout).

Writes go through diana/durable.py (temp file, fsync, rename, fsync of the folder), so a crash
leaves the whole object or none. Two writers of one key each rename their own complete temp file
over it: the last rename wins, whole.
"""

from __future__ import annotations

import os
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


class FilesystemStore:
    def __init__(self, root: Path):
        # Created by the first put (durable.py makes each folder it needs), not by a reader.
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds ``key`` (for callers that can use a local file directly)."""
        return contained_path(self.root, check_key(key))

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def put_file(self, key: str, source: Path, sha256: str | None = None, link: bool = False) -> str:
        target = self.path(key)
        if sha256 is not None:
            actual = sha256_file(source)[0]
            if actual != sha256:
                raise IntegrityError(f"{source} does not have the expected SHA-256; not stored under {key}")
        linked = place_file(source, target, link=link)
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
            return write_stream_atomic(self.path(key), stream, expected_sha256=sha256)[0]
        except DigestMismatch:
            raise IntegrityError(f"the bytes sent for {key} do not have the expected SHA-256; not stored") from None

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

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
            source = other.path(source_key)
            if not source.is_file():
                raise ObjectNotFound(f"no object {source_key}")
            # Stored objects are never changed in place (every write renames a new file over the
            # key), so a hard link is a faithful copy.
            return self.put_file(target_key, source, sha256, link=True)
        with other.open(source_key) as stream:
            return self.put_stream(target_key, stream, sha256)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
