"""On the real stack: a message that makes a handler raise (not only one that cannot be decoded) is
dead-lettered with its origin and reason, and the worker goes on with the next message."""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import Consumer, Producer, TopicPartition
from pydicom.uid import generate_uid

from diana.schemas.codec import default_codec
from diana.schemas.topics import DEADLETTER, INSTANCES, TICKS
from tests.support.dicomgen import make_instance
from tests.support.helpers import os_search, read_messages, storescu, wait_until_caught_up


def _end_offsets(cfg, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": cfg.kafka.bootstrap, "group.id": "offsets-probe"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


def _event(**fields) -> dict:
    """An InstanceArrived event of an object that never landed, as another producer could publish it."""
    return {
        "sop_instance_uid": generate_uid(),
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": generate_uid(),
        "series_instance_uid": generate_uid(),
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 10,
        "sha256": "0" * 64,
        "landing_path": f"00/{'0' * 64}.dcm",
        "received_at": datetime.now(UTC),
        "source": "C_STORE",
        **fields,
    }


def _publish(producer: Producer, event: dict) -> None:
    value = default_codec().encode(INSTANCES.value_schema, event)
    producer.produce(INSTANCES.name, key=event["study_instance_uid"].encode(), value=value)


def test_a_message_that_makes_a_handler_raise_is_dead_lettered_and_the_next_one_processed(pipeline, tmp_path):
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    since = _end_offsets(cfg, DEADLETTER.name)
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    # The aggregates worker: a tick whose time no clock can hold (int(inf) raises OverflowError).
    producer.produce(TICKS.name, value=b'{"t": 1e999, "end": 0}', partition=0)
    # The sinks: a well-formed event whose header is not JSON, and one with a weight no 32-bit float holds
    # (another producer's: the receiver leaves such a value out).
    not_json = _event(header_json="{not json")
    too_heavy = _event(patient_weight_kg=1e39, study_date="2024-06-05", header_json='{"00100010":{"vr":"PN"}}')
    _publish(producer, not_json)
    _publish(producer, too_heavy)
    assert producer.flush(30) == 0

    # The next message: a real instance from storescu.
    good = make_instance(generate_uid(), generate_uid(), 1, patient_id="AFTERBAD", study_date="20240605")
    good_path = tmp_path / "good.dcm"
    good.save_as(good_path, enforce_file_format=True)
    result = storescu(cfg, [good_path])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(cfg)

    letters = []
    for msg in read_messages(cfg, DEADLETTER.name, since=since):
        headers = {k: v.decode() for k, v in msg.headers() or []}
        letters.append((headers.get("sink"), headers.get("origin", ""), headers.get("reason", "")))
    print(letters)
    from_aggregates = [x for x in letters if x[0] == cfg.stream.app_id]
    assert len(from_aggregates) == 1
    assert from_aggregates[0][1].startswith(f"{TICKS.name}/0/") and "OverflowError" in from_aggregates[0][2]
    from_index = {x[2].split()[2]: x for x in letters if x[0] == "opensearch"}  # "opensearch rejected <uid> ..."
    assert sorted(from_index) == sorted([not_json["sop_instance_uid"], too_heavy["sop_instance_uid"]])
    # The header goes into the document as written (not parsed by the sink): OpenSearch refuses that
    # document alone; so it does the weight (its reason names the field, not the value).
    for _, origin, reason in from_index.values():
        assert origin.startswith(f"{INSTANCES.name}/") and "mapper_parsing_exception" in reason
        assert "(indexed without its header)" in reason
    weight_reason = from_index[too_heavy["sop_instance_uid"]][2]
    assert "patient_weight_kg" in weight_reason and "E39" not in weight_reason.upper()
    # Each is indexed again by what the index cannot refuse: found by its UIDs, not invisible (the metadata
    # sink waited metadata_index_wait_s for such an instance, every other series behind it).
    for event in (not_json, too_heavy):
        [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": event["sop_instance_uid"]}})
        assert doc["series_instance_uid"] == event["series_instance_uid"] and "dicom" not in doc
        assert "study_date" not in doc and "patient_weight_kg" not in doc
        assert doc["header_omitted"][-1]["reason"].startswith("refused by the index: mapper_parsing_exception")
    assert any(x[0] == "archive" and "is missing" in x[2] for x in letters)  # never landed: nothing to archive

    # Every worker went on: the next instance is indexed, archived and aggregated.
    assert all(pipeline.procs[name].poll() is None for name in ("aggregates", "archive-sink", "opensearch-sink"))
    assert os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": good.SOPInstanceUID}})
    archived = cfg.path(cfg.storage.archive_dir) / good.StudyInstanceUID / good.SeriesInstanceUID
    assert (archived / f"{good.SOPInstanceUID}.dcm").exists()
    [aggregate] = os_search(cfg, "diana-series", {"term": {"series_instance_uid": good.SeriesInstanceUID}})
    assert aggregate["instance_count"] == 1

    # Other bytes under the same SOP Instance UID (first wins: the archive keeps the first) never replace
    # the identifiers-only document. The cause fixed, the same bytes' event sent again (a receiver that now
    # leaves the weight out, a replay): the whole document replaces it. Refused once more after that: the
    # whole document stays, and the dead letter says it was indexed before.
    _publish(producer, {**too_heavy, "sha256": "1" * 64, "patient_weight_kg": 71.0})
    assert producer.flush(30) == 0
    wait_until_caught_up(cfg)
    [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": too_heavy["sop_instance_uid"]}})
    assert doc["sha256"] == "0" * 64 and "dicom" not in doc
    _publish(producer, {**too_heavy, "patient_weight_kg": 70.0})
    assert producer.flush(30) == 0
    wait_until_caught_up(cfg)
    [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": too_heavy["sop_instance_uid"]}})
    assert doc["patient_weight_kg"] == 70.0 and doc["dicom"] == {"00100010": {"vr": "PN"}}
    assert not doc.get("header_omitted")
    since = _end_offsets(cfg, DEADLETTER.name)
    _publish(producer, too_heavy)
    assert producer.flush(30) == 0
    wait_until_caught_up(cfg)
    [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": too_heavy["sop_instance_uid"]}})
    assert doc["patient_weight_kg"] == 70.0
    headers = [{k: v.decode() for k, v in m.headers() or []} for m in read_messages(cfg, DEADLETTER.name, since=since)]
    reasons = [h["reason"] for h in headers if h.get("sink") == "opensearch"]
    assert (
        len(reasons) == 1
        and "mapper_parsing_exception" in reasons[0]
        and "(indexed before, or without its header)" in reasons[0]
    )


def test_a_keyword_longer_than_lucene_takes_no_longer_refuses_its_document(pipeline):
    """A 39,000-byte Patient ID (over Lucene's 32,766-byte term): the document is indexed (ignore_above),
    the value kept in it but not searchable; before, OpenSearch refused the document and its reason
    quoted the value's first bytes into the dead letter and the log. (The reasons OpenSearch gives with
    a value are cut down to field and type by rejection_reason, tested on OpenSearch's own answers in
    tests/unit/test_opensearch_document.py. No refused instance is added here: the metadata sink waits
    for a series whose instance the index never holds, and the session's later tests would wait behind it.)"""
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    since = _end_offsets(cfg, DEADLETTER.name)
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    long_id = _event(patient_id="LONGPATIENTID" * 3000)
    _publish(producer, long_id)
    assert producer.flush(30) == 0
    wait_until_caught_up(cfg)
    refused = [
        msg
        for msg in read_messages(cfg, DEADLETTER.name, since=since)
        if dict(msg.headers() or []).get("sink") == b"opensearch"
    ]
    assert refused == []
    assert os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": long_id["sop_instance_uid"]}})
    assert "LONGPATIENTIDLONG" not in pipeline.log_text("opensearch-sink")
