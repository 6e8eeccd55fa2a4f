"""What every object store offers: the contract the archive (and later the landing store) writes through.

Keys are relative POSIX paths (``<Study>/<Series>/<SOP>.dcm``); a key that is empty, absolute or
has an empty, ``.`` or ``..`` segment is refused before it reaches a backend, so no key can leave
its store.

Every put is verified: the store computes the SHA-256 of what it stores while writing, and when the
caller passes the SHA-256 it expects (the event's), a source of other bytes is an
:class:`IntegrityError` (bad input: nothing is stored under the key) and a stored copy that differs
from a correct source is a :class:`StorageError` (a fault: removed, the caller retries). Every put is atomic: a reader sees the old object or the whole new
one, never a part.

Two writers putting the same key at once: the last complete put wins, whole. For a
content-addressed key (the key names the bytes' hash) both writers put the same bytes, so either
outcome is the same object and both writers may report success: puts of such keys are idempotent.
Nothing relies on conditional writes (``If-None-Match``), which S3Proxy does not enforce.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = [
    "ObjectStore",
    "ObjectNotFound",
    "ObjectChanged",
    "IntegrityError",
    "StorageError",
    "StorageRefused",
    "check_key",
    "store_wide",
    "error_kind",
]


class StorageError(OSError):
    """The store cannot be reached or refused the operation; retry later (an OSError, like a full disk)."""


class StorageRefused(StorageError):
    """The store answered, and refused this object (access denied, archived to cold storage): retrying
    changes nothing until someone acts, which a caller with a time limit gives up on."""


class ObjectChanged(StorageError):
    """The object was replaced (or deleted) while it was being read: what was read is of the old version
    and the rest of it cannot be read any more. Reading it again reads the new one."""


class ObjectNotFound(FileNotFoundError):
    """No object under this key."""


class IntegrityError(ValueError):
    """The bytes stored or read do not have the SHA-256 they should have; nothing was kept."""


def check_key(key: str) -> str:
    """``key`` if it is a relative POSIX path without empty, ``.`` or ``..`` segments, else ValueError."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in key:
        raise ValueError(f"not a valid object key: {key!r} (a relative path without '.', '..' or empty parts)")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """Objects under keys: put (verified, atomic), get as a stream, exists, list, copy, delete."""

    def uri(self, key: str) -> str:
        """Where the object lives, for people and events (``file:///...``, ``s3://bucket/...``); never credentials."""
        ...

    def put_file(self, key: str, source: Path, sha256: str | None = None, link: bool = False) -> str:
        """Store the file ``source`` under ``key``; returns its SHA-256 (checked against ``sha256`` if given).

        ``link``: the source is ours and never changes, so a filesystem store may hard-link it.
        """
        ...

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> str:
        """Store what ``stream`` yields under ``key``; returns its SHA-256 (checked against ``sha256`` if given)."""
        ...

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """The object's bytes as a readable stream; ObjectNotFound when there is none."""
        ...

    def open_seekable(self, key: str) -> AbstractContextManager[BinaryIO]:
        """The object's bytes as a read-only seekable stream of the version there when it is opened, for
        readers that seek (pydicom, a frame at its offset): only what is read is fetched. ObjectNotFound
        when there is none; ObjectChanged from a read when the store can no longer give that version."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFound when there is none."""
        ...

    def sha256(self, key: str) -> str:
        """The SHA-256 of the object's bytes as stored now (read through, not a remembered value)."""
        ...

    def modified(self, key: str) -> float:
        """When the object was last written (POSIX seconds); ObjectNotFound when there is none."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (a folder-like prefix ending in '/' or empty for all), in no set order."""
        ...

    def copy(self, source_key: str, target_key: str, sha256: str | None = None) -> str:
        """Copy within the store (server-side where the backend can); returns the SHA-256 of the copy."""
        ...

    def copy_from(self, other: ObjectStore, source_key: str, target_key: str, sha256: str | None = None) -> str:
        """Copy ``other``'s object into this store: server-side when both are the same backend, else streamed."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; no error when there is none."""
        ...


# The store's trouble, not one object's: a writer retries it for as long as it lasts.
_STORE_WIDE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",  # disk full
        "EDQUOT",  # quota
        "EROFS",  # a filesystem remounted read-only after errors
        "ENOMEM",
        "EAGAIN",
        "EINTR",
        "EBUSY",
        "EMFILE",  # this process' open files
        "ENFILE",
        "ESTALE",  # NFS
        "ETIMEDOUT",
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ENOLCK",
    )
    if hasattr(errno, name)
)


def store_wide(exc: OSError) -> bool:
    """True when ``exc`` is the store's trouble that passes (unreachable, 5xx, 408/429, timeouts, a
    full disk or quota), retried without limit; False when it may be one object's (refused by the
    store: StorageRefused; a permission, an I/O error, a missing file, anything else)."""
    if isinstance(exc, StorageRefused):
        return False
    if isinstance(exc, (StorageError, ConnectionError, TimeoutError)):
        return True
    return exc.errno in _STORE_WIDE_ERRNOS


def error_kind(exc: OSError) -> str:
    """An OSError's kind and errno name, e.g. ``PermissionError [EACCES]``: for logs and dead letters,
    without its text (which can name a file)."""
    code = errno.errorcode.get(exc.errno, "") if isinstance(exc.errno, int) else ""
    return f"{type(exc).__name__}{f' [{code}]' if code else ''}"
