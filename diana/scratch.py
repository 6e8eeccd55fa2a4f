"""Temporary files of a live writer in the landing store's ``.incoming/``, which the receiver sweeps.

The receiver removes what a crashed writer left in ``.incoming/`` (at its start, everything; later, what is
older than an hour). A ``diana import`` running meanwhile (a store that is not shared) had its files
removed under it: the copy it was hashing, the zip member it was extracting, the file it was about to
hard-link into place. A writer now holds an exclusive advisory lock (``flock``) on each of its files for
as long as the file exists, and the sweep removes only a file whose lock it can take at once: a crashed
writer's locks went with its process, so its files are still removed as before.

``flock`` belongs to the open file description, not to the process or the name: a second ``open`` of the
same file, in the same process too, does not get it while the writer holds it, and a hard link to the file
(``durable.place_file``'s temporary name beside the landed object) is covered by the same lock.

Writers: ``diana import`` (its private copy, a zip member extracted, a bare data set wrapped, an inflated
data set), STOW-RS (the request body and its parts), ``durable.place_file``'s copy where hard links fail.
A file whose lock the sweep cannot test (a symlink, another user's file it may not open) is removed by
age alone (``remove_unless_held``'s ``untested_after_s``). In the core: producers/, access/ and durable
use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, cast

__all__ = ["ScratchFile", "remove_unless_held"]

# flock's answers on a filesystem that has no locks (NFS without its lock daemon, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class ScratchFile:
    """A new temporary file in ``folder``, locked until ``remove``: the sweep leaves it alone meanwhile.

    The lock is taken right after the file is made; a sweep that came in between (its lock first, the
    file removed) is seen by the file's link count, and the file is made again. ``permissions``: its mode
    less the umask, as ``open`` gives a new file (a file that becomes a durable one: ``replace``); by
    default 600, as ``tempfile.mkstemp``'s."""

    def __init__(self, folder: Path, prefix: str = "", suffix: str = "", permissions: int | None = None) -> None:
        while True:
            fd, name = _make(folder, prefix, suffix, permissions)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # waits at most for a sweep's unlink of this very file
                except OSError as exc:
                    if exc.errno not in _NO_LOCKS:
                        raise
                    # A filesystem without locks (NFS without lockd): written unheld, as before, rather
                    # than not at all; the sweep cannot lock there either and removes by age.
                swept = os.fstat(fd).st_nlink == 0
            except BaseException:
                os.close(fd)
                Path(name).unlink(missing_ok=True)
                raise
            if not swept:
                break
            os.close(fd)
        self.path = Path(name)
        self._fd: int | None = fd  # holds the lock: closed after the file is removed

    def open(self, mode: str = "wb") -> BinaryIO:
        """A file object on it; closing that keeps the lock (it is a duplicate of the holding descriptor)."""
        assert self._fd is not None, "removed"
        return cast(BinaryIO, os.fdopen(os.dup(self._fd), mode))

    def replace(self, target: Path) -> None:
        """Rename it over ``target`` (os.replace), then let go of its lock: it is no longer scratch."""
        assert self._fd is not None, "removed"
        os.replace(self.path, target)
        os.close(self._fd)
        self._fd = None

    def remove(self) -> None:
        """Remove the file, then let go of its lock (in this order: no sweep ever finds it unlocked)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ScratchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _make(folder: Path, prefix: str, suffix: str, permissions: int | None) -> tuple[int, str]:
    """A new file's descriptor and name, as tempfile.mkstemp makes them; with ``permissions``, its mode
    those less the umask (mkstemp's is 600)."""
    if permissions is None:
        return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(tempfile.TMP_MAX):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(name, flags, permissions), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder))


def remove_unless_held(path: Path, untested_after_s: float | None = None) -> bool:
    """Remove ``path`` unless a live writer holds its lock; True if removed.

    The lock is held while the file is removed, so a writer that made it a moment ago and waits for its
    lock finds it removed (ScratchFile makes another). A file whose lock cannot be tested (a symlink, or
    one this process may not open: a root-run import's 0600 copy seen by a receiver running as another
    user) is removed by the age rule of before, once its mtime (the link's own, for a symlink) is
    ``untested_after_s`` old, even when the sweep's own threshold is 0 (a receiver starting): unlinking
    needs only the folder's write permission, and left, a crashed root import's private copy of a
    patient's image stayed for ever. ``None``: such a file is left."""
    try:
        entry = os.lstat(path)
    except OSError:  # gone, or its folder not ours to search: nothing to remove
        return False
    if stat.S_ISLNK(entry.st_mode):  # nothing a writer makes: its target's lock is not this file's
        return _remove_if_older(path, entry, untested_after_s)
    try:
        # Opened for writing: NFS emulates flock with POSIX locks, whose exclusive lock needs it.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in _NOT_OURS_TO_OPEN:
            return _remove_if_older(path, entry, untested_after_s)
        return False  # EROFS, EIO...: unlinking would fail as well; looked at next time
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer's
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            # No locks on this filesystem: no writer holds one either; removed by age, as before.
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            return False  # replaced since it was opened: looked at next time
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


# os.open's answers for a file whose lock this process cannot test: another user's file (EACCES, EPERM
# under some LSMs and on a sealed or immutable file), a symlink swapped in after its lstat (ELOOP).
_NOT_OURS_TO_OPEN = {errno.EACCES, errno.EPERM, errno.ELOOP}


def _remove_if_older(path: Path, entry: os.stat_result, older_than_s: float | None) -> bool:
    """The age rule of before, for a file whose lock cannot be tested: removed once it is that old."""
    if older_than_s is None or entry.st_mtime > time.time() - older_than_s:
        return False
    try:
        if not os.path.samestat(entry, os.lstat(path)):
            return False  # replaced since it was looked at: looked at next time
        path.unlink()
    except FileNotFoundError:
        return False
    return True
