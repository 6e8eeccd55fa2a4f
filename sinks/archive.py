"""Archive sink: moves each landed instance into the archive, verified and idempotent.

Layout: ``<archive>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` — built
from validated UIDs only. The copy is atomic (temp file, fsync, rename, fsync of the folder)
and its SHA-256 is checked against the event before the landing copy is removed.
"""
from __future__ import annotations

from pathlib import Path

import structlog
from confluent_kafka import Message
from prometheus_client import Counter

from diana.durable import contained_path, place_file, sha256_file
from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.topics import INSTANCES
from diana.schemas.uid import is_valid_uid
from diana.sinks.consumer import DeadLetters, RetryableError

__all__ = ["ArchiveSink", "archive_relative_path"]

log = structlog.get_logger("diana.sink.archive")

ARCHIVED = Counter("diana_archive_written_total", "Instances written to the archive")
UNCHANGED = Counter("diana_archive_unchanged_total", "Events whose identical object was already archived")
CONFLICTS = Counter("diana_archive_conflicts_total", "Same SOP Instance UID arrived with different bytes")


def archive_relative_path(event: dict) -> str:
    uids = (event["study_instance_uid"], event["series_instance_uid"], event["sop_instance_uid"])
    if not all(is_valid_uid(u) for u in uids):
        raise ValueError("event carries an invalid UID")
    return "{}/{}/{}.dcm".format(*uids)


class ArchiveSink:
    name = "archive"
    topics = (INSTANCES.name,)

    def __init__(self, landing_root: Path, archive_root: Path, codec: Codec | None = None):
        self.landing_root = Path(landing_root).resolve()
        self.archive_root = Path(archive_root).resolve()
        self.archive_root.mkdir(parents=True, exist_ok=True)
        self.codec = codec or default_codec()

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        for msg in batch:
            try:
                _, event = self.codec.decode(msg.value(), expect=INSTANCES.schema)
                self.archive_one(event)
            except (DecodeError, ValueError) as exc:
                dead.send(msg, f"archive: {exc}")
            except OSError as exc:
                # Disk full, permissions, I/O error: nothing is committed; try again later.
                raise RetryableError(f"archive write failed: {exc.strerror or exc}") from exc

    def archive_one(self, event: dict) -> str:
        """Archive one event's object; return 'written', 'unchanged' or 'conflict'."""
        target = contained_path(self.archive_root, archive_relative_path(event))
        landing = contained_path(self.landing_root, event["landing_path"])
        if target.exists():
            if sha256_file(target)[0] == event["sha256"]:
                UNCHANGED.inc()
                landing.unlink(missing_ok=True)
                return "unchanged"
            # Keep the first copy; the differing bytes stay in the landing store for inspection.
            CONFLICTS.inc()
            log.warning("archive.conflict", sop_instance_uid=event["sop_instance_uid"], sha256=event["sha256"],
                        kept=str(target))
            return "conflict"
        try:
            landed_sha = sha256_file(landing)[0]
        except FileNotFoundError:
            raise ValueError(f"landing object {event['landing_path']} is missing and was never archived") from None
        if landed_sha != event["sha256"]:
            raise ValueError(f"landing object {event['landing_path']} does not match the event's sha256")
        # Same filesystem: a hard link (the landing object never changes); else a streamed copy.
        linked = place_file(landing, target, link=True)
        if not linked and sha256_file(target)[0] != event["sha256"]:
            target.unlink(missing_ok=True)
            raise OSError(f"archive copy {target} failed verification")
        landing.unlink(missing_ok=True)
        ARCHIVED.inc()
        return "written"
