"""The compact digest of a completed series' instances: what a late or re-sent instance needs.

While a series is open, the aggregates worker keeps one ``seen`` entry per SOP Instance UID (the
UID as a key, its offset, a SHA-256 prefix and its size): about 400 bytes of memory each. Once the
series is complete, those entries are folded into this digest, 20 bytes per instance, and deleted:

- an 8-byte BLAKE2b hash of the SOP Instance UID, so a re-sent instance is recognised and counted
  once. Exactness: a genuinely new (late) instance is taken for a re-send of one of the series'
  n instances, and so not counted, only if its hash equals one of theirs: probability n / 2**64
  per late instance (5.4e-16 for a series of 10,000 instances). A re-send is always recognised.
- the first 4 bytes of the instance's SHA-256 and its size (8 bytes), so that under
  ``archive_conflict_policy = "REPLACE"`` a corrected re-send (other bytes) still swaps its size
  into the aggregates. A corrected copy whose SHA-256 shares the first 4 bytes (2**-32) is taken
  for an identical re-send and changes nothing.

Entries are kept sorted by hash, packed, and stored as base64 text (the changelog's values are
JSON): 27 characters per instance. Lookup is a binary search over the packed bytes.

A digest of more than ``PART_ENTRIES`` instances is stored in parts (``digest_split``), each a
digest of consecutive hashes, with an index of where each part starts (``digest_part``): no
state record grows with the series (a single one of 37,000 instances passed librdkafka's
1,000,000 bytes). series_digest.py keeps them in the state.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import struct
from collections.abc import Iterable

__all__ = [
    "ENTRY_BYTES",
    "PART_ENTRIES",
    "digest_build",
    "digest_count",
    "digest_join",
    "digest_lookup",
    "digest_part",
    "digest_replace",
    "digest_split",
    "uid_hash",
]

_ENTRY = struct.Struct(">Q4sQ")  # uid hash, sha256 prefix, size
ENTRY_BYTES = _ENTRY.size
# Instances per stored part of a digest: 218,456 characters of base64, a fifth of librdkafka's
# default record limit, and a small read when a late instance looks its UID up.
PART_ENTRIES = 8192


def uid_hash(uid: str) -> int:
    """The 64-bit hash a digest keeps of a SOP Instance UID."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big")


def _sha_prefix(sha256_hex: str) -> bytes:
    return bytes.fromhex(sha256_hex[:8].ljust(8, "0"))


def _unpack(digest: str | None) -> dict[int, tuple[bytes, int]]:
    if not digest:
        return {}
    raw = base64.b64decode(digest)
    return {h: (sha, size) for h, sha, size in _ENTRY.iter_unpack(raw)}


def _pack(entries: dict[int, tuple[bytes, int]]) -> str:
    raw = b"".join(_ENTRY.pack(h, sha, size) for h, (sha, size) in sorted(entries.items()))
    return base64.b64encode(raw).decode("ascii")


def digest_build(instances: Iterable[tuple[str, str, int]], existing: str | None = None) -> str:
    """A digest of ``existing`` plus ``instances`` (SOP Instance UID, SHA-256 hex or a prefix of it, size)."""
    entries = _unpack(existing)
    for uid, sha256_hex, size in instances:
        entries[uid_hash(uid)] = (_sha_prefix(sha256_hex), size)
    return _pack(entries)


def digest_lookup(digest: str | None, uid: str) -> tuple[str, int] | None:
    """(SHA-256 prefix as 8 hex digits, size) of ``uid`` if the digest holds it, else None."""
    if not digest:
        return None
    raw = base64.b64decode(digest)
    wanted = uid_hash(uid)
    low, high = 0, len(raw) // ENTRY_BYTES
    while low < high:
        middle = (low + high) // 2
        h, sha, size = _ENTRY.unpack_from(raw, middle * ENTRY_BYTES)
        if h == wanted:
            return sha.hex(), size
        if h < wanted:
            low = middle + 1
        else:
            high = middle
    return None


def digest_replace(digest: str, uid: str, sha256_hex: str, size: int) -> str:
    """The digest with ``uid``'s SHA-256 prefix and size replaced (a corrected re-send under REPLACE)."""
    return digest_build([(uid, sha256_hex, size)], digest)


def digest_count(digest: str | None) -> int:
    """How many instances the digest holds."""
    return len(base64.b64decode(digest)) // ENTRY_BYTES if digest else 0


def digest_split(digest: str) -> tuple[str | dict, list[str]]:
    """How a digest is stored: (itself, []) up to ``PART_ENTRIES`` instances, else (an index, its parts).

    Each part is the digest of ``PART_ENTRIES`` consecutive hashes (the last one fewer); the index
    is ``{"parts": n, "from": [...]}``, the first hash of parts 1 to n-1 as 16 hex digits.
    """
    raw = base64.b64decode(digest) if digest else b""
    step = PART_ENTRIES * ENTRY_BYTES
    if len(raw) <= step:
        return digest, []
    chunks = [raw[at : at + step] for at in range(0, len(raw), step)]
    index = {"parts": len(chunks), "from": [chunk[:8].hex() for chunk in chunks[1:]]}
    return index, [base64.b64encode(chunk).decode("ascii") for chunk in chunks]


def digest_part(index: dict, uid: str) -> int:
    """The part of a split digest (``digest_split``) that holds ``uid`` if any does."""
    return bisect.bisect_right(index["from"], f"{uid_hash(uid):016x}")


def digest_join(parts: Iterable[str | None]) -> str:
    """One digest of a split digest's parts (in order)."""
    return base64.b64encode(b"".join(base64.b64decode(part) for part in parts if part)).decode("ascii")
