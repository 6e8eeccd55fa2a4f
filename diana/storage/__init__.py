"""Object storage behind one interface: the local filesystem (the default) or S3-compatible storage.

``open_store(config, "archive")`` gives the store the configuration names for an area (the
archive, the quarantine); callers use only the :class:`ObjectStore` protocol (base.py).
"""

from __future__ import annotations

from typing import Literal

from diana.config import Config
from diana.storage.base import IntegrityError, ObjectNotFound, ObjectStore, StorageError, check_key
from diana.storage.filesystem import FilesystemStore
from diana.storage.local_files import local_file
from diana.storage.s3 import S3Store

__all__ = [
    "ObjectStore",
    "ObjectNotFound",
    "IntegrityError",
    "StorageError",
    "FilesystemStore",
    "S3Store",
    "check_key",
    "local_file",
    "open_store",
    "AREAS",
]

Area = Literal["archive", "quarantine"]
AREAS: tuple[Area, ...] = ("archive", "quarantine")


def open_store(config: Config, area: Area) -> ObjectStore:
    """The store of ``area``: a folder ([storage] archive_dir, quarantine_dir) or a prefix ``<area>/`` of the bucket."""
    storage = config.storage
    if area not in AREAS:
        raise ValueError(f"no storage area {area!r}; areas: {', '.join(AREAS)}")
    if storage.backend == "s3":
        from diana.clients import s3_client

        return S3Store(s3_client(storage), storage.s3_bucket, f"{area}/", part_size=storage.s3_part_size_mb * 1024**2)
    folder = storage.archive_dir if area == "archive" else storage.quarantine_dir
    return FilesystemStore(config.path(folder))
