"""Durable file writes shared by the landing store and the archive sink.

Every write is atomic and durable: a temp file in the target's folder, fsync, rename over the
target, fsync of the folder. A crash leaves either nothing or the whole file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic", "place_file", "sha256_file", "contained_path"]

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically and durably."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def place_file(source: Path, target: Path, link: bool) -> bool:
    """Put a copy of ``source`` at ``target`` atomically and durably; never loads it whole.

    ``link``: a hard link is enough (the source is ours and never changes); falls back to a
    copy across filesystems. Returns True if the result shares the source's inode.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    linked = False
    try:
        if link:
            with open(source, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(source, tmp)
                linked = True
            except OSError:  # another filesystem, or no hard links
                pass
        if not linked:
            with open(source, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return linked


def contained_path(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that resolves outside ``root``."""
    root = root.resolve()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise ValueError(f"path leaves its root {root}: {relative!r}")
    return path
