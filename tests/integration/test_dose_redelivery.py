"""On the real broker: a dose report redelivered after a crash between the dose worker's table write
and its outputs still yields the study's record and alerts, exactly once in effect.

The crash state is made with the real worker and real Kafka operations, no mock: the OpenSearch sink
is stopped; the dose worker folds a CT dose report (its state reaches the table's changelog, its
outputs reach dose.*) and is killed (-9); the outputs are then deleted from the broker
(DeleteRecords, as if they had never been acknowledged) and the worker's committed offset is set
back to the report (as if never committed). That is the state the gap leaves behind: the changelog
holds the report, the outputs lack it, and the report is delivered again.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
from pydicom.uid import generate_uid

from diana.clients import kafka_admin, kafka_consumer
from diana.schemas.codec import default_codec
from diana.schemas.topics import DOSE_ALERTS, DOSE_BY_PATIENT, DOSE_EVENTS, DOSE_STUDIES, INSTANCES
from diana.stream_apps.dose.agent import TABLES
from tests.integration.test_dose_stack import wait_for_docs
from tests.support import dosebuilder as b
from tests.support.helpers import os_search, read_messages, storescu, wait_until_caught_up

OUTPUTS = [DOSE_EVENTS.name, DOSE_STUDIES.name, DOSE_ALERTS.name, DOSE_BY_PATIENT.name]


def end_offsets(cfg, topic: str) -> dict[int, int]:
    consumer = kafka_consumer(cfg.kafka, f"ends-{generate_uid()}")
    try:
        parts = kafka_admin(cfg.kafka).list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


def keyed(cfg, topic: str, key: bytes, since: dict[int, int] | None = None) -> list:
    return [m for m in read_messages(cfg, topic, since) if m.key() == key]


def wait_for_keyed(cfg, topic: str, key: bytes, since: dict[int, int] | None, timeout: float = 90.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = keyed(cfg, topic, key, since)
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{topic}: no record keyed {key!r} within {timeout:.0f} s")


def set_cleanup_policy(cfg, topics: list[str], policy: str) -> None:
    entry = ConfigEntry("cleanup.policy", policy, incremental_operation=AlterConfigOpType.SET)
    resources = [ConfigResource("TOPIC", t, incremental_configs=[entry]) for t in topics]
    admin = kafka_admin(cfg.kafka)  # held: a collected client destroys its handle and fails the futures
    for future in admin.incremental_alter_configs(resources).values():
        future.result(timeout=30)


def delete_outputs(cfg, ends: dict[str, dict[int, int]]) -> None:
    """DeleteRecords up to ``ends``; a compacted topic accepts it only while its policy also says delete."""
    compacted = [t for t in ends if t in (DOSE_STUDIES.name, DOSE_BY_PATIENT.name)]
    set_cleanup_policy(cfg, compacted, "compact,delete")
    try:
        deletions = [TopicPartition(t, p, end) for t, parts in ends.items() for p, end in parts.items() if end > 0]
        admin = kafka_admin(cfg.kafka)
        for future in admin.delete_records(deletions).values():
            future.result(timeout=30)
    finally:
        set_cleanup_policy(cfg, compacted, "compact")


def rewind_group(cfg, group: str, topic: str, partition: int, offset: int, timeout: float = 60.0) -> None:
    """Set the group's committed offset, and check that the broker holds it.

    The broker refuses the change while the killed member is still in the group (until its session
    expires, 10 s) with a per-partition UNKNOWN_MEMBER_ID inside a result that does not raise: an
    earlier version took that for success, so the rewind depended on the kill's timing and the
    restarted worker resumed after the report whenever Faust had committed it before the kill.
    """
    admin = kafka_admin(cfg.kafka)
    deadline = time.monotonic() + timeout
    errors: list = []
    while time.monotonic() < deadline:
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, partition, offset)])
        try:
            result = admin.alter_consumer_group_offsets([request])[group].result(timeout=10)
            errors = [tp.error for tp in result.topic_partitions if tp.error is not None]
        except KafkaException as exc:
            errors = [exc]
        if not errors and committed_offset(cfg, group, topic, partition) == offset:
            return
        time.sleep(0.5)
    raise AssertionError(f"{group}: offset {topic}/{partition} not set to {offset} within {timeout:.0f} s: {errors}")


def committed_offset(cfg, group: str, topic: str, partition: int) -> int:
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, partition)])
    admin = kafka_admin(cfg.kafka)  # held until the answer: a collected client fails its futures
    [committed] = admin.list_consumer_group_offsets([request])[group].result(timeout=10).topic_partitions
    return committed.offset


def test_a_report_redelivered_after_a_crash_between_table_write_and_outputs_is_published_once(pipeline, tmp_path):
    cfg = pipeline.cfg
    codec = default_codec()
    wait_until_caught_up(cfg)
    pipeline.stop("opensearch-sink")  # nothing of this study may reach OpenSearch before the crash
    try:
        # Ids of its own: the session's other tests (and a rerun) never share this study or patient.
        study_uid, patient_id = generate_uid(), f"REDELIVERY-{uuid.uuid4().hex[:12]}"
        rdsr = b.save(
            b.ct_report(
                [
                    b.ct_event(generate_uid(), ctdivol="0.3", dlp="10", kind=b.CONSTANT_ANGLE),
                    b.ct_event(generate_uid(), ctdivol="18.5", dlp="790"),
                ],
                total_dlp="800",
                study_uid=study_uid,
                patient_id=patient_id,
                study_date="20240501",
            ),
            tmp_path / "rdsr.dcm",
        )
        key = study_uid.encode()
        instances_before = end_offsets(cfg, INSTANCES.name)
        outputs_before = {t: end_offsets(cfg, t) for t in OUTPUTS}
        changelog = f"{cfg.dose.app_id}-{TABLES[0]}-changelog"
        changelog_before = end_offsets(cfg, changelog)
        result = storescu(cfg, [rdsr])
        assert result.returncode == 0, result.stdout + result.stderr

        # The worker's state reaches the changelog (Faust's JSON key) and its outputs reach dose.*: kill -9.
        [state_record] = wait_for_keyed(cfg, changelog, f'"{study_uid}"'.encode(), changelog_before)[-1:]
        first_alerts = wait_for_keyed(cfg, DOSE_ALERTS.name, key, outputs_before[DOSE_ALERTS.name])
        first_study = wait_for_keyed(cfg, DOSE_STUDIES.name, key, outputs_before[DOSE_STUDIES.name])
        pipeline.stop("dose", kill=True)
        first_alerts = keyed(cfg, DOSE_ALERTS.name, key, outputs_before[DOSE_ALERTS.name])
        assert len(first_study) == 1 and len(first_alerts) == 2, (len(first_study), len(first_alerts))
        [report] = [m for m in read_messages(cfg, INSTANCES.name, instances_before) if m.key() == key]

        # The outputs never reached the broker: delete them; the report's offset was never committed: rewind.
        ends = {t: end_offsets(cfg, t) for t in OUTPUTS}
        delete_outputs(cfg, ends)
        for topic in OUTPUTS:
            assert keyed(cfg, topic, key) == [], f"{topic} still holds the study's output"
        rewind_group(cfg, cfg.dose.app_id, INSTANCES.name, report.partition(), report.offset())
        assert keyed(cfg, changelog, f'"{study_uid}"'.encode()), "the changelog lost the study's state"
        assert state_record.partition() == report.partition()

        # Restart: the worker restores the table (the report already folded) and gets the report again.
        pipeline.start("dose", "dose")
        again_study = wait_for_keyed(cfg, DOSE_STUDIES.name, key, ends[DOSE_STUDIES.name])
        deadline = time.monotonic() + 60
        while len(again_alerts := keyed(cfg, DOSE_ALERTS.name, key, ends[DOSE_ALERTS.name])) < 2:
            assert time.monotonic() < deadline, f"{len(again_alerts)} alerts re-sent, expected 2"
            time.sleep(0.5)
        # The same records as the lost first sending, byte for byte: any consumer sees one record, twice at most.
        assert {m.value() for m in again_study} == {first_study[0].value()}
        assert {m.value() for m in again_alerts} == {m.value() for m in first_alerts}
        _, record = codec.decode(again_study[0].value(), expect=DOSE_STUDIES.value_schema)
        assert record["revision"] == 1 and record["total_dlp_mGycm"] == 800.0
        # Re-sent as a redelivery, not as news (other tests' kills log re-sends of their own studies).
        assert any(study_uid in line and "'again': True" in line for line in pipeline.log_text("dose").splitlines()), (
            "the dose worker logged no re-send of the study"
        )
    finally:
        if "dose" not in pipeline.procs:
            pipeline.start("dose", "dose")
        pipeline.start("opensearch-sink", "sink", "opensearch")

    by_study = {"term": {"study_instance_uid": study_uid}}
    alerts, _ = wait_for_docs(cfg, "diana-dose-alerts", by_study, 2)
    wait_until_caught_up(cfg)
    alerts = os_search(cfg, "diana-dose-alerts", by_study)
    assert sorted((a["metric"], a["value"], a["revision"]) for a in alerts) == [
        ("ctdivol_mGy", 18.5, 1),
        ("dlp_mGycm", 800.0, 1),
    ]
    [study] = os_search(cfg, "diana-dose-studies", by_study)
    assert study["revision"] == 1 and study["total_dlp_mGycm"] == 800.0 and study["events"] == 2
    assert sorted(e["ctdivol_mGy"] for e in os_search(cfg, "diana-dose-events", by_study)) == [0.3, 18.5]

    # The modality sends the report once more: the same record and alerts again, nothing doubles.
    assert storescu(cfg, [rdsr]).returncode == 0
    wait_until_caught_up(cfg)
    assert [s["revision"] for s in os_search(cfg, "diana-dose-studies", by_study)] == [1]
    assert len(os_search(cfg, "diana-dose-alerts", by_study)) == 2
    assert len(os_search(cfg, "diana-dose-events", by_study)) == 2
