"""Series and study aggregates with completion, from dicom.instances to dicom.series and dicom.studies.

All of a study's events arrive in one partition (the key is the StudyInstanceUID), so one agent
instance sees the whole study, and every table write lands in the changelog partition of the
event being processed: the tables are co-partitioned with dicom.instances.

Time is event time. Each partition keeps a watermark, the latest ``received_at`` it has seen; a
series is completed when the watermark passes its last arrival plus the quiet time of its
modality. When a partition goes quiet, nothing would move its watermark, so each worker writes
a tick per partition to ``dicom.ticks`` every second, carrying the partition's end offset in
dicom.instances at that moment. A tick moves the watermark to the wall clock only if everything
before that end offset has been processed, no instance came for a while, and the tick is fresh.
Replaying old events therefore completes series exactly where a live run did (old ticks are stale),
and a worker restarting with a backlog never mistakes it for quiet.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any

import faust
import structlog

from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.topics import DEADLETTER, INSTANCES, SERIES, STUDIES, TICKS
from diana.stream_apps.completeness import QuietTimes, expected_instances, verdict

__all__ = ["register_aggregates", "apply_instance", "complete_series", "StudyFold"]

log = structlog.get_logger("diana.stream.aggregates")

# A partition counts as quiet after this long without an instance (wall time).
IDLE_S = 2.0
# Ticks older than this are history (a replay), not a clock.
STALE_TICK_S = 5.0


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _union(values: list[str], value: str | None) -> list[str]:
    return values if value is None or value in values else sorted([*values, value])


def _new_series(event: dict, at: int, quiet_s: float) -> dict:
    return {
        "series_instance_uid": event["series_instance_uid"], "study_instance_uid": event["study_instance_uid"],
        "revision": 0, "patient_id": event.get("patient_id"), "modality": event.get("modality"),
        "series_number": event.get("series_number"), "series_description": event.get("series_description"),
        "body_part_examined": event.get("body_part_examined"), "station_name": event.get("station_name"),
        "manufacturer": event.get("manufacturer"), "instance_count": 0, "total_bytes": 0,
        "min_instance_number": None, "max_instance_number": None, "sop_class_uids": [], "transfer_syntax_uids": [],
        "first_received_at": at, "last_received_at": at, "status": "UPDATED", "version": 0, "verdict": None,
        "missing_instance_numbers": [], "expected_instances": None, "quiet_seconds": quiet_s,
        "completed_at": None, "number_of_frames": 0, "instance_numbers": [],
    }


def _new_study(event: dict, at: int) -> dict:
    return {
        "study_instance_uid": event["study_instance_uid"], "revision": 0, "patient_id": event.get("patient_id"),
        "patient_name": event.get("patient_name"), "patient_birth_date": event.get("patient_birth_date"),
        "patient_sex": event.get("patient_sex"), "accession_number": event.get("accession_number"),
        "study_date": event.get("study_date"), "study_description": event.get("study_description"),
        "modalities": [], "series_instance_uids": [], "series_count": 0, "instance_count": 0, "total_bytes": 0,
        "first_received_at": at, "last_received_at": at, "status": "UPDATED", "version": 0, "verdict": None,
        "completed_series_count": 0, "completed_at": None, "series_verdicts": {},
    }


def _judge(series: dict) -> None:
    series["verdict"], series["missing_instance_numbers"] = verdict(
        series["instance_numbers"], series["instance_count"], series["expected_instances"])


def apply_instance(series: dict | None, study: dict | None, event: dict, quiet: QuietTimes) -> tuple[dict, dict]:
    """Fold one new instance into its series and study (pure; JSON-able dicts, times in ms)."""
    at = _ms(event["received_at"])
    series = dict(series) if series else _new_series(event, at, quiet.for_modality(event.get("modality")))
    study = dict(study) if study else _new_study(event, at)
    number = event.get("instance_number")
    series["revision"] += 1
    series["instance_count"] += 1
    series["total_bytes"] += event["size_bytes"]
    series["number_of_frames"] += event.get("number_of_frames") or 1
    if number is not None:
        series["instance_numbers"] = sorted({*series["instance_numbers"], number})
        series["min_instance_number"], series["max_instance_number"] = (series["instance_numbers"][0],
                                                                       series["instance_numbers"][-1])
    promised = expected_instances(event.get("images_in_acquisition"), event.get("number_of_temporal_positions"))
    if promised is not None:
        series["expected_instances"] = max(series["expected_instances"] or 0, promised)
    series["sop_class_uids"] = _union(series["sop_class_uids"], event["sop_class_uid"])
    series["transfer_syntax_uids"] = _union(series["transfer_syntax_uids"], event["transfer_syntax_uid"])
    series["first_received_at"] = min(series["first_received_at"], at)
    series["last_received_at"] = max(series["last_received_at"], at)
    if series["status"] != "UPDATED":  # a late instance: a new version of a completed series
        series["status"] = "AMENDED"
        series["version"] += 1
        _judge(series)
        study["series_verdicts"] = {**study["series_verdicts"], series["series_instance_uid"]: series["verdict"]}

    study["revision"] += 1
    study["instance_count"] += 1
    study["total_bytes"] += event["size_bytes"]
    study["modalities"] = _union(study["modalities"], event.get("modality"))
    study["series_instance_uids"] = _union(study["series_instance_uids"], event["series_instance_uid"])
    study["series_count"] = len(study["series_instance_uids"])
    study["first_received_at"] = min(study["first_received_at"], at)
    study["last_received_at"] = max(study["last_received_at"], at)
    if study["status"] != "UPDATED":
        study["status"] = "AMENDED"
        study["version"] += 1
        _judge_study(study)
    return series, study


def _judge_study(study: dict) -> None:
    verdicts = [study["series_verdicts"].get(uid) for uid in study["series_instance_uids"]]
    study["completed_series_count"] = sum(v is not None for v in verdicts)
    if None in verdicts:
        study["verdict"] = None
    elif all(v == "COMPLETE" for v in verdicts):
        study["verdict"] = "COMPLETE"
    else:
        study["verdict"] = "GAPS" if "GAPS" in verdicts else "UNKNOWN"


def complete_series(series: dict, study: dict) -> tuple[dict, dict, bool]:
    """Mark a quiet series completed; returns (series, study, study_just_completed)."""
    series, study = dict(series), dict(study)
    series["status"], series["version"] = "COMPLETED", 1
    series["revision"] += 1
    # Completion time is the deadline itself: the same in a live run and in any replay.
    series["completed_at"] = series["last_received_at"] + int(series["quiet_seconds"] * 1000)
    _judge(series)
    study["series_verdicts"] = {**study["series_verdicts"], series["series_instance_uid"]: series["verdict"]}
    study["revision"] += 1
    _judge_study(study)
    just_completed = False
    if study["completed_series_count"] == study["series_count"]:
        if study["status"] == "UPDATED":
            study["status"], study["version"], just_completed = "COMPLETED", 1, True
            study["completed_at"] = series["completed_at"]
        else:
            study["version"] += 1
    return series, study, just_completed


def _record(state: dict, internal: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in state.items() if k not in internal}
    for key in ("first_received_at", "last_received_at", "completed_at"):
        out[key] = _dt(state.get(key))
    return out


def series_record(state: dict) -> dict[str, Any]:
    return _record(state, ("instance_numbers", "applied_offset"))


def study_record(state: dict) -> dict[str, Any]:
    return _record(state, ("series_verdicts", "applied_offset"))


class StudyFold:
    """Names the tables; kept apart so tests can read them."""

    SEEN, SERIES, STUDIES, OPEN, CLOCK = "instances-seen", "series", "studies", "open-series", "partition-clock"


def register_aggregates(app: faust.App, quiet: QuietTimes, codec: Codec | None = None) -> None:
    codec = codec or default_codec()
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(INSTANCES.name, TICKS.name, **raw)
    ticks_out = app.topic(TICKS.name, **raw)
    series_out = app.topic(SERIES.name, **raw)
    studies_out = app.topic(STUDIES.name, **raw)
    deadletter = app.topic(DEADLETTER.name, **raw)

    # Keys are UIDs (or a partition number); values JSON (Faust's default table serializer).
    seen = app.Table(StudyFold.SEEN, default=None, key_type=str, value_type=str)
    series_table = app.Table(StudyFold.SERIES, default=None, key_type=str)
    study_table = app.Table(StudyFold.STUDIES, default=None, key_type=str)
    open_series = app.Table(StudyFold.OPEN, default=None, key_type=str)
    clock = app.Table(StudyFold.CLOCK, default=None, key_type=str)
    last_instance_wall: dict[int, float] = {}
    started_ms = int(time.time() * 1000)
    processed_upto: dict[int, int] = {}  # partition -> next offset to process in dicom.instances
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    bootstrap = str(app.conf.broker[0]).removeprefix("kafka://")
    offsets_client = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{app.conf.id}-ticks", "log_level": 3})
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})

    def end_offset(partition: int) -> int:
        return offsets_client.get_watermark_offsets(TopicPartition(INSTANCES.name, partition), timeout=5)[1]

    def committed_offset(partition: int) -> int:
        request = [ConsumerGroupTopicPartitions(app.conf.id, [TopicPartition(INSTANCES.name, partition)])]
        tp = admin.list_consumer_group_offsets(request)[app.conf.id].result().topic_partitions[0]
        low = offsets_client.get_watermark_offsets(TopicPartition(INSTANCES.name, partition), timeout=5)[0]
        return max(tp.offset, low)

    async def publish(series: dict | None, study: dict) -> None:
        if series is not None:
            await series_out.send(key=series["series_instance_uid"].encode(),
                                  value=codec.encode(SERIES.schema, series_record(series)))
        await studies_out.send(key=study["study_instance_uid"].encode(),
                               value=codec.encode(STUDIES.schema, study_record(study)))

    async def complete_due(partition: int, watermark: int) -> None:
        due = sorted((entry["deadline"], uid) for uid, entry in list(open_series.items())
                     if entry and entry["p"] == partition and entry["deadline"] <= watermark)
        for _, uid in due:
            series = series_table.get(uid)
            if series is None or series["status"] != "UPDATED":
                open_series.pop(uid, None)  # completed before (the removal was lost in a crash)
                continue
            study = study_table.get(series["study_instance_uid"])
            series, study, _ = complete_series(series, study)
            series_table[uid] = series
            study_table[study["study_instance_uid"]] = study
            # Removed only once the completed state is written locally; a crash that loses the
            # completion keeps the entry, and the next watermark completes the series again.
            open_series.pop(uid, None)
            log.info("series.completed", series_instance_uid=uid, verdict=series["verdict"],
                     instances=series["instance_count"])
            await publish(series, study)

    def advance(partition: int, at_ms: int) -> int:
        key = str(partition)
        state = clock.get(key) or {"watermark": 0}
        if at_ms > state["watermark"]:
            state = {"watermark": at_ms}
            clock[key] = state
        return state["watermark"]

    @app.agent(source)
    async def aggregate(stream: faust.Stream) -> None:
        async for event in stream.events():
            message = event.message
            partition = message.partition
            if message.topic == TICKS.name:
                try:
                    tick = json.loads(event.value)
                    tick_ms, tick_end = int(tick["t"]), int(tick["end"])
                except (ValueError, TypeError, KeyError):
                    continue  # not one of ours
                now = time.time()
                if now - tick_ms / 1000 > STALE_TICK_S or now - last_instance_wall.get(partition, 0) < IDLE_S:
                    continue
                if tick_ms < started_ms:
                    # Written before this worker started (by a worker that died, say): its end
                    # offset describes the log as it was then, not the backlog we have now.
                    continue
                if partition not in processed_upto:
                    processed_upto[partition] = await asyncio.get_running_loop().run_in_executor(
                        None, committed_offset, partition)
                if processed_upto[partition] >= tick_end:  # caught up with what existed at the tick
                    await complete_due(partition, advance(partition, tick_ms))
                continue
            # Processed once consumed, dead letter or not: a junk event last in its partition must
            # not keep the partition's ticks from completing its series.
            processed_upto[partition] = message.offset + 1
            try:
                _, record = codec.decode(event.value, expect=INSTANCES.schema)
            except DecodeError as exc:
                origin = f"{message.topic}/{partition}/{message.offset}"
                log.warning("deadletter", origin=origin, reason=str(exc))
                await deadletter.send(key=origin.encode(), value=event.value,
                                      headers={"reason": f"aggregates: {exc}".encode(), "origin": origin.encode()})
                continue
            last_instance_wall[partition] = time.time()
            await complete_due(partition, advance(partition, _ms(record["received_at"])))
            offset = message.offset
            sop = record["sop_instance_uid"]
            first_seen_at = seen.get(sop)
            if first_seen_at is not None and first_seen_at != offset:
                continue  # a re-sent instance (another delivery of the same SOP Instance UID) counts once
            seen[sop] = offset
            # At-least-once delivery replays the events after the last commit, and a crash may
            # have kept some of their table writes and lost others: each aggregate remembers the
            # last offset it applied, so a replayed event changes only what it had not yet changed.
            series0 = series_table.get(record["series_instance_uid"])
            study0 = study_table.get(record["study_instance_uid"])
            series, study = apply_instance(series0, study0, record, quiet)
            if series0 is not None and series0.get("applied_offset", -1) >= offset:
                series = series0
            if study0 is not None and study0.get("applied_offset", -1) >= offset:
                study = study0
            series["applied_offset"] = max(series.get("applied_offset", -1), offset)
            study["applied_offset"] = max(study.get("applied_offset", -1), offset)
            uid = series["series_instance_uid"]
            series_table[uid] = series
            study_table[study["study_instance_uid"]] = study
            if series["status"] == "UPDATED":
                deadline = series["last_received_at"] + int(series["quiet_seconds"] * 1000)
                open_series[uid] = {"p": partition, "deadline": deadline}
            await publish(series, study)

    @app.timer(interval=1.0)
    async def tick() -> None:
        # Every partition, from every worker: a duplicate tick is harmless.
        loop = asyncio.get_running_loop()
        for partition in range(app.conf.topic_partitions):
            try:
                end = await loop.run_in_executor(None, end_offset, partition)
            except Exception as exc:  # broker unreachable: no tick, no harm
                log.warning("tick.skipped", partition=partition, reason=str(exc))
                return
            value = json.dumps({"t": int(time.time() * 1000), "end": end}).encode()
            await ticks_out.send(value=value, partition=partition)
