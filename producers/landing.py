"""The landing store: received Part-10 bytes made durable before anything is published.

Content-addressed (``ab/abcdef….dcm`` by SHA-256): identical re-sends land on the same file,
different bytes for the same SOP Instance UID never overwrite each other, and no header
value ever becomes part of a path.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from diana.durable import write_atomic

__all__ = ["LandingStore", "StoredObject"]


@dataclass(frozen=True)
class StoredObject:
    relative_path: str
    sha256: str
    size: int


class LandingStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> StoredObject:
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{digest[:2]}/{digest}.dcm"
        target = self.root / relative
        if not (target.exists() and target.stat().st_size == len(data)):
            write_atomic(target, data)
        return StoredObject(relative, digest, len(data))
