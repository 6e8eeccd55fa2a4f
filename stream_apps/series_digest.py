"""A completed series' digest (digest.py) in the aggregates' state: one key, or an index and parts.

``digest/<series>`` holds the digest itself up to ``PART_ENTRIES`` instances (the only form
before this module, still read as it was written), or for a larger series the index of its
parts, ``digest/<series>/<n>`` (``digest_split``): no changelog record grows with the series.
A lookup reads the index and one part; an amended completion rewrites the parts and deletes those
no longer used (tombstones in the changelog, as for every deleted key). ``batch`` is a transaction's
view of the state (batch.py); series UIDs hold no ``/``, so a part's key is never a series'.
"""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import Counter

from diana.stream_apps.batch import Batch
from diana.stream_apps.digest import digest_join, digest_lookup, digest_part, digest_split

__all__ = ["DIGEST", "delete_digest", "lookup_digest", "read_digest", "write_digest"]

log = structlog.get_logger("diana.aggregate")

PARTS_MISSING = Counter(
    "diana_aggregates_digest_parts_missing_total",
    "Parts of a completed series' digest its index names but the state lacks (read as empty)",
)

DIGEST = "digest"


def _part_key(series_uid: str, n: int) -> str:
    return f"{series_uid}/{n}"


def _part_count(head: Any) -> int:
    return head["parts"] if isinstance(head, dict) else 0


def _part(batch: Batch, partition: int, series_uid: str, head: dict, n: int) -> str:
    """Part ``n`` the index names. Absent, the state is not what the changelog committed (the index and
    its parts are written in one transaction). It is read as empty, said and counted: a re-send of one
    of its instances is then counted again. Ending the worker instead (the first version) was a crash
    loop: its restart loads the same local file, whose cold namespaces are never re-read, and meets the
    same event. No UID in the log."""
    part = batch.get(partition, DIGEST, _part_key(series_uid, n))
    if part is None:
        PARTS_MISSING.inc()
        log.warning("digest.part_missing", partition=partition, part=n, parts=head["parts"])
        return ""
    return part


def lookup_digest(batch: Batch, partition: int, series_uid: str, sop_uid: str) -> tuple[str, int] | None:
    """(SHA-256 prefix, size) of ``sop_uid`` if the series' digest holds it, else None."""
    head = batch.get(partition, DIGEST, series_uid)
    if isinstance(head, dict):
        return digest_lookup(_part(batch, partition, series_uid, head, digest_part(head, sop_uid)), sop_uid)
    return digest_lookup(head, sop_uid)


def read_digest(batch: Batch, partition: int, series_uid: str) -> str | None:
    """The series' whole digest (its parts joined), None if it has none."""
    head = batch.get(partition, DIGEST, series_uid)
    if isinstance(head, dict):
        return digest_join(_part(batch, partition, series_uid, head, n) for n in range(head["parts"]))
    return head


def write_digest(batch: Batch, partition: int, series_uid: str, digest: str) -> None:
    """Store the series' digest, in parts if large; parts of the former digest beyond the new ones go."""
    before = _part_count(batch.get(partition, DIGEST, series_uid))
    head, parts = digest_split(digest)
    for n, part in enumerate(parts):
        batch.put(partition, DIGEST, _part_key(series_uid, n), part)
    for n in range(len(parts), before):
        batch.delete(partition, DIGEST, _part_key(series_uid, n))
    batch.put(partition, DIGEST, series_uid, head)


def delete_digest(batch: Batch, partition: int, series_uid: str) -> None:
    """The series' digest and its parts leave the state (the series retired)."""
    for n in range(_part_count(batch.get(partition, DIGEST, series_uid))):
        batch.delete(partition, DIGEST, _part_key(series_uid, n))
    batch.delete(partition, DIGEST, series_uid)
