"""Durable file writes shared by the landing store and the archive sink.

Every write is atomic and durable: a temp file in the target's folder, fsync, rename over the
target, fsync of the folder. A crash leaves either nothing or the whole file.

What is written here is patient data (the landing store, the archive, prepared metadata, exports, the
routing ledger), so it is private whatever the umask: files mode 600 from creation (as the receiver's
spill files, which the landing store hard-links), folders made here 700. Before, files got 0666 less
the umask (0644 in 0755 folders): readable by every local user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from diana.scratch import ScratchFile

__all__ = [
    "fsync_dir",
    "makedirs_durable",
    "write_atomic",
    "write_stream_atomic",
    "DigestMismatch",
    "place_file",
    "sha256_file",
    "copy_hashed",
    "contained_path",
]

_CHUNK = 1 << 20

# The modes of what is written here (less the umask, which can only take more away).
PRIVATE_FILE_MODE = 0o600
PRIVATE_FOLDER_MODE = 0o700


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """``mkdir -p`` whose new folders survive a crash: each one created is fsync'd in its parent. The
    folders it creates are private (700); one there already keeps its mode.

    Without it, a file fsync'd into a new <Study>/<Series>/ folder could vanish with its folder.
    """
    path = Path(path)
    if path.is_dir():
        return
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_FOLDER_MODE)
        except FileExistsError:
            continue  # made concurrently by another writer, who fsyncs its parent
        fsync_dir(folder.parent)


@contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success rename it over the target and fsync the folder."""
    makedirs_durable(target.parent)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _create_private(path: Path) -> BinaryIO:
    """A new file (refused if ``path`` exists), mode 600 from creation: no moment with the umask's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    return os.fdopen(fd, "wb")


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically and durably, readable by its owner only."""
    with _atomic(target) as tmp, _create_private(tmp) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class DigestMismatch(ValueError):
    """The bytes written do not have the SHA-256 the caller expected; the target was left as it was."""


def write_stream_atomic(target: Path, stream: BinaryIO, expected_sha256: str | None = None) -> tuple[str, int]:
    """Copy ``stream`` to ``target`` atomically and durably, in 1 MiB chunks, readable by its owner only;
    (hex SHA-256, size) of what was written.

    With ``expected_sha256``, bytes of another hash never replace the target (DigestMismatch).
    """
    h = hashlib.sha256()
    size = 0
    with _atomic(target) as tmp, _create_private(tmp) as fh:
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        if expected_sha256 is not None and h.hexdigest() != expected_sha256:
            raise DigestMismatch(f"wrote {size} bytes whose SHA-256 is not the expected one")
    return h.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def copy_hashed(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` in 1 MiB chunks, hashing what is written; (hex SHA-256, size) of those bytes.

    One read: a source that changes meanwhile cannot give a hash of other bytes than the copy's.
    """
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
        dst.write(chunk)
    return h.hexdigest(), size


def place_file(source: Path, target: Path, link: bool, synced: bool = False) -> bool:
    """Put a copy of ``source`` at ``target`` atomically and durably; never loads it whole.

    ``link``: a hard link is enough (the source is ours and never changes); falls back to a
    copy across filesystems. ``synced``: the caller has fsync'd the source already (the receiver
    does, on the file it received into). Returns True if the result shares the source's inode.

    The copy's temporary file is held locked (``scratch.ScratchFile``) until it is renamed into place: the
    receiver's sweep of temporary names beside the landed objects removed it when a receiver started
    during an import on a filesystem without hard links (exFAT, some CIFS), and the rename failed. A hard
    link is the source's inode, held by the source's writer."""
    makedirs_durable(target.parent)
    if link:
        if not synced:
            with open(source, "rb") as fh:
                os.fsync(fh.fileno())
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or no hard links: copied below
            pass
        else:
            try:
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(target.parent)
            return True
    # Private as the hard link's inode is (the receiver's spill file, an import's private copy).
    with ScratchFile(target.parent, prefix=f".{target.name}.", suffix=".tmp", permissions=PRIVATE_FILE_MODE) as copy:
        with open(source, "rb") as src, copy.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        copy.replace(target)
    fsync_dir(target.parent)
    return False


def contained_path(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that resolves outside ``root``."""
    root = root.resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise ValueError(f"path leaves its root {root}: {relative!r}")
    return path
