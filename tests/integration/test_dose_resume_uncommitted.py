"""A dose worker given partitions that hold messages its group never committed processes and commits
them (stream_apps/faust_resume.py).

The fault suite's dose-worker-kill once left a lag of 1 for minutes (docs/RELIABILITY.md, "A dose
worker's lag of 1"): one message on a ``dose.by-patient`` partition with no committed offset, handed
to a worker starting up, was never processed. Here a new dose worker group (nothing to do on
dicom.instances: its offsets are set to the end) starts on one such message per partition of
``dose.by-patient``; each must be committed.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

from diana.clients import kafka_admin, kafka_producer
from diana.config import Config
from diana.schemas.codec import default_codec
from diana.schemas.topics import DOSE_BY_PATIENT, DOSE_STUDIES, INSTANCES
from diana.stream_apps.dose.agent import _fit
from tests.integration.test_dose_redelivery import end_offsets
from tests.support.paths import port


def committed(cfg: Config, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """The group's committed offset per partition (-1001: none)."""
    admin = kafka_admin(cfg.kafka)  # held until the answer: a collected client never answers
    asked = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
    found = admin.list_consumer_group_offsets([asked])[group].result(timeout=10)
    return {tp.partition: tp.offset for tp in found.topic_partitions}


def test_a_dose_worker_processes_messages_its_group_never_committed(pipeline, tmp_path: Path):
    cfg: Config = pipeline.cfg
    run = uuid.uuid4().hex[:8]
    group = f"diana-dose-resume-{run}"

    # The new group starts at the end of dicom.instances: the session's instances are not its business.
    instances = end_offsets(cfg, INSTANCES.name)
    start = [TopicPartition(INSTANCES.name, p, offset) for p, offset in instances.items()]
    admin = kafka_admin(cfg.kafka)  # held until the answer: a collected client never answers
    answer = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, start)])
    set_at = {tp.partition: tp for tp in answer[group].result(timeout=30).topic_partitions}
    assert all(tp.error is None for tp in set_at.values()), set_at

    # One study's totals on every partition of dose.by-patient, on which the group has no offset.
    codec = default_codec()
    producer = kafka_producer(cfg.kafka)
    partitions = sorted(end_offsets(cfg, DOSE_BY_PATIENT.name))
    for p in partitions:
        study = {
            "study_instance_uid": f"2.25.{uuid.uuid4().int}",
            "patient_id": f"RESUME-{run}-{p}",
            "revision": 1,
            "received_at": datetime.now(UTC),
            "total_dlp_mGycm": 100.0,
        }
        value = codec.encode(DOSE_STUDIES.value_schema, _fit(codec, DOSE_STUDIES.value_schema, study))
        producer.produce(DOSE_BY_PATIENT.name, key=study["patient_id"].encode(), value=value, partition=p)
    assert producer.flush(30) == 0
    ends = end_offsets(cfg, DOSE_BY_PATIENT.name)
    assert committed(cfg, group, DOSE_BY_PATIENT.name, partitions) == {p: -1001 for p in partitions}

    settings = {
        "DIANA_DOSE_APP_ID": group,
        "DIANA_DOSE_WEB_PORT": str(port(16071)),
        "DIANA_STREAM_DATA_DIR": str(tmp_path / "faust"),
        "DIANA_DOSE_ALERT_RULES": "",  # no rules: the cumulative agent raises nothing on the session's topics
    }
    pipeline.start("dose-resume", "dose", settings=settings)
    try:
        deadline = time.monotonic() + 180
        while True:
            found = committed(cfg, group, DOSE_BY_PATIENT.name, partitions)
            if found == ends or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert found == ends, (
            f"dose.by-patient committed {found}, end {ends}\n" + pipeline.log_text("dose-resume")[-3000:]
        )
    finally:
        pipeline.stop("dose-resume")
