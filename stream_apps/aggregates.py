"""Series and study aggregates with completion, from dicom.instances to dicom.series and dicom.studies.

All of a study's events arrive in one partition (the key is the StudyInstanceUID), so one worker
sees the whole study, and its state lives in the changelog partition of that input partition.
Each batch is one Kafka transaction (transactional.py): state, outputs and input offsets move
together, so a kill -9 and restart, or two workers, give the same aggregates as one undisturbed run.

Time is event time: ``received_at``, never later than the broker's append time (event_time_ms).
Each partition keeps a watermark, the latest event time it has seen; a
series is completed when the watermark passes its last arrival plus the quiet time of its
modality. When a partition goes quiet, nothing would move its watermark, so each worker writes
a tick per partition to ``dicom.ticks`` every second, carrying the partition's end offset in
dicom.instances at that moment. A tick moves the watermark to the wall clock only if everything
before that end offset has been processed, no instance came for a while, and the tick is fresh.
Replaying old events therefore completes series exactly where a live run did (old ticks are stale),
and a worker restarting with a backlog never mistakes it for quiet.

This module is the worker: state namespaces, the handler and its wiring. The pure fold of a series
and study is aggregate_fold.py, the tick writer ticks.py, the transaction loop transactional.py.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import Message
from prometheus_client import Counter

from diana.config import KafkaConfig
from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.field_decoder import FieldDecoder
from diana.schemas.topics import DEADLETTER, INSTANCES, SERIES, STUDIES, TICKS
from diana.stream_apps.aggregate_fold import (
    apply_instance,
    compact_series,
    complete_series,
    event_time_ms,
    is_late,
    replace_instance,
    series_record,
    study_record,
)
from diana.stream_apps.completeness import QuietTimes
from diana.stream_apps.digest import digest_build, digest_replace
from diana.stream_apps.series_digest import DIGEST, delete_digest, lookup_digest, read_digest, write_digest
from diana.stream_apps.ticks import IDLE_S, STALE_TICK_S, TickWriter
from diana.stream_apps.transactional import Batch, LoopSettings, TransactionalLoop

__all__ = ["AggregatesHandler", "aggregates_loop", "changelog_topic"]

log = structlog.get_logger("diana.stream.aggregates")

# The InstanceArrived fields the fold and the handler read (aggregate_fold.py, _instance): the
# decoder builds only these (schemas/field_decoder.py) and steps over the rest (the header, paths...).
INSTANCE_FIELDS_READ = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "transfer_syntax_uid",
    "received_at",
    "size_bytes",
    "sha256",
    "modality",
    "instance_number",
    "number_of_frames",
    "images_in_acquisition",
    "number_of_temporal_positions",
    # series attributes (the first instance's; REPLACE swaps them)
    "series_number",
    "series_description",
    "body_part_examined",
    "station_name",
    "manufacturer",
    # study and patient attributes
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_date",
    "study_description",
    "referring_physician_name",
)

COMPLETED = Counter("diana_aggregates_series_completed_total", "Series completed, by verdict", ["verdict"])
DEADLETTERED = Counter("diana_aggregates_deadletters_total", "Instance events the aggregates could not decode")
RETIRED = Counter("diana_aggregates_studies_retired_total", "Studies dropped from the state after the retention")
LATE_AFTER_RETENTION = Counter(
    "diana_aggregates_late_after_retention_total", "Instances of retired series or studies, dead-lettered"
)

SERIES_IN_TWO_STUDIES = Counter(
    "diana_aggregates_series_in_two_studies_total",
    "New instances whose series is already counted under another study of the partition, dead-lettered",
)
# No UID in it: the dead letter's origin and bytes say which event it was.
SERIES_IN_TWO_STUDIES_REASON = (
    "aggregates: its SeriesInstanceUID is already counted under another StudyInstanceUID (one series "
    "in two studies); not counted, so that neither study's aggregate is corrupted"
)

# State namespaces, each a key space inside the one changelog partition of the input partition.
SEEN, SERIES_STATE, STUDY_STATE, OPEN, CLOCK = "seen", "series", "study", "open", "clock"
# Bounded state: a completed series' instances as a digest (digest.py) instead of ``seen``
# entries; when each complete study leaves the state (event time); and the markers of series and
# studies that left it, so a later instance of theirs is refused, not counted as new.
# ``digest/<series>``: the digest, or for a large series the index of its parts ``digest/<series>/<n>``
# (series_digest.py).
RETIRE, GONE_SERIES, GONE_STUDY = "retire", "gone_series", "gone_study"
DAY_MS = 86_400_000
_NEVER = 2**62  # an event time (ms) no deadline reaches
# On local disk only once the file has them, read when an event of theirs comes (state_store.py):
# the aggregates and digests, one per series and study of the archive within the retention. The
# per-instance ``seen`` entries of open series, the deadlines, the retirement schedule and the clock
# stay in memory: they are read for every instance or iterated.
COLD = frozenset({SERIES_STATE, STUDY_STATE, DIGEST, GONE_SERIES, GONE_STUDY})


class AggregatesHandler:
    """Folds dicom.instances (and the ticks) into series and study aggregates, one batch at a time.

    Runs inside a TransactionalLoop: every state change and every record it sends in a batch
    becomes visible together with the batch's input offsets, or not at all.
    """

    def __init__(
        self,
        quiet: QuietTimes,
        codec: Codec | None = None,
        conflict_policy: str = "KEEP_FIRST",
        retention_days: float = 0.0,
    ) -> None:
        self.quiet = quiet
        # [stream] state_retention_days: a complete study leaves the state this long (event time)
        # after its last completion; 0: never (its series stay compacted to digests).
        self.retention_days = retention_days
        self.retention_ms = int(retention_days * DAY_MS)
        # [sinks] archive_conflict_policy: under REPLACE a corrected re-send replaces the instance.
        self.replace = conflict_policy == "REPLACE"
        # The shared codec encodes the outputs; events are read by a decoder that builds only the
        # fields the fold reads (schemas/field_decoder.py): the full decode was a third of the
        # worker's CPU, and a fastavro projection was slower still (docs/PERFORMANCE.md, issue 20).
        self.codec = codec or default_codec()
        self.decoder = FieldDecoder(self.codec, INSTANCES.value_schema, INSTANCE_FIELDS_READ)
        self.started_ms = int(time.time() * 1000)
        self.last_instance_wall: dict[int, float] = {}
        self.processed_upto: dict[int, int] = {}  # partition -> next offset to process in dicom.instances
        # Indexes beside the state, rebuilt from the committed state whenever a partition (re)starts
        # (assignment, or the rewind after an aborted transaction), so an aborted batch leaves none
        # of its changes in them. Between rebuilds they may hold more than the state (entries of a
        # batch that failed): every use checks the state first.
        self.members: dict[int, dict[str, set[str]]] = {}  # partition -> open series -> its ``seen`` SOP UIDs
        self.retire_heap: dict[int, list[tuple[int, str]]] = {}  # partition -> (deadline, study) min-heap
        # partition -> no open series is due before this event time (a lower bound: never above the
        # earliest deadline of ``open/``), so the completion check walks the open series only when
        # one may be due, not for every instance (it walked a few hundred per instance in the soak).
        self.open_floor: dict[int, int] = {}

    def partition_started(
        self, partition: int, next_offsets: dict[str, int], state: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self.processed_upto[partition] = next_offsets.get(INSTANCES.name, self.processed_upto.get(partition, 0))
        members: dict[str, set[str]] = {}
        for sop, seen in state.get(SEEN, {}).items():
            # [offset, sha256 prefix, size, series UID]; entries written before bounded state had
            # no series UID: they stay as they are (counted right, never compacted).
            if isinstance(seen, list) and len(seen) > 3:
                members.setdefault(seen[3], set()).add(sop)
        self.members[partition] = members
        self.open_floor[partition] = min(state.get(OPEN, {}).values(), default=_NEVER)
        heap = [(deadline, study) for study, deadline in state.get(RETIRE, {}).items()]
        heapq.heapify(heap)
        self.retire_heap[partition] = heap

    def partition_stopped(self, partition: int) -> None:
        self.processed_upto.pop(partition, None)
        self.last_instance_wall.pop(partition, None)
        self.members.pop(partition, None)
        self.retire_heap.pop(partition, None)
        self.open_floor.pop(partition, None)

    def handle(self, batch: Batch, message: Message) -> None:
        try:
            if message.topic() == TICKS.name:
                self._tick(batch, message)
            else:
                self._instance(batch, message)
        except BaseException:
            # The loop undoes the message's changes (Batch.message_failed), which may put back
            # open series it had completed: walk them all at the next check.
            self.open_floor.pop(message.partition(), None)
            raise

    def _tick(self, batch: Batch, message: Message) -> None:
        partition = message.partition()
        try:
            tick = json.loads(message.value())
            tick_ms, tick_end = int(tick["t"]), int(tick["end"])
        except (ValueError, TypeError, KeyError):
            return  # not one of ours
        now = time.time()
        if now - tick_ms / 1000 > STALE_TICK_S or now - self.last_instance_wall.get(partition, 0) < IDLE_S:
            return
        if tick_ms < self.started_ms:
            # Written before this worker started (by a worker that died, say): its end offset
            # describes the log as it was then, not the backlog we have now.
            return
        if self.processed_upto.get(partition, 0) >= tick_end:  # caught up with what existed at the tick
            # The broker's stamp bounds the tick too: a worker whose clock runs fast cannot
            # complete series early with its ticks either.
            _, stamp = message.timestamp()
            at = min(tick_ms, stamp) if stamp > 0 else tick_ms
            # The watermark is written only when the tick completes something: a quiet partition
            # no longer writes a changelog record every second (its active segment never closed,
            # so compaction never ran). An unwritten tick watermark is not needed after a restart:
            # the next tick brings the clock again.
            watermark = max(batch.get(partition, CLOCK, "watermark") or 0, at)
            if self._retire_is_due(partition, watermark) or self._may_be_due(partition, watermark):
                self._complete_due(batch, partition, self._advance(batch, partition, at))

    def _instance(self, batch: Batch, message: Message) -> None:
        partition, offset = message.partition(), message.offset()
        # Processed once consumed, dead letter or not: a junk event last in its partition must
        # not keep the partition's ticks from completing its series.
        self.processed_upto[partition] = offset + 1
        try:
            record = self.decoder.decode(message.value())
        except DecodeError as exc:
            DEADLETTERED.inc()
            self._deadletter(batch, message, f"aggregates: {exc}")
            return
        self.last_instance_wall[partition] = time.time()
        # The aggregates' arrival times are event times too (apply_instance gets ``at``).
        at = event_time_ms(record["received_at"], message.timestamp())
        self._complete_due(batch, partition, self._advance(batch, partition, at))
        sop = record["sop_instance_uid"]
        seen = batch.get(partition, SEEN, sop)
        if seen is not None:
            # A re-sent instance (another delivery of the same SOP Instance UID) counts once. With
            # other bytes under REPLACE, the archive and the index now hold the newcomer: so do we.
            if self.replace and isinstance(seen, list) and seen[1] != record["sha256"][:16]:
                self._replace(batch, message, seen, record)
            return
        series_uid, study_uid = record["series_instance_uid"], record["study_instance_uid"]
        before = batch.get(partition, SERIES_STATE, series_uid)
        if before is not None:
            # A completed series keeps its instances as a digest (digest.py): a re-send of one of
            # them is recognised there and counts once too. Only a series completed once has one
            # (_compact runs at completion): an open one's is not looked for, a disk read per
            # instance with the digests on disk (state_store.py).
            known = lookup_digest(batch, partition, series_uid, sop) if is_late(before) else None
            if known is not None:
                if self.replace and known[0] != record["sha256"][:8]:
                    self._replace_compacted(batch, message, known[1], record)
                return
            if before["study_instance_uid"] != study_uid:
                # One SeriesInstanceUID under two StudyInstanceUIDs (a modality or PACS error): the
                # series state is one per series UID, so counting it would add the series to this
                # study while its completion updates the other, and this one would never complete.
                SERIES_IN_TWO_STUDIES.inc()
                self._deadletter(batch, message, SERIES_IN_TWO_STUDIES_REASON)
                return
        elif batch.get(partition, GONE_SERIES, series_uid) is not None or (
            batch.get(partition, GONE_STUDY, study_uid) is not None
            and batch.get(partition, STUDY_STATE, study_uid) is None
        ):
            # Its series or study left the state after the retention: whether this instance was
            # counted then cannot be told any more, so it is not counted again; it is refused.
            LATE_AFTER_RETENTION.inc()
            self._deadletter(
                batch,
                message,
                f"aggregates: late instance of a series or study dropped from the aggregates' state "
                f"{self.retention_days:g} days after its completion ([stream] state_retention_days); "
                "not counted, so that nothing is counted twice",
            )
            return
        # [offset, sha256 prefix, size, series]: enough to tell a corrected re-send, to swap its
        # size in, and to fold it into its series' digest when the series completes.
        batch.put(partition, SEEN, sop, [offset, record["sha256"][:16], record["size_bytes"], series_uid])
        self.members.setdefault(partition, {}).setdefault(series_uid, set()).add(sop)
        series, study = apply_instance(before, batch.get(partition, STUDY_STATE, study_uid), record, self.quiet, at)
        uid = series["series_instance_uid"]
        batch.put(partition, SERIES_STATE, uid, series)
        batch.put(partition, STUDY_STATE, study["study_instance_uid"], study)
        # Open (again, for a late instance) until quiet: a new quiet time from this arrival.
        deadline = series["last_received_at"] + int(series["quiet_seconds"] * 1000)
        batch.put(partition, OPEN, uid, deadline)
        self.open_floor[partition] = min(self.open_floor.get(partition, _NEVER), deadline)
        if not is_late(before):
            self._publish(batch, series, study)  # a late one is published with the amended version

    def _replace(self, batch: Batch, message: Message, seen: list, record: dict) -> None:
        partition = message.partition()
        series = batch.get(partition, SERIES_STATE, record["series_instance_uid"])
        study = batch.get(partition, STUDY_STATE, record["study_instance_uid"])
        # seen[3]: the series the instance was counted in (entries of older versions lack it).
        counted_in = seen[3] if len(seen) > 3 else record["series_instance_uid"]
        if (
            series is None
            or study is None
            or series["study_instance_uid"] != study["study_instance_uid"]
            or counted_in != record["series_instance_uid"]
        ):
            # The corrected copy names another series or study than the one counted (or its series
            # under another study): the archive replaced it all the same; the aggregates keep
            # counting it where it was. Swapping its size into the series it names would change a
            # series it was never counted in.
            _replaced_elsewhere(message)
            return
        series, study = replace_instance(series, study, seen[2], record)
        batch.put(
            partition,
            SEEN,
            record["sop_instance_uid"],
            [seen[0], record["sha256"][:16], record["size_bytes"], *seen[3:]],
        )
        batch.put(partition, SERIES_STATE, series["series_instance_uid"], series)
        batch.put(partition, STUDY_STATE, study["study_instance_uid"], study)
        self._publish(batch, series, study)

    def _replace_compacted(self, batch: Batch, message: Message, old_size: int, record: dict) -> None:
        """A corrected re-send (REPLACE) of an instance of a completed series, found in its digest."""
        partition = message.partition()
        uid = record["series_instance_uid"]
        series = batch.get(partition, SERIES_STATE, uid)
        study = batch.get(partition, STUDY_STATE, record["study_instance_uid"])
        if series is None or study is None or series["study_instance_uid"] != study["study_instance_uid"]:
            _replaced_elsewhere(message)
            return
        series, study = replace_instance(series, study, old_size, record)
        digest = digest_replace(
            read_digest(batch, partition, uid) or "", record["sop_instance_uid"], record["sha256"], record["size_bytes"]
        )
        write_digest(batch, partition, uid, digest)
        batch.put(partition, SERIES_STATE, uid, series)
        batch.put(partition, STUDY_STATE, study["study_instance_uid"], study)
        self._publish(batch, series, study)

    def _deadletter(self, batch: Batch, message: Message, reason: str) -> None:
        origin = f"{message.topic()}/{message.partition()}/{message.offset()}"
        log.warning("deadletter", origin=origin, reason=reason)
        batch.send_dead_letter(
            DEADLETTER.name, origin.encode(), message.value(), {"reason": reason.encode(), "origin": origin.encode()}
        )

    def _advance(self, batch: Batch, partition: int, at_ms: int) -> int:
        watermark = batch.get(partition, CLOCK, "watermark") or 0
        if at_ms > watermark:
            batch.put(partition, CLOCK, "watermark", at_ms)
            return at_ms
        return watermark

    def _complete_due(self, batch: Batch, partition: int, watermark: int) -> None:
        if not self._may_be_due(partition, watermark):
            if self._retire_is_due(partition, watermark):
                self._retire_due(batch, partition, watermark)
            return
        due: list[tuple[int, str]] = []
        floor = _NEVER
        for uid, deadline in batch.items(partition, OPEN):
            if deadline <= watermark:
                due.append((deadline, uid))
            elif deadline < floor:
                floor = deadline
        due.sort()
        self.open_floor[partition] = floor  # what stays open after the completions below
        for deadline, uid in due:
            batch.delete(partition, OPEN, uid)
            series = batch.get(partition, SERIES_STATE, uid)
            if series is None:
                continue  # cannot happen with transactional state; never worth a crash
            study = batch.get(partition, STUDY_STATE, series["study_instance_uid"])
            series, study, _ = complete_series(series, study)
            batch.put(partition, SERIES_STATE, uid, series)
            batch.put(partition, STUDY_STATE, study["study_instance_uid"], study)
            COMPLETED.labels(series["verdict"]).inc()
            log.info(
                "series.completed",
                series_instance_uid=uid,
                verdict=series["verdict"],
                instances=series["instance_count"],
            )
            self._publish(batch, series, study)
            batch.put(partition, SERIES_STATE, uid, compact_series(series))
            self._compact(batch, partition, uid)
            if self.retention_ms and study["completed_series_count"] == study["series_count"]:
                # The study is complete (again): it leaves the state a retention after this
                # completion's deadline, an event time, so a replay retires it where the live run did.
                retire_at = deadline + self.retention_ms
                batch.put(partition, RETIRE, study["study_instance_uid"], retire_at)
                heapq.heappush(self.retire_heap.setdefault(partition, []), (retire_at, study["study_instance_uid"]))
        if self._retire_is_due(partition, watermark):
            self._retire_due(batch, partition, watermark)

    def _may_be_due(self, partition: int, watermark: int) -> bool:
        """An open series may be due (not known for a partition without a floor: walk them)."""
        return watermark >= self.open_floor.get(partition, -_NEVER)

    def _compact(self, batch: Batch, partition: int, series_uid: str) -> None:
        """Fold a completed series' ``seen`` entries into its digest and delete them (tombstones in
        the changelog, so compaction removes them there too)."""
        entries = []
        for sop in self.members.get(partition, {}).pop(series_uid, ()):
            seen = batch.get(partition, SEEN, sop)
            if seen is None:
                continue
            entries.append((sop, seen[1], seen[2]))
            batch.delete(partition, SEEN, sop)
        if entries:
            write_digest(batch, partition, series_uid, digest_build(entries, read_digest(batch, partition, series_uid)))

    def _retire_is_due(self, partition: int, watermark: int) -> bool:
        heap = self.retire_heap.get(partition)
        return heap is not None and len(heap) > 0 and heap[0][0] <= watermark

    def _retire_due(self, batch: Batch, partition: int, watermark: int) -> None:
        """Drop the complete studies whose retention has passed, with their series, from the state.

        What stays of each is a marker (``gone_series``, ``gone_study``: the event time it left),
        so a later instance of it is dead-lettered instead of starting a new aggregate at revision
        1, which would overwrite the study's record on the compacted topics and which the OpenSearch
        sink's external versioning would refuse.
        """
        heap = self.retire_heap[partition]
        while heap and heap[0][0] <= watermark:
            retire_at, study_uid = heapq.heappop(heap)
            if batch.get(partition, RETIRE, study_uid) != retire_at:
                continue  # rescheduled by a later completion, or already retired
            batch.delete(partition, RETIRE, study_uid)
            study = batch.get(partition, STUDY_STATE, study_uid)
            if study is None:
                continue
            series_uids = study["series_instance_uids"]
            if any(batch.get(partition, OPEN, uid) is not None for uid in series_uids):
                continue  # a late instance reopened a series: its completion schedules the study again
            for uid in series_uids:
                self._compact(batch, partition, uid)  # leftovers of a batch that failed, if any
                batch.delete(partition, SERIES_STATE, uid)
                delete_digest(batch, partition, uid)
                batch.put(partition, GONE_SERIES, uid, retire_at)
            batch.delete(partition, STUDY_STATE, study_uid)
            batch.put(partition, GONE_STUDY, study_uid, retire_at)
            RETIRED.inc()
            log.info("study.retired", study_instance_uid=study_uid, series=len(series_uids))

    def _publish(self, batch: Batch, series: dict, study: dict) -> None:
        # The latest revision per series and study of the transaction is encoded and sent once at
        # its end: a 500-instance batch of one series sends 2 records, not 1,000. (The states are
        # replaced, never changed in place, by the folds above, so holding them is safe.)
        batch.publish_latest(SERIES.name, series["series_instance_uid"].encode(), series, self._encode_series)
        batch.publish_latest(STUDIES.name, study["study_instance_uid"].encode(), study, self._encode_study)

    def _encode_series(self, series: dict) -> bytes:
        return self.codec.encode(SERIES.value_schema, series_record(series))

    def _encode_study(self, study: dict) -> bytes:
        return self.codec.encode(STUDIES.value_schema, study_record(study))


def _replaced_elsewhere(message: Message) -> None:
    """Logged by the event's origin (topic/partition/offset), as dead letters are: never its UIDs."""
    log.warning("replace.elsewhere", origin=f"{message.topic()}/{message.partition()}/{message.offset()}")


def aggregates_loop(
    kafka: KafkaConfig,
    app_id: str,
    worker_id: str,
    partitions: int,
    quiet: QuietTimes,
    conflict_policy: str = "KEEP_FIRST",
    session_timeout_s: float = 30.0,
    retention_days: float = 0.0,
    state_dir: Path | None = None,
    transaction_max_events: int = 2000,
    transaction_max_retry_s: float = 300.0,
) -> TransactionalLoop:
    """The aggregates worker: group ``app_id``, state in ``{app_id}-state-changelog``.

    ``worker_id`` (worker_id.py) must be stable across restarts of one worker and differ between
    workers: it is the static group member id (a restart within the session timeout moves no
    partition) and the transactional id (a restart fences its dead predecessor at once).
    ``state_dir`` ([stream] state_dir) holds a folder per worker, ``<app_id>-<worker_id>``, of local
    state files (local_state.py), so a restart reads only the changelog's tail; None: none kept.
    """
    settings = LoopSettings(
        kafka=kafka,
        group_id=app_id,
        transactional_id=f"{app_id}-{worker_id}",
        group_instance_id=worker_id,
        session_timeout_ms=int(session_timeout_s * 1000),
        topics=(INSTANCES.name, TICKS.name),
        changelog=changelog_topic(app_id),
        state_dir=None if state_dir is None else state_dir / f"{app_id}-{worker_id}",
        cold_namespaces=COLD,
        max_batch=transaction_max_events,
        transaction_max_retry_s=transaction_max_retry_s,
    )
    handler = AggregatesHandler(quiet, conflict_policy=conflict_policy, retention_days=retention_days)
    return TransactionalLoop(settings, handler, every_second=TickWriter(kafka, partitions))


def changelog_topic(app_id: str) -> str:
    return f"{app_id}-state-changelog"
