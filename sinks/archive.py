"""Archive sink: moves each landed instance into the archive, verified and idempotent.

Layout: ``<archive>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` — built
from validated UIDs only. The copy is atomic (temp file, fsync, rename, fsync of the folder)
and its SHA-256 is checked against the event before the landing copy is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from confluent_kafka import Message
from prometheus_client import Counter

from diana.config import ConflictPolicy
from diana.durable import contained_path, place_file, sha256_file
from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.layout import archive_path
from diana.schemas.topics import INSTANCES
from diana.sinks.consumer import DeadLetters, Reporter, RetryableError

__all__ = ["ArchiveSink", "archive_relative_path"]

log = structlog.get_logger("diana.sink.archive")

ARCHIVED = Counter("diana_archive_written_total", "Instances written to the archive")
UNCHANGED = Counter("diana_archive_unchanged_total", "Events whose identical object was already archived")
QUARANTINED = Counter("diana_archive_quarantined_total", "Objects moved to quarantine by the conflict policy")
CONFLICTS = Counter("diana_archive_conflicts_total", "Same SOP Instance UID arrived with different bytes", ["policy"])


def archive_relative_path(event: dict) -> str:
    """The archive path of the instance an event describes."""
    return archive_path(event["study_instance_uid"], event["series_instance_uid"], event["sop_instance_uid"])


class ArchiveSink:
    name = "archive"
    topics = (INSTANCES.name,)

    def __init__(
        self,
        landing_root: Path,
        archive_root: Path,
        codec: Codec | None = None,
        policy: str = ConflictPolicy.KEEP_FIRST,
        report: Reporter | Callable[[dict], None] | None = None,
        quarantine_root: Path | None = None,
    ):
        if policy not in ConflictPolicy.ALL:
            raise ValueError(f"unknown conflict policy {policy!r}; use one of {', '.join(ConflictPolicy.ALL)}")
        self.landing_root = Path(landing_root).resolve()
        self.archive_root = Path(archive_root).resolve()
        self.archive_root.mkdir(parents=True, exist_ok=True)
        self.codec = codec or default_codec()
        self.policy = policy
        self.report = report or (lambda conflict: None)
        # Bytes the policy does not keep are moved here, never deleted (default: beside the archive).
        self.quarantine_root = Path(
            quarantine_root or self.archive_root.with_name(f"{self.archive_root.name}-quarantine")
        ).resolve()
        self.quarantine_root.mkdir(parents=True, exist_ok=True)

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        for msg in batch:
            try:
                _, event = self.codec.decode(msg.value(), expect=INSTANCES.value_schema)
                self.archive_one(event)
            except (DecodeError, ValueError) as exc:
                dead.send(msg, f"archive: {exc}")
            except OSError as exc:
                # Disk full, permissions, I/O error: nothing is committed; try again later.
                raise RetryableError(f"archive write failed: {exc.strerror or exc}") from exc
        if isinstance(self.report, Reporter):
            self.report.flush()  # reported before the offsets move

    def archive_one(self, event: dict) -> str:
        """Archive one event's object.

        Returns 'written', 'unchanged', 'conflict' (a first sighting, handled by the policy) or
        'superseded' (a replayed event whose conflict was already resolved).
        """
        relative = archive_relative_path(event)
        target = contained_path(self.archive_root, relative)
        landing = contained_path(self.landing_root, event["landing_path"])
        sha = event["sha256"]
        if not target.exists():
            self._place(landing, target, sha, event)
            ARCHIVED.inc()
            return "written"
        archived_sha = sha256_file(target)[0]
        version = target.with_name(f"{target.stem}.{sha[:12]}.dcm")
        if archived_sha == sha or (version.exists() and sha256_file(version)[0] == sha):
            UNCHANGED.inc()
            landing.unlink(missing_ok=True)
            return "unchanged"
        if not landing.exists():
            # A replay of a conflict resolved before: its bytes are gone by policy.
            return "superseded"
        CONFLICTS.labels(self.policy).inc()
        version_path = quarantine_path = None
        kept_sha = sha if self.policy == ConflictPolicy.REPLACE else archived_sha
        if self.policy == ConflictPolicy.KEEP_BOTH:
            version_path = str(version.relative_to(self.archive_root))
        else:
            # The bytes not kept go to quarantine, named by their own hash.
            dropped_sha = archived_sha if self.policy == ConflictPolicy.REPLACE else sha
            quarantine_path = f"{Path(relative).with_suffix('')}.{dropped_sha[:12]}.dcm"
        log.warning(
            "archive.conflict",
            sop_instance_uid=event["sop_instance_uid"],
            policy=self.policy,
            archived_sha256=archived_sha,
            incoming_sha256=sha,
        )
        # The report is durable before anything moves: a crash after it leaves the landing copy,
        # and the replayed event finds the conflict again.
        self.report(
            {
                "sop_instance_uid": event["sop_instance_uid"],
                "study_instance_uid": event["study_instance_uid"],
                "series_instance_uid": event["series_instance_uid"],
                "archived_sha256": archived_sha,
                "incoming_sha256": sha,
                "policy": self.policy,
                "kept_path": relative,
                "version_path": version_path,
                "detected_at": datetime.now(UTC),
                "kept_sha256": kept_sha,
                "quarantine_path": quarantine_path,
            }
        )
        if isinstance(self.report, Reporter):
            self.report.flush()
        if self.policy == ConflictPolicy.REPLACE:
            self._quarantine(target, quarantine_path, archived_sha)
            self._place(landing, target, sha, event)
        elif self.policy == ConflictPolicy.KEEP_BOTH:
            self._place(landing, version, sha, event)
        else:
            self._quarantine(landing, quarantine_path, sha)
            landing.unlink()
        return "conflict"

    def _quarantine(self, source: Path, relative: str | None, sha: str) -> None:
        """A verified copy of ``source`` in the quarantine folder (the caller removes or replaces it)."""
        assert relative is not None
        target = contained_path(self.quarantine_root, relative)
        linked = place_file(source, target, link=True)
        if not linked and sha256_file(target)[0] != sha:
            target.unlink(missing_ok=True)
            raise OSError(f"quarantine copy {target} failed verification")
        QUARANTINED.inc()

    @staticmethod
    def _place(landing: Path, target: Path, sha: str, event: dict) -> None:
        """Verified, atomic placement; the landing copy is removed only after."""
        try:
            landed_sha = sha256_file(landing)[0]
        except FileNotFoundError:
            raise ValueError(f"landing object {event['landing_path']} is missing and was never archived") from None
        if landed_sha != sha:
            raise ValueError(f"landing object {event['landing_path']} does not match the event's sha256")
        # Same filesystem: a hard link (the landing object never changes); else a streamed copy.
        linked = place_file(landing, target, link=True)
        if not linked and sha256_file(target)[0] != sha:
            target.unlink(missing_ok=True)
            raise OSError(f"archive copy {target} failed verification")
        landing.unlink(missing_ok=True)
