"""Storage URIs in events: which object of which store an ``InstanceArrived`` points at.

``file:///abs/path`` names a file on the host that wrote it; ``s3://bucket/key`` an object of a
bucket (the endpoint is configuration, never part of the URI, nor are credentials). A reader
accepts a URI only inside the store it was configured with (``key_in_store``): an event can never
make a sink read, archive or delete anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from diana.storage.base import ObjectStore, check_key
from diana.storage.filesystem import FilesystemStore
from diana.storage.s3 import S3Store

__all__ = ["StorageURI", "parse_uri", "key_in_store"]


@dataclass(frozen=True)
class StorageURI:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for file
    path: str  # the absolute path (file) or the object key in the bucket (s3)


def parse_uri(uri: str) -> StorageURI:
    """A ``file:///...`` or ``s3://bucket/key`` URI; ValueError naming what is wrong otherwise."""
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise ValueError(f"a storage URI has no query or fragment: {uri!r}")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"a file URI names no host (file:///path): {uri!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"a file URI holds an absolute path: {uri!r}")
        return StorageURI("file", "", path)
    if parts.scheme == "s3":
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(f"an s3 URI is s3://bucket/key (no credentials, no port): {uri!r}")
        key = unquote(parts.path).removeprefix("/")
        check_key(key)
        return StorageURI("s3", parts.netloc, key)
    raise ValueError(f"not a storage URI (file:///... or s3://bucket/key): {uri!r}")


def key_in_store(store: ObjectStore, uri: str) -> str:
    """The key under which ``store`` holds the object ``uri`` names; ValueError if it is not in that store,
    or if it names a hidden file or folder: the receiver's scratch folder ``.incoming/`` and its temporary
    ``.*.tmp`` files, which no event names (a forged one could otherwise have a sink archive, then delete,
    an object still being received)."""
    parsed = parse_uri(uri)
    key = None
    if isinstance(store, FilesystemStore) and parsed.scheme == "file":
        path = Path(parsed.path)
        if ".." not in path.parts and path.is_relative_to(store.root):
            key = check_key(path.relative_to(store.root).as_posix())
    elif isinstance(store, S3Store) and parsed.scheme == "s3":
        if parsed.bucket == store.bucket and parsed.path.startswith(store.prefix):
            key = check_key(parsed.path[len(store.prefix) :])
    if key is None:
        raise ValueError(
            f"{uri} is not in this landing store ({store!r}): written by a host with another landing store?"
        )
    if any(part.startswith(".") for part in key.split("/")):
        raise ValueError(f"{uri} names a hidden file of the landing store (its scratch space), not a landed object")
    return key
