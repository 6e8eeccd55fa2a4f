"""Archive sink: moves each landed instance into the archive, verified and idempotent.

Layout: ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` in the archive store
(diana/storage: a folder, or a prefix of an S3 bucket) — built from validated UIDs only. Each put
is atomic and its SHA-256 is checked against the event before the landing copy is removed.

The landed object is read through a landing store (diana/storage): by the event's ``landing_uri``
(InstanceArrived v4), which must name an object of the configured landing store or of this host's
landing folder (a receiver that still lands locally), or, for older events, by ``landing_path``
relative to this host's landing folder (where v1 to v3 receivers landed). Landing and archive on
one S3 endpoint: a server-side copy; both folders: a hard link; else streamed through this process.

Failures (``ArchiveSink.write``): the store's own trouble (unreachable, 5xx, timeouts, a full disk or
quota) is retried for as long as it lasts. One instance's trouble is not allowed to hold its partition: a
landing copy that cannot be read (the store refuses it, a permission, an I/O error, a symlink) is
dead-lettered at once; any other error (e.g. the archive refusing the write) is retried, and the
instance is dead-lettered after ``max_tries`` tries or ``max_retry_s`` seconds. Giving up needs evidence
that the store works: after ten instances given up with none archived since, giving up is paused (the store
likely refuses as a whole): a failing instance is retried for ``max_retry_s`` seconds, then given up (a
half-open step: one at a time, so a stall lasts at most ``max_retry_s`` per broken instance), until one is
archived. A dead-lettered instance's landing copy is kept (it is removed only after a verified placement).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from confluent_kafka import Message
from prometheus_client import Counter, Gauge

from diana.config import ConflictPolicy
from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.layout import archive_path
from diana.schemas.topics import INSTANCES
from diana.sinks.consumer import DeadLetters, Reporter, RetryableError
from diana.storage import (
    FilesystemStore,
    IntegrityError,
    ObjectStore,
    check_key,
    error_kind,
    key_in_store,
    store_wide,
)

__all__ = ["ArchiveSink", "archive_relative_path", "landing_key", "sweep_stale_uploads"]

log = structlog.get_logger("diana.sink.archive")

ARCHIVED = Counter("diana_archive_written_total", "Instances written to the archive")
UNCHANGED = Counter("diana_archive_unchanged_total", "Events whose identical object was already archived")
QUARANTINED = Counter("diana_archive_quarantined_total", "Objects moved to quarantine by the conflict policy")
CONFLICTS = Counter("diana_archive_conflicts_total", "Same SOP Instance UID arrived with different bytes", ["policy"])
GIVEN_UP = Counter(
    "diana_archive_given_up_total",
    "Instances the archive sink dead-lettered for an error of their own (landing copy kept), by cause",
    ["cause"],
)
GIVING_UP_PAUSED = Gauge(
    "diana_archive_giving_up_paused",
    "1 while the archive sink's giving up is paused: ten instances were given up with none archived since (the "
    "store likely refuses as a whole); each failing instance is retried for archive_object_max_retry_s, then "
    "given up, until one is archived",
)

# Instances given up on (either cause) with none archived since: then the store as a whole likely refuses
# (a folder's permission, a bucket policy, credentials without access), not each object, and giving up is
# paused: a failing instance is retried for max_retry_s (its tries not counted, its landing copy not read),
# then given up (half-open: the batch goes on to the next), until one is archived.
_GIVE_UPS_IN_A_ROW = 10
# A failing instance not tried again for this long (its partition moved) is forgotten.
_FORGET_AFTER_S = 900.0


def _describe(exc: OSError) -> str:
    """An error for a dead letter or a log line: its kind, errno name and text (no file names)."""
    return f"{error_kind(exc)}: {exc.strerror or exc}"[:500]


@dataclass
class _Failing:
    """One instance's failed tries (by its message's topic, partition and offset)."""

    first: float
    last: float
    tries: int = 0
    given_up: str = ""  # the dead letter's reason once given up (the batch may be written again)
    landing_reads: bool = False  # its landing copy was read to its end once: not read again on each try
    paused_since: float | None = None  # its first failure while giving up was paused


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
        max_tries: int = 50,
        max_retry_s: float = 600.0,
    ):
        """``landing``, ``archive`` and ``quarantine``: stores, or folders (a filesystem store each).

        ``local_landing``: this host's landing folder, when ``landing`` is not it (S3): events before
        v4, and v4 events of receivers landing locally, name objects there.

        Without ``quarantine``, a folder archive's quarantine is the folder ``<archive>-quarantine`` beside it.

        ``max_tries``, ``max_retry_s`` ([sinks] archive_object_max_tries, archive_object_max_retry_s): an
        instance failing with an error that may be its own is dead-lettered after this many tries or seconds.
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
        self.max_tries, self.max_retry_s = max_tries, max_retry_s
        self._failing: dict[tuple[str, int, int], _Failing] = {}
        self._give_ups = 0  # instances given up on since one was archived (written or a conflict resolved)
        GIVING_UP_PAUSED.set(0)

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        self._forget_stale(time.monotonic())
        for msg in batch:
            failing = self._failing.get(_origin(msg))
            if failing is not None and failing.given_up:
                # Given up on in this batch, which is being written again: parked again, not tried again.
                failing.last = time.monotonic()
                dead.send(msg, failing.given_up)
                continue
            event: dict | None = None
            try:
                _, event = self.codec.decode(msg.value(), expect=INSTANCES.value_schema)
                outcome = self.archive_one(event)
            except (DecodeError, ValueError) as exc:
                dead.send(msg, f"archive: {exc}")
            except OSError as exc:
                # Raises RetryableError (nothing is committed; the batch is written again) or gives a reason to park it.
                dead.send(msg, self._given_up(msg, event, exc))
            else:
                self._failing.pop(_origin(msg), None)
                if outcome in ("written", "conflict"):
                    # A landing copy read and placed: the stores work. Not 'unchanged' (archived before: the
                    # same batch written again would otherwise reset the count each time) nor 'superseded'.
                    self._archived()
        if isinstance(self.report, Reporter):
            self.report.flush()  # reported before the offsets move

    def _given_up(self, msg: Message, event: dict | None, exc: OSError) -> str:
        """The dead letter's reason for an instance given up on, or RetryableError when it is tried again.

        The store's trouble (``store_wide``) is retried without limit. Otherwise the landing copy is read
        again (once per failing instance): when that fails too, it is this instance's (dead-lettered now);
        when it reads, the error was on the archive's side, which may be every object's (a folder's
        permission, a bucket policy): retried, and given up after ``max_tries`` tries or ``max_retry_s``
        seconds. Giving up needs evidence that the store still works: after ten give-ups with no instance
        archived since, giving up is paused until one is archived: a failing instance is then retried for
        ``max_retry_s`` seconds (tries not counted, landing copy not read) and given up after (counted; the
        batch goes on to the next instance, which waits its own ``max_retry_s``)."""
        what = _describe(exc)
        if store_wide(exc):
            raise RetryableError(f"archive write failed: {what}") from exc
        now = time.monotonic()
        origin = _origin(msg)
        failing = self._failing.get(origin)
        if self._give_ups >= _GIVE_UPS_IN_A_ROW:
            return self._given_up_while_paused(msg, origin, failing, now, what, exc)
        if failing is None or not failing.landing_reads:
            unreadable = self._landing_unreadable(event) if event is not None else None
            if unreadable is not None:
                reason = (
                    f"archive: the landing copy cannot be read ({unreadable}); it is kept, archive it again once fixed"
                )
                log.error("archive.landing_unreadable", error=unreadable, origin=_origin_text(msg))
                self._failing[origin] = _Failing(first=now, last=now, tries=1, given_up=reason)
                self._give_up("landing_unreadable")
                return reason
            if failing is None:
                failing = self._failing[origin] = _Failing(first=now, last=now)
            failing.landing_reads = event is not None
        failing.tries += 1
        failing.last = now
        elapsed = now - failing.first
        if failing.tries < self.max_tries and elapsed < self.max_retry_s:
            raise RetryableError(
                f"archive write failed: {what} (try {failing.tries} for this instance; dead-lettered after "
                f"{self.max_tries} tries or {self.max_retry_s:g} s)"
            ) from exc
        failing.given_up = (
            f"archive: gave up after {failing.tries} tries in {elapsed:.0f} s: {what}; the landing copy is kept"
        )
        log.error("archive.given_up", error=what, tries=failing.tries, seconds=round(elapsed), origin=_origin_text(msg))
        self._give_up("retries_exhausted")
        return failing.given_up

    def _given_up_while_paused(
        self, msg: Message, origin: tuple[str, int, int], failing: _Failing | None, now: float, what: str, exc: OSError
    ) -> str:
        """Giving up paused: the failing instance is retried for ``max_retry_s`` seconds from its first failure
        while paused, then given up (the half-open step: without it, the first broken instance after the ten
        held every partition of the consumer until a restart)."""
        if failing is None:
            failing = self._failing[origin] = _Failing(first=now, last=now)
        if failing.paused_since is None:
            failing.paused_since = now
        # Its limits start over once giving up resumes.
        failing.first = failing.last = now
        failing.tries = 0
        elapsed = now - failing.paused_since
        if elapsed < self.max_retry_s:
            raise RetryableError(
                f"archive write failed: {what} (giving up paused: {self._give_ups} instances given up with none "
                f"archived since; this one is dead-lettered after {self.max_retry_s:g} s unless one is archived first)"
            ) from exc
        failing.given_up = (
            f"archive: gave up after {elapsed:.0f} s while giving up was paused ({self._give_ups} given up with "
            f"none archived since): {what}; the landing copy is kept"
        )
        log.error(
            "archive.given_up_while_paused",
            error=what,
            seconds=round(elapsed),
            given_up=self._give_ups + 1,
            origin=_origin_text(msg),
        )
        self._give_up("retried_while_paused")
        return failing.given_up

    def _give_up(self, cause: str) -> None:
        GIVEN_UP.labels(cause).inc()
        self._give_ups += 1
        if self._give_ups == _GIVE_UPS_IN_A_ROW:
            GIVING_UP_PAUSED.set(1)
            log.error(
                "archive.giving_up_paused",
                given_up=self._give_ups,
                fix="the store likely refuses every object (a permission, a bucket policy, credentials): fix it; "
                "until one is archived, each failing instance is retried for archive_object_max_retry_s, then "
                "dead-lettered (archive.given_up_while_paused); a restart starts the count over",
            )

    def _archived(self) -> None:
        if self._give_ups >= _GIVE_UPS_IN_A_ROW:
            GIVING_UP_PAUSED.set(0)
            log.warning("archive.giving_up_resumed", given_up=self._give_ups)
            for failing in self._failing.values():
                failing.paused_since = None
        self._give_ups = 0

    def _landing_unreadable(self, event: dict) -> str | None:
        """Why the event's landing copy cannot be read to its end (an error that is not the store's
        trouble), or None: it reads, or is missing, or the event names none (let the caller's limit decide).
        RetryableError when the landing store is unavailable now."""
        try:
            store, key = landing_key(self.landing_stores, event)
            with store.open(key) as stream:
                while stream.read(1 << 20):
                    pass
        except (ValueError, FileNotFoundError):
            return None
        except OSError as exc:
            if store_wide(exc):
                raise RetryableError(f"landing store unavailable: {_describe(exc)}") from exc
            return _describe(exc)
        return None

    def _forget_stale(self, now: float) -> None:
        for origin in [o for o, f in self._failing.items() if now - f.last > _FORGET_AFTER_S]:
            del self._failing[origin]

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


def _origin(msg: Message) -> tuple[str, int, int]:
    return (msg.topic(), msg.partition(), msg.offset())


def _origin_text(msg: Message) -> str:
    return "/".join(map(str, _origin(msg)))


def sweep_stale_uploads(stores: list[ObjectStore]) -> int:
    """Abort the incomplete multipart uploads older than a day under each S3 store's prefix (uploads
    whose writer failed to abort them or died mid-upload: their parts are stored, billed and never seen);
    other stores have none. Run by the archive sink when it starts, on a thread of its own; a store
    that cannot be listed is logged, never fatal. Returns how many were aborted."""
    total = 0
    for store in stores:
        sweep = getattr(store, "abort_stale_uploads", None)
        if sweep is None:
            continue
        try:
            keys = sweep()
        except Exception as exc:
            log.info("archive.uploads_not_swept", store=repr(store), error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        if keys:
            log.warning("archive.stale_uploads_aborted", store=repr(store), uploads=len(keys))
        total += len(keys)
    return total
