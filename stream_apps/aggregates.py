"""Series and study aggregates from dicom.instances, published to dicom.series and dicom.studies.

All of a study's events arrive in one partition (the key is the StudyInstanceUID), so one
agent instance sees the whole study and the tables' changelogs stay co-partitioned.
Re-delivered events (same SOP Instance UID) are recognised by the ``instances_seen`` table
and change nothing. Times are event times (``received_at``), so a replay gives the same answer.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import faust
import structlog

from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.topics import DEADLETTER, INSTANCES, SERIES, STUDIES

__all__ = ["register_aggregates", "apply_instance"]

log = structlog.get_logger("diana.stream.aggregates")


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _union(values: list[str], value: str | None) -> list[str]:
    return values if value is None or value in values else sorted([*values, value])


def apply_instance(series: dict | None, study: dict | None, event: dict) -> tuple[dict, dict]:
    """Pure fold of one new instance into its series and study state (JSON-able dicts)."""
    at = _ms(event["received_at"])
    number = event.get("instance_number")
    if series is None:
        series = {
            "series_instance_uid": event["series_instance_uid"],
            "study_instance_uid": event["study_instance_uid"],
            "revision": 0,
            "patient_id": event.get("patient_id"),
            "modality": event.get("modality"),
            "series_number": event.get("series_number"),
            "series_description": event.get("series_description"),
            "body_part_examined": event.get("body_part_examined"),
            "station_name": event.get("station_name"),
            "manufacturer": event.get("manufacturer"),
            "instance_count": 0,
            "total_bytes": 0,
            "min_instance_number": None,
            "max_instance_number": None,
            "sop_class_uids": [],
            "transfer_syntax_uids": [],
            "first_received_at": at,
            "last_received_at": at,
        }
    series = dict(series)
    series["revision"] += 1
    series["instance_count"] += 1
    series["total_bytes"] += event["size_bytes"]
    if number is not None:
        lo, hi = series["min_instance_number"], series["max_instance_number"]
        series["min_instance_number"] = number if lo is None else min(lo, number)
        series["max_instance_number"] = number if hi is None else max(hi, number)
    series["sop_class_uids"] = _union(series["sop_class_uids"], event["sop_class_uid"])
    series["transfer_syntax_uids"] = _union(series["transfer_syntax_uids"], event["transfer_syntax_uid"])
    series["first_received_at"] = min(series["first_received_at"], at)
    series["last_received_at"] = max(series["last_received_at"], at)

    if study is None:
        study = {
            "study_instance_uid": event["study_instance_uid"],
            "revision": 0,
            "patient_id": event.get("patient_id"),
            "patient_name": event.get("patient_name"),
            "patient_birth_date": event.get("patient_birth_date"),
            "patient_sex": event.get("patient_sex"),
            "accession_number": event.get("accession_number"),
            "study_date": event.get("study_date"),
            "study_description": event.get("study_description"),
            "modalities": [],
            "series_instance_uids": [],
            "series_count": 0,
            "instance_count": 0,
            "total_bytes": 0,
            "first_received_at": at,
            "last_received_at": at,
        }
    study = dict(study)
    study["revision"] += 1
    study["instance_count"] += 1
    study["total_bytes"] += event["size_bytes"]
    study["modalities"] = _union(study["modalities"], event.get("modality"))
    study["series_instance_uids"] = _union(study["series_instance_uids"], event["series_instance_uid"])
    study["series_count"] = len(study["series_instance_uids"])
    study["first_received_at"] = min(study["first_received_at"], at)
    study["last_received_at"] = max(study["last_received_at"], at)
    return series, study


def _record(state: dict) -> dict[str, Any]:
    out = dict(state)
    out["first_received_at"] = _dt(state["first_received_at"])
    out["last_received_at"] = _dt(state["last_received_at"])
    return out


def register_aggregates(app: faust.App, codec: Codec | None = None) -> None:
    codec = codec or default_codec()
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    instances = app.topic(INSTANCES.name, **raw)
    series_out = app.topic(SERIES.name, **raw)
    studies_out = app.topic(STUDIES.name, **raw)
    deadletter = app.topic(DEADLETTER.name, **raw)

    # Keys are UIDs; values are JSON (Faust's default table serializer).
    seen = app.Table("instances-seen", default=None, key_type=str, value_type=str)
    series_table = app.Table("series", default=None, key_type=str)
    study_table = app.Table("studies", default=None, key_type=str)

    @app.agent(instances)
    async def aggregate(stream: faust.Stream) -> None:
        async for event in stream.events():
            try:
                _, record = codec.decode(event.value, expect=INSTANCES.schema)
            except DecodeError as exc:
                origin = f"{event.message.topic}/{event.message.partition}/{event.message.offset}"
                log.warning("deadletter", origin=origin, reason=str(exc))
                await deadletter.send(key=origin.encode(), value=event.value,
                                      headers={"reason": f"aggregates: {exc}".encode(), "origin": origin.encode()})
                continue
            sop = record["sop_instance_uid"]
            if seen.get(sop) is not None:
                continue  # a re-delivered or re-sent instance counts once
            series, study = apply_instance(
                series_table.get(record["series_instance_uid"]), study_table.get(record["study_instance_uid"]), record
            )
            seen[sop] = record["sha256"]
            series_table[series["series_instance_uid"]] = series
            study_table[study["study_instance_uid"]] = study
            await series_out.send(key=series["series_instance_uid"].encode(),
                                  value=codec.encode(SERIES.schema, _record(series)))
            await studies_out.send(key=study["study_instance_uid"].encode(),
                                   value=codec.encode(STUDIES.schema, _record(study)))
