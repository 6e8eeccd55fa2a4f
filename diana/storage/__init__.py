"""Object storage behind one interface: the local filesystem (the default) or S3-compatible storage.

``open_store(config, "archive")`` gives the store the configuration names for an area (the
archive, the quarantine, the landing store); callers use only the :class:`ObjectStore` protocol (base.py).
"""

from __future__ import annotations

from typing import Literal

from diana.config import Config
from diana.storage.base import (
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageRefused,
    check_key,
    error_kind,
    store_wide,
)
from diana.storage.filesystem import FilesystemStore
from diana.storage.local_files import local_file
from diana.storage.s3 import S3Store
from diana.storage.uri import StorageURI, key_in_store, parse_uri

__all__ = [
    "ObjectStore",
    "ObjectNotFound",
    "ObjectChanged",
    "IntegrityError",
    "StorageError",
    "StorageRefused",
    "FilesystemStore",
    "S3Store",
    "check_key",
    "store_wide",
    "error_kind",
    "local_file",
    "open_store",
    "AREAS",
    "StorageURI",
    "parse_uri",
    "key_in_store",
]

Area = Literal["archive", "quarantine", "landing"]
AREAS: tuple[Area, ...] = ("archive", "quarantine", "landing")
_FOLDERS = {"archive": "archive_dir", "quarantine": "quarantine_dir", "landing": "landing_dir"}


def open_store(config: Config, area: Area) -> ObjectStore:
    """The store of ``area``: a folder ([storage] archive_dir, quarantine_dir, landing_dir) or a prefix ``<area>/`` of the bucket."""
    storage = config.storage
    if area not in AREAS:
        raise ValueError(f"no storage area {area!r}; areas: {', '.join(AREAS)}")
    if storage.backend == "s3":
        from diana.clients import s3_client

        return S3Store(s3_client(storage), storage.s3_bucket, f"{area}/", part_size=storage.s3_part_size_mb * 1024**2)
    return FilesystemStore(config.path(getattr(storage, _FOLDERS[area])))
