"""Data sets received straight to a file as their fragments arrive, safe on a full disk.

pynetdicom can write a C-STORE data set to a temporary file fragment by fragment instead of holding
it in memory (``STORE_RECV_CHUNKED_DATASET``); ``install_spill_to_file`` turns that on and puts
``SpillFile`` in place of the temporary file class it uses. Both are process-wide changes to
pynetdicom, so the receiver makes them when it starts, never as a side effect of an import.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from pynetdicom import _config
from pynetdicom import dimse_messages as _dimse_messages

__all__ = ["SpillFile", "install_spill_to_file"]

log = structlog.get_logger("diana.receiver")


class SpillFile:
    """pynetdicom's temporary file for a data set being received, made safe on a full disk.

    pynetdicom writes fragments straight from its state machine: an OSError there (ENOSPC) killed
    the association's reactor thread, the sender waited for a timeout, the half-written file stayed
    and the thread leaked. Here a failed write removes the file and swallows the rest of the
    transfer; the C-STORE then answers 0xA700 (out of resources), and the sender retries later.

    The SHA-256 and size are computed as the fragments arrive (``digest``): the landing store names
    the object by its hash without reading the file back.
    """

    failed: set[str] = set()
    _lock = threading.Lock()

    def __init__(self, **kwargs):
        self._file = tempfile.NamedTemporaryFile(**kwargs)
        # The buffered file itself: NamedTemporaryFile's attribute proxy cost a function call per
        # write and flush (2.5 % of the receiver's CPU in the profile, docs/PERFORMANCE.md).
        self._raw = self._file.file
        self.name = self._file.name
        self.is_failed = False
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def file(self) -> SpillFile:  # pynetdicom calls .file.flush()
        return self

    def _fail(self, exc: OSError) -> None:
        self.is_failed = True
        with self._lock:
            self.failed.add(self.name)
        try:
            self._file.close()
        except OSError:
            pass
        Path(self.name).unlink(missing_ok=True)
        log.error("store.spill_failed", detail=exc.strerror)

    def write(self, data: bytes) -> int:
        if not self.is_failed:
            try:
                written = self._raw.write(data)
            except OSError as exc:
                self._fail(exc)
            else:
                self._hash.update(data)
                self._size += len(data)
                return written
        return len(data)

    def hand_over(self) -> None:
        """Flush every byte received so far to the kernel: from now on a reader that opens the file
        by its name sees them all (``sync`` may then run in another thread while it reads).

        Raises OSError when the write failed or fails now (the caller answers 'out of resources').
        """
        self._guarded(self._raw.flush)

    def sync(self) -> tuple[str, int]:
        """Make every byte received so far durable (flush + fsync); return its (SHA-256 hex, size).

        Raises OSError when the write failed or fails now (the caller answers 'out of resources').
        """
        self._guarded(self._raw.flush, lambda: os.fsync(self._raw.fileno()))
        return self._hash.hexdigest(), self._size

    def _guarded(self, *steps: Callable[[], object]) -> None:
        if self.is_failed:
            raise OSError(f"{self.name}: writing the received data set failed")
        try:
            for step in steps:
                step()
        except OSError as exc:
            self._fail(exc)
            self.take_failure(self.name)  # answered right here (OSError), not looked up later
            raise

    def flush(self) -> None:
        """pynetdicom flushes after every fragment; nothing reads the file before the handler,
        which calls ``hand_over``. A write error still surfaces: at the next write, or in ``sync``."""

    def close(self) -> None:
        if not self.is_failed:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    @classmethod
    def take_failure(cls, path: object) -> bool:
        with cls._lock:
            if str(path) in cls.failed:
                cls.failed.discard(str(path))
                return True
        return False


def install_spill_to_file() -> None:
    """Receive data sets to files (``SpillFile``) instead of memory, for every association of this process."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    # A class where pynetdicom has a function: it only ever calls it with NamedTemporaryFile's arguments.
    _dimse_messages.NamedTemporaryFile = SpillFile  # type: ignore[assignment]
