"""Unit: no record of the aggregates worker can stall its transaction loop, without a broker.

The loop runs with the worker's real producer settings (``_new_producer``) given to a stand-in that
refuses, as librdkafka's produce() does, a record larger than its ``message.max.bytes`` (default
1,000,000 bytes): MSG_SIZE_TOO_LARGE, neither retriable nor fatal. Before, the worker's producer had
no ``message.max.bytes`` while the topics allow [kafka] max_message_bytes (8 MiB): a large dead
letter (or a completed series' digest) was refused, the batch aborted, rewound, and done again for
ever, and every partition of the worker stood still.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

import diana.stream_apps.transactional as transactional
from diana.config import KafkaConfig
from diana.schemas.codec import default_codec
from diana.schemas.topics import DEADLETTER, INSTANCES
from diana.stream_apps.aggregates import COLD, DIGEST, SEEN, SERIES_STATE, AggregatesHandler, changelog_topic
from diana.stream_apps.batch import Batch
from diana.stream_apps.completeness import QuietTimes
from diana.stream_apps.digest import PART_ENTRIES, digest_build, digest_count
from diana.stream_apps.failing_transactions import FailureStreak
from diana.stream_apps.loop_settings import LoopSettings
from diana.stream_apps.state_store import StateStore
from diana.stream_apps.transactional import GiveUp, TransactionalLoop

LIBRDKAFKA_DEFAULT_MAX = 1_000_000  # message.max.bytes when not set (checked with librdkafka 2.16)
CHANGELOG = changelog_topic("diana-aggregates")
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class SizeLimitedProducer:
    """The transactional producer, as far as the loop uses it; produce() refuses what librdkafka would."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.limit = int(settings.get("message.max.bytes", LIBRDKAFKA_DEFAULT_MAX))
        self.committed: list[list[tuple]] = []
        self.open: list[tuple] = []
        self.refused: list[tuple[str, int]] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in (headers or {}).items())
        if size > self.limit:
            self.refused.append((topic, size))
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large"))
        self.open.append((topic, key, value, partition, headers))

    def init_transactions(self, *_: Any) -> None:
        pass

    def begin_transaction(self) -> None:
        self.open = []

    def poll(self, *_: Any) -> int:
        return 0

    def send_offsets_to_transaction(self, *_: Any) -> None:
        pass

    def commit_transaction(self, *_: Any) -> None:
        self.committed.append(self.open)
        self.open = []

    def purge(self) -> None:
        self.open = []

    def flush(self, *_: Any) -> int:
        return 0

    def on(self, topic: str) -> list[tuple]:
        return [r for records in self.committed for r in records if r[0] == topic]


class OnePartitionConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[str, int, int]] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(INSTANCES.name, 0)]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def consumer_group_metadata(self) -> None:
        return None


def loop_with(monkeypatch, handler, kafka: KafkaConfig | None = None) -> TransactionalLoop:
    """The loop without its broker: the producer made from the worker's own settings."""
    monkeypatch.setattr(transactional, "kafka_producer", lambda _kafka, extra: SizeLimitedProducer(dict(extra)))
    settings = LoopSettings(
        kafka=kafka or KafkaConfig(),
        group_id="diana-aggregates",
        transactional_id="diana-aggregates-test",
        topics=(INSTANCES.name,),
        changelog=CHANGELOG,
        cold_namespaces=COLD,
    )
    loop = TransactionalLoop.__new__(TransactionalLoop)
    loop.settings, loop.handler, loop.local, loop.running = settings, handler, None, True
    loop._fatal_times = []
    loop._streak = FailureStreak(settings.transaction_max_retry_s)
    transactional.FAILING_SECONDS.set_function(loop._streak.seconds)  # as __init__ does
    loop.store = StateStore(None, COLD)
    loop.producer, loop.consumer = loop._new_producer(), OnePartitionConsumer()
    handler.partition_started(0, {INSTANCES.name: 0}, {})
    return loop


def event(study: str, series: str, number: int, at: datetime, **more: Any) -> dict:
    return {
        "sop_instance_uid": f"{series}.{number}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 200_000,
        "sha256": f"{number:064x}",
        "landing_path": "00/x.dcm",
        "received_at": at,
        "source": "C_STORE",
        "modality": "MR",
        "instance_number": number,
        "patient_id": "P",
        **more,
    }


def message(ev: dict, offset: int, value: bytes | None = None) -> Message:
    value = value if value is not None else default_codec().encode(INSTANCES.value_schema, ev)
    stamp = int(ev["received_at"].timestamp() * 1000)
    return Message(topic=INSTANCES.name, partition=0, offset=offset, value=value, timestamp=(2, stamp))


def test_the_worker_produces_records_up_to_max_message_bytes_and_batches_never_over_it(monkeypatch):
    """librdkafka caps a record batch at min(message.max.bytes, batch.size), batch.size 1,000,000 by
    default: under a limit of 600,000 a batch reached 665,536 bytes and the broker refused it."""
    loop = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60")), KafkaConfig(max_message_bytes=3_000_000))
    assert (loop.producer.limit, loop.producer.settings["batch.size"]) == (3_000_000, 1_000_000)
    small = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60")), KafkaConfig(max_message_bytes=600_000))
    assert (small.producer.limit, small.producer.settings["batch.size"]) == (600_000, 600_000 - 1024)


def test_the_receiver_and_the_sinks_dead_letters_batch_under_max_message_bytes_too(monkeypatch):
    from diana.producers import publisher
    from diana.sinks import consumer

    made: list[dict] = []
    monkeypatch.setattr(publisher, "Producer", lambda settings: made.append(settings) or SizeLimitedProducer(settings))
    monkeypatch.setattr(consumer, "kafka_producer", lambda _kafka, extra: made.append(extra) or object())
    kafka = KafkaConfig(max_message_bytes=600_000)
    publisher.EventPublisher(kafka).close()
    consumer.DeadLetters(kafka, "sink")
    (receiver, dead_letters) = made
    assert (receiver["message.max.bytes"], receiver["batch.size"]) == (600_000, 598_976)
    assert dead_letters["batch.size"] == 598_976


def test_every_producer_made_by_kafka_producer_batches_under_max_message_bytes(monkeypatch):
    """The ticks, alert actions, reports, collect ledger and alert commands' producers kept librdkafka's
    1,000,000-byte batch.size under a smaller limit: a burst of small records (a large PACS pull's
    ledger) filled a batch past the topic's limit. An explicit setting of the caller still wins."""
    from diana import clients

    made: list[dict] = []
    monkeypatch.setattr(clients, "Producer", lambda settings: made.append(settings) or object())
    kafka = KafkaConfig(max_message_bytes=600_000)
    clients.kafka_producer(kafka)
    clients.kafka_producer(kafka, {"acks": "all", "message.max.bytes": 600_000 + 65_536})
    (plain, explicit) = made
    assert (plain["message.max.bytes"], plain["batch.size"]) == (600_000, 598_976)
    assert (explicit["message.max.bytes"], explicit["batch.size"], explicit["acks"]) == (665_536, 598_976, "all")


def test_a_dead_letter_larger_than_the_limit_keeps_its_origin_and_reason_and_the_batch_commits(monkeypatch):
    """The auditor's stall_deadletter.py: an undecodable 1.5 MB event was refused at produce() and its
    batch aborted for ever. Now its dead letter is produced (the default 8 MiB limit), and over
    the limit its bytes are dropped, not the dead letter."""
    ev = event("1.2.3", "1.2.3.4", 1, T0, header_json='{"7FE00010":"' + "x" * 1_500_000 + '"}')
    value = bytearray(default_codec().encode(INSTANCES.value_schema, ev))
    value[2:10] = b"\x01" * 8  # a writer schema fingerprint nobody knows: dead-lettered
    loop = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60")))
    loop._transaction([message(ev, 0, bytes(value))])
    assert (len(loop.producer.committed), loop.consumer.seeks, loop.producer.refused) == (1, [], [])
    (letter,) = loop.producer.on(DEADLETTER.name)
    assert letter[2] == bytes(value) and letter[4]["origin"] == b"dicom.instances/0/0"

    # Past [kafka] max_message_bytes the bytes go, the origin, the reason and why stay.
    small = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60")), KafkaConfig(max_message_bytes=1 << 20))
    small._transaction([message(ev, 0, bytes(value))])
    assert (len(small.producer.committed), small.consumer.seeks) == (1, [])
    (letter,) = small.producer.on(DEADLETTER.name)
    assert letter[2] == b""
    assert letter[4]["origin"] == b"dicom.instances/0/0" and b"fingerprint" in letter[4]["reason"]
    assert letter[4]["value_dropped"] == f"{len(value)} bytes, over [kafka] max_message_bytes".encode()


class BigStateHandler:
    """A handler whose state value, or output, grows past any limit (what no fix can make fit)."""

    def __init__(self, namespace: str | None, size: int) -> None:
        self.namespace, self.size = namespace, size

    def partition_started(self, *_: Any) -> None:
        pass

    def partition_stopped(self, *_: Any) -> None:
        pass

    def handle(self, batch: Batch, msg: Message) -> None:
        if self.namespace:
            batch.put(msg.partition(), self.namespace, "1.2.3", "x" * self.size)
        else:
            batch.publish_latest("dicom.series", b"1.2.3", self.size, lambda n: b"x" * n)


@pytest.mark.parametrize("namespace", ["series", None])
def test_a_record_of_the_worker_too_large_for_the_topics_stops_it_naming_the_setting_not_an_endless_abort(
    monkeypatch, namespace
):
    loop = loop_with(monkeypatch, BigStateHandler(namespace, 2 << 20), KafkaConfig(max_message_bytes=1 << 20))
    with pytest.raises(GiveUp, match=r"max_message_bytes \(1048576\)") as stop:
        loop._transaction([message(event("1.2.3", "1.2.3.4", 1, T0), 0)])
    assert "1.2.3" not in str(stop.value)  # no UID in the message
    assert (loop.producer.committed, loop.consumer.seeks) == ([], [])


def test_a_record_refused_by_the_producer_for_its_size_stops_the_worker_too(monkeypatch):
    """librdkafka's own refusal (MSG_SIZE_TOO_LARGE at produce: neither retriable nor fatal) was
    aborted and the batch done again for ever."""
    loop = loop_with(monkeypatch, BigStateHandler(None, 600_000), KafkaConfig(max_message_bytes=1 << 20))
    loop.producer.limit = 500_000  # a producer stricter than the setting says
    with pytest.raises(GiveUp, match="max_message_bytes"):
        loop._transaction([message(event("1.2.3", "1.2.3.4", 1, T0 + timedelta(seconds=1)), 0)])
    assert loop.consumer.seeks == []


def _replayed(records: list[tuple]) -> StateStore:
    """The state a restart restores from the changelog records (state_restore.apply_record's parse)."""
    store = StateStore(None, COLD)
    for topic, key, value, partition, _ in records:
        if topic == CHANGELOG:
            store.apply(partition, key.decode(), None if value is None else json.loads(value))
    return store


def test_a_series_of_40000_instances_completes_with_every_record_under_a_megabyte_and_restores(monkeypatch):
    """The auditor's stall.py: the completed series' digest was one 1,066,670-byte record, refused
    at produce(); the batch was aborted and done again for ever. Now the digest is in parts, every
    record stays under librdkafka's default limit, and a restart finds a re-send in the parts."""
    handler = AggregatesHandler(QuietTimes.parse("*=60"), retention_days=600 / 86400)
    loop = loop_with(monkeypatch, handler)
    n = 40_000
    events = [message(event("1.2.3", "1.2.3.4", i, T0 + timedelta(milliseconds=i)), i - 1) for i in range(1, n + 1)]
    for at in range(0, n, 2000):
        loop._transaction(events[at : at + 2000])
    later = event("9.9.9", "9.9.9.1", 1, T0 + timedelta(minutes=2))  # moves the watermark: the series completes
    loop._transaction([message(later, n)])
    assert (len(loop.producer.committed), loop.consumer.seeks, loop.producer.refused) == (21, [], [])
    records = [r for batch in loop.producer.committed for r in batch]
    assert max(len(r[1] or b"") + len(r[2] or b"") for r in records) < LIBRDKAFKA_DEFAULT_MAX
    index = loop.store.get(0, DIGEST, "1.2.3.4")
    assert index["parts"] == -(-n // PART_ENTRIES) == 5
    assert sum(digest_count(loop.store.get(0, DIGEST, f"1.2.3.4/{p}")) for p in range(5)) == n
    assert loop.store.partitions[0].get(SEEN, {}).keys() == {"9.9.9.1.1"}

    # A restart: the state from the changelog; a re-send of one of the 40,000 counts once, a late new
    # instance is counted and the amended digest is in parts again.
    again = loop_with(monkeypatch, AggregatesHandler(QuietTimes.parse("*=60"), retention_days=600 / 86400))
    again.store = _replayed(records)
    again.handler.partition_started(0, {INSTANCES.name: n + 1}, again.store.partitions[0])
    assert again.store.partitions[0] == loop.store.partitions[0]
    resend = event("1.2.3", "1.2.3.4", 12_345, T0 + timedelta(minutes=3))
    late = event("1.2.3", "1.2.3.4", n + 1, T0 + timedelta(minutes=3))
    again._transaction([message(resend, n + 1), message(late, n + 2)])
    tick = event("9.9.9", "9.9.9.1", 2, T0 + timedelta(minutes=5))
    again._transaction([message(tick, n + 3)])
    series = again.store.get(0, SERIES_STATE, "1.2.3.4")
    assert (series["status"], series["instance_count"]) == ("AMENDED", n + 1)
    assert again.store.get(0, DIGEST, "1.2.3.4")["parts"] == 5
    assert sum(digest_count(again.store.get(0, DIGEST, f"1.2.3.4/{p}")) for p in range(5)) == n + 1

    # After the retention the study leaves the state: the index and every part with a tombstone.
    gone = event("9.9.9", "9.9.9.1", 3, T0 + timedelta(minutes=20))
    again._transaction([message(gone, n + 4)])
    tombstones = {r[1] for b in again.producer.committed for r in b if r[0] == CHANGELOG and r[2] is None}
    assert {b"digest/1.2.3.4", *(f"digest/1.2.3.4/{p}".encode() for p in range(5))} <= tombstones
    assert not any(k.startswith("1.2.3.4") for k in again.store.partitions[0].get(DIGEST, {}))


def test_the_least_max_message_bytes_the_config_accepts_holds_a_full_digest_part():
    """[kafka] max_message_bytes is refused below MIN_MAX_MESSAGE_BYTES (diana/config.py), which must
    hold the largest record the worker makes of its own bounded state: a full digest part."""
    from diana.config import MIN_MAX_MESSAGE_BYTES
    from diana.stream_apps.digest import digest_split
    from diana.stream_apps.state_json import state_json

    uids = [f"1.2.826.0.1.3680043.10.98.{i}" for i in range(PART_ENTRIES + 1)]
    _, parts = digest_split(digest_build((uid, "ab" * 32, 2**40) for uid in uids))
    key = f"{DIGEST}/{'1.2.' + '9' * 60}/0"  # the longest series UID (64 characters)
    assert len(state_json(parts[0])) + len(key) + 1024 < MIN_MAX_MESSAGE_BYTES
