"""Unit: the aggregates worker decoding only INSTANCE_FIELDS_READ publishes exactly what it did with whole records.

The handler reads events through a FieldDecoder (schemas/field_decoder.py) that builds only the
fields listed in ``INSTANCE_FIELDS_READ``. If the fold ever read a field missing from that list, it
would silently see None; here the same events (every field set, re-sends, a corrected re-send
under REPLACE, late instances, two series) go through two handlers, one with the full codec, and
every record they write (series, studies, changelog, dead letters) must be byte for byte the same.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Message

from diana.schemas.codec import default_codec
from diana.schemas.topics import INSTANCES
from diana.stream_apps.aggregates import INSTANCE_FIELDS_READ, AggregatesHandler
from diana.stream_apps.batch import Batch, _Store
from diana.stream_apps.completeness import QuietTimes

T0 = datetime(2026, 11, 29, 5, 0, tzinfo=UTC)


class Recorder:
    """Stands in for the transactional producer: keeps what would be written, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        self.records.append((topic, key, value, partition, headers))


class WholeRecords:
    """The decoder the worker had before: every field, through the codec."""

    def decode(self, data: bytes) -> dict[str, Any]:
        return default_codec().decode(data, expect=INSTANCES.value_schema)[1]


def _event(series: int, number: int, seconds: float, sha: str = "a", **over: Any) -> dict[str, Any]:
    event = {
        "sop_instance_uid": f"1.2.9.3.{series}.{number}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.9.1",
        "series_instance_uid": f"1.2.9.2.{series}",
        "transfer_syntax_uid": "1.2.840.10008.1.2.4.90",
        "patient_id": "P-20",
        "patient_name": "Doe^Jane",
        "patient_birth_date": "19700101",
        "patient_sex": "F",
        "study_id": "S1",
        "accession_number": "ACC-20",
        "study_date": "20261129",
        "study_time": "050000",
        "study_description": "CT chest",
        "referring_physician_name": "Smith^Anna",
        "series_number": series,
        "series_description": f"series {series}",
        "series_date": "20261129",
        "modality": "CT" if series == 1 else "MR",
        "body_part_examined": "CHEST",
        "protocol_name": "proto",
        "instance_number": number,
        "station_name": "CT01",
        "manufacturer": "ACME",
        "manufacturer_model_name": "M1",
        "institution_name": "Hospital",
        "size_bytes": 1000 + number,
        "sha256": sha * 64,
        "landing_path": "aa/aaaa.dcm",
        "landing_uri": "file:///landing/aa/aaaa.dcm",
        "received_at": T0 + timedelta(seconds=seconds),
        "source": "C_STORE",
        "calling_ae": "MODALITY",
        "called_ae": "DIANA",
        "patient_age_years": 56.0,
        "patient_size_m": 1.7,
        "patient_weight_kg": 70.5,
        "number_of_frames": 2,
        "images_in_acquisition": 4,
        "number_of_temporal_positions": None,
        "header_json": '{"00100010": {"vr": "PN"}}',
        "header_omitted": [{"path": "7FE00010", "reason": "too large"}],
    }
    event.update(over)
    return event


def _run(decoder: Any) -> list[tuple[Any, ...]]:
    store, producer = _Store(), Recorder()
    handler = AggregatesHandler(QuietTimes.parse("CT=4,MR=6,*=4"), conflict_policy="REPLACE", retention_days=1)
    if decoder is not None:
        handler.decoder = decoder
    handler.partition_started(0, {INSTANCES.name: 0}, store.partitions.setdefault(0, {}))
    events = [
        _event(1, 1, 0),
        _event(1, 2, 1),
        _event(2, 1, 1.5, images_in_acquisition=None, number_of_temporal_positions=3),
        _event(1, 2, 2),  # a re-send: counted once
        _event(1, 3, 2.5, sha="b", series_description="renamed", patient_name="Doe^J"),
        # a corrected re-send (REPLACE)
        _event(1, 3, 3, sha="c", station_name="CT02", referring_physician_name="Smith^Ann"),
        _event(2, 3, 20),  # moves the watermark: series 1 completes (GAPS: 4 promised)
        _event(1, 4, 21),  # late: reopens series 1
        _event(2, 2, 40),  # completes everything
    ]
    codec = default_codec()
    for offset, event in enumerate(events):
        stamp = int(event["received_at"].timestamp() * 1000)
        value = codec.encode(INSTANCES.value_schema, event)
        batch = Batch(store, producer, "agg-state-changelog")
        handler.handle(
            batch, Message(topic=INSTANCES.name, partition=0, offset=offset, value=value, timestamp=(2, stamp))
        )
        batch.message_done()
        batch.send_latest()
        batch.write_changelog()
        batch.commit_locally()
    return producer.records


def test_the_worker_publishes_the_same_bytes_from_the_fields_it_reads_as_from_whole_records() -> None:
    projected, whole = _run(None), _run(WholeRecords())
    assert len(whole) > 20
    assert {r[0] for r in whole} >= {"dicom.series", "dicom.studies", "agg-state-changelog"}
    assert projected == whole
    assert "header_json" not in INSTANCE_FIELDS_READ  # the point: the header is stepped over
