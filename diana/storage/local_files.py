"""A stored object as a local file, for readers that need a path (pynetdicom sends a file by path, pydicom seeks).

A filesystem store's object is its own file; any other store's is downloaded into a private temp
folder that is removed when the block ends.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diana.storage.base import ObjectNotFound, ObjectStore
from diana.storage.filesystem import FilesystemStore

__all__ = ["local_file"]


@contextmanager
def local_file(store: ObjectStore, key: str) -> Iterator[Path]:
    """The object under ``key`` as a file for the duration of the block; ObjectNotFound when there is none."""
    if isinstance(store, FilesystemStore):
        if not store.exists(key):  # a regular file (FilesystemStore.entry_path: its folder resolved once)
            raise ObjectNotFound(f"no object {key}")
        yield Path(store.entry_path(key))
        return
    with tempfile.TemporaryDirectory(prefix="diana-object-") as folder:
        path = Path(folder) / key.rsplit("/", 1)[-1]
        with store.open(key) as stream, open(path, "xb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        yield path
