"""Archive sink: moves each landed instance into the archive, verified and idempotent.

Layout: ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` in the archive store
(diana/storage: a folder, or a prefix of an S3 bucket) — built from validated UIDs only. Each put
is atomic and its SHA-256 is checked against the event before the landing copy is removed.

The landed object is read through a landing store (diana/storage): by the event's ``landing_uri``
(InstanceArrived v4), which must name an object of the configured landing store or of this host's
landing folder (a receiver that still lands locally), or, for older events, by ``landing_path``
relative to this host's landing folder (where v1 to v3 receivers landed). Landing and archive on
one S3 endpoint: a server-side copy; both folders: a hard link; else streamed through this process.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from confluent_kafka import Message
from prometheus_client import Counter

from diana.config import ConflictPolicy
from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.layout import archive_path
from diana.schemas.topics import INSTANCES
from diana.sinks.consumer import DeadLetters, Reporter, RetryableError
from diana.storage import FilesystemStore, IntegrityError, ObjectStore, check_key, key_in_store

__all__ = ["ArchiveSink", "archive_relative_path", "landing_key"]

log = structlog.get_logger("diana.sink.archive")

ARCHIVED = Counter("diana_archive_written_total", "Instances written to the archive")
UNCHANGED = Counter("diana_archive_unchanged_total", "Events whose identical object was already archived")
QUARANTINED = Counter("diana_archive_quarantined_total", "Objects moved to quarantine by the conflict policy")
CONFLICTS = Counter("diana_archive_conflicts_total", "Same SOP Instance UID arrived with different bytes", ["policy"])


def archive_relative_path(event: dict) -> str:
    """The archive path of the instance an event describes."""
    return archive_path(event["study_instance_uid"], event["series_instance_uid"], event["sop_instance_uid"])


def landing_key(stores: list[ObjectStore], event: dict) -> tuple[ObjectStore, str]:
    """The store (of ``stores``) holding the event's landed object, and its key there; ValueError when
    the event names none of theirs. ``stores[-1]`` is this host's landing folder (for events before v4)."""
    uri = event.get("landing_uri")
    if uri:
        refusals = []
        for store in stores:
            try:
                return store, key_in_store(store, uri)
            except ValueError as exc:
                refusals.append(str(exc))
        raise ValueError(refusals[0] if len(refusals) == 1 else f"{uri} is in none of this sink's landing stores")
    if event.get("landing_path"):  # InstanceArrived v1 to v3: relative to the receiver's landing folder
        return stores[-1], check_key(event["landing_path"])
    raise ValueError("the event names no landed object (neither landing_uri nor landing_path)")


class ArchiveSink:
    name = "archive"
    topics = (INSTANCES.name,)

    def __init__(
        self,
        landing: Path | ObjectStore,
        archive: Path | ObjectStore,
        codec: Codec | None = None,
        policy: str = ConflictPolicy.KEEP_FIRST,
        report: Reporter | Callable[[dict], None] | None = None,
        quarantine: Path | ObjectStore | None = None,
        local_landing: Path | None = None,
    ):
        """``landing``, ``archive`` and ``quarantine``: stores, or folders (a filesystem store each).

        ``local_landing``: this host's landing folder, when ``landing`` is not it (S3): events before
        v4, and v4 events of receivers landing locally, name objects there.

        Without ``quarantine``, a folder archive's quarantine is the folder ``<archive>-quarantine`` beside it.
        """
        if policy not in ConflictPolicy.ALL:
            raise ValueError(f"unknown conflict policy {policy!r}; use one of {', '.join(ConflictPolicy.ALL)}")
        self.landing: ObjectStore = FilesystemStore(landing) if isinstance(landing, Path) else landing
        self.landing_stores = [self.landing]
        if local_landing is not None and not isinstance(self.landing, FilesystemStore):
            self.landing_stores.append(FilesystemStore(local_landing))
        self.archive: ObjectStore = FilesystemStore(archive) if isinstance(archive, Path) else archive
        self.codec = codec or default_codec()
        self.policy = policy
        self.report = report or (lambda conflict: None)
        # Bytes the policy does not keep are moved here, never deleted.
        if quarantine is None:
            if not isinstance(self.archive, FilesystemStore):
                raise ValueError("an archive that is not a folder needs its quarantine store given")
            quarantine = self.archive.root.with_name(f"{self.archive.root.name}-quarantine")
        self.quarantine: ObjectStore = FilesystemStore(quarantine) if isinstance(quarantine, Path) else quarantine

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        for msg in batch:
            try:
                _, event = self.codec.decode(msg.value(), expect=INSTANCES.value_schema)
                self.archive_one(event)
            except (DecodeError, ValueError) as exc:
                dead.send(msg, f"archive: {exc}")
            except OSError as exc:
                # Disk full, permissions, I/O error, object store unreachable: nothing is committed; try again later.
                raise RetryableError(f"archive write failed: {exc.strerror or exc}") from exc
        if isinstance(self.report, Reporter):
            self.report.flush()  # reported before the offsets move

    def archive_one(self, event: dict) -> str:
        """Archive one event's object.

        Returns 'written', 'unchanged', 'conflict' (a first sighting, handled by the policy) or
        'superseded' (a replayed event whose conflict was already resolved).
        """
        relative = archive_relative_path(event)
        store, landing = landing_key(self.landing_stores, event)
        sha = event["sha256"]
        if not self.archive.exists(relative):
            self._place(store, landing, relative, sha)
            ARCHIVED.inc()
            return "written"
        archived_sha = self.archive.sha256(relative)
        version = f"{relative.removesuffix('.dcm')}.{sha[:12]}.dcm"
        if archived_sha == sha or (self.archive.exists(version) and self.archive.sha256(version) == sha):
            UNCHANGED.inc()
            store.delete(landing)
            return "unchanged"
        if not store.exists(landing):
            # A replay of a conflict resolved before: its bytes are gone by policy.
            return "superseded"
        CONFLICTS.labels(self.policy).inc()
        version_path = quarantine_path = None
        kept_sha = sha if self.policy == ConflictPolicy.REPLACE else archived_sha
        if self.policy == ConflictPolicy.KEEP_BOTH:
            version_path = version
        else:
            # The bytes not kept go to quarantine, named by their own hash.
            dropped_sha = archived_sha if self.policy == ConflictPolicy.REPLACE else sha
            quarantine_path = f"{relative.removesuffix('.dcm')}.{dropped_sha[:12]}.dcm"
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
            dropped_key = str(quarantine_path)
            self._quarantine_verified(
                lambda: self.quarantine.copy_from(self.archive, relative, dropped_key, archived_sha)
            )
            self._place(store, landing, relative, sha)
        elif self.policy == ConflictPolicy.KEEP_BOTH:
            self._place(store, landing, version, sha)
        else:
            dropped_key = str(quarantine_path)
            self._quarantine_verified(lambda: self.quarantine.copy_from(store, landing, dropped_key, sha))
            store.delete(landing)
        return "conflict"

    def _quarantine_verified(self, put: Callable[[], str]) -> None:
        """A verified copy in quarantine (the caller removes or replaces the original after)."""
        try:
            put()
        except IntegrityError as exc:
            raise OSError(f"quarantine copy failed verification: {exc}") from exc
        QUARANTINED.inc()

    def _place(self, store: ObjectStore, landing: str, key: str, sha: str) -> None:
        """Verified, atomic placement; the landing copy is removed only after."""
        try:
            # Two folders: a hard link (a landed object never changes); one S3 endpoint: a
            # server-side copy checked against the SHA-256 the receiver recorded; else streamed
            # and hashed on the way. Each checks the event's SHA-256.
            self.archive.copy_from(store, landing, key, sha256=sha)
        except FileNotFoundError:
            raise ValueError(f"landing object {landing} is missing and was never archived") from None
        except IntegrityError:
            raise ValueError(f"landing object {landing} does not match the event's sha256") from None
        store.delete(landing)
