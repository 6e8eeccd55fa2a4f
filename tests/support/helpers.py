"""Observing the real stack from tests: consumer lag, topic contents, OpenSearch counts."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pydicom
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from diana.clients import kafka_admin, kafka_consumer, kafka_producer, opensearch_client
from diana.config import Config
from diana.operations import status
from diana.schemas.codec import DecodeError, default_codec
from diana.schemas.topics import DOSE_ALERTS, DOSE_EVENTS, DOSE_STUDIES, INSTANCES, SERIES, STUDIES

# dcmtk's tools, not pynetdicom's same-named apps that a global pip install puts on the PATH.
DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def storescu(
    cfg: Config, files: list[Path], extra: list[str] | None = None, aet: str = "STORESCU"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "storescu",
            "-aet",
            aet,
            "-aec",
            cfg.receiver.ae_title,
            *(extra or []),
            "127.0.0.1",
            str(cfg.receiver.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )


class RawStoreSender:
    """One association that sends data sets exactly as given, however broken, over the real network.

    A modality with a broken encoder does this; pynetdicom's send_c_store would refuse such a
    data set before it reached the wire, so the DIMSE message is built here. Reconnects if the
    receiver aborted the association.
    """

    TS = "1.2.840.10008.1.2.1"

    def __init__(
        self,
        cfg: Config,
        sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
        aet: str = "RAWSENDER",
        transfer_syntax: str = TS,
    ):
        from pynetdicom import AE

        self.cfg, self.sop_class, self.TS = cfg, sop_class, transfer_syntax
        self.ae = AE(ae_title=aet)
        self.ae.dimse_timeout = 60
        self.ae.add_requested_context(sop_class, self.TS)
        self.assoc = None
        self.message_id = 0

    def _connect(self):
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.cfg.receiver.port, ae_title=self.cfg.receiver.ae_title)
            assert self.assoc.is_established, "receiver refused the association"
        return self.assoc

    def send(self, sop_instance_uid: str, body: bytes) -> int | None:
        """C-STORE ``body`` as the data set; the status, or None if the association broke."""
        from io import BytesIO

        from pynetdicom.dimse_primitives import C_STORE

        assoc = self._connect()
        self.message_id = self.message_id % 65535 + 1
        req = C_STORE()
        req.MessageID = self.message_id
        req.AffectedSOPClassUID = self.sop_class
        req.AffectedSOPInstanceUID = sop_instance_uid
        req.Priority = 2
        req.DataSet = BytesIO(body)
        context = assoc._get_valid_context(self.sop_class, self.TS, "scu")
        # As send_c_store does: pause the association's reactor so the response comes to us.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, context.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None or not assoc.is_established:
            self.assoc = None
            return None
        return int(rsp.Status)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def dataset_body(path: Path) -> bytes:
    """The encoded data set without preamble and file meta: what travels in a C-STORE."""
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        offset = fh.tell()
    return raw[offset:]


def stored_sha256(sop_class: str, sop_instance_uid: str, transfer_syntax: str, body: bytes) -> str:
    """SHA-256 of the Part-10 file the receiver stores for a data set received as ``body``."""
    import hashlib
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        buf,
        create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax),
    )
    buf.write(body)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def suboperation_counts(output: str) -> dict[str, int]:
    """The sub-operation counts of the last C-MOVE/C-GET response that movescu/getscu printed (-d)."""
    counts = {}
    for line in output.splitlines():
        for name in ("Remaining", "Completed", "Failed", "Warning"):
            if f"{name} Suboperations" in line and ":" in line:
                value = line.rsplit(":", 1)[1].strip()
                if value.isdigit():
                    counts[name] = int(value)
    return counts


def topic_with_events(cfg: Config, prefix: str, count: int) -> str:
    """A new topic of one partition (named ``prefix-<random>``) holding ``count`` messages ``event i``."""
    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = kafka_admin(cfg.kafka)  # kept until the topic exists: a destroyed client fails its futures
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    produce_events(cfg, topic, range(count))
    return topic


def produce_events(cfg: Config, topic: str, numbers: range) -> None:
    """The messages ``event i`` for each i of ``numbers``, acknowledged."""
    producer = kafka_producer(cfg.kafka)
    for i in numbers:
        producer.produce(topic, value=f"event {i}".encode())
    assert producer.flush(30) == 0


def committed_offset(cfg: Config, group: str, topic: str) -> int:
    """The offset ``group`` has committed on partition 0 of ``topic``, as the broker has it."""
    admin = kafka_admin(cfg.kafka)
    found = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])])
    return found[group].result(30).topic_partitions[0].offset


def group_lag(cfg: Config, group: str, topics: list[str]) -> int:
    """Messages of ``topics`` not yet committed by ``group`` (a group with no commit counts all)."""
    return sum(status.group_lag(cfg, group, status.watermarks(cfg, topics), count_uncommitted=True).values())


def wait_until_caught_up(cfg: Config, timeout: float = 120.0) -> None:
    """Wait until the aggregator, the dose worker and both sinks have committed everything in their topics."""
    groups = {
        cfg.stream.app_id: [INSTANCES.name],
        cfg.dose.app_id: [INSTANCES.name],
        cfg.sinks.archive_group: [INSTANCES.name],
        cfg.sinks.opensearch_group: [
            INSTANCES.name,
            SERIES.name,
            STUDIES.name,
            DOSE_EVENTS.name,
            DOSE_STUDIES.name,
            DOSE_ALERTS.name,
        ],
    }
    deadline = time.monotonic() + timeout
    lags: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            # The aggregator writes series/studies while catching up: settle twice in a row.
            lags = {g: group_lag(cfg, g, t) for g, t in groups.items()}
            if not any(lags.values()):
                time.sleep(1.0)
                lags = {g: group_lag(cfg, g, t) for g, t in groups.items()}
                if not any(lags.values()):
                    return
        except KafkaException as exc:  # a broker just restarted: its coordinator is still loading
            lags = {"unknown": str(exc)}
        time.sleep(0.5)
    raise AssertionError(f"pipeline did not catch up within {timeout}s; lag per group: {lags}")


def read_messages(cfg: Config, topic: str, since: dict[int, int] | None = None, timeout: float = 60.0) -> list:
    """Every committed message of ``topic`` from ``since`` (partition -> offset; default the start) to its end now.

    Reads until each partition reports its end (EOF), not until a count of offsets: topics written
    in Kafka transactions hold commit markers that take offsets and are never delivered.
    """
    consumer = kafka_consumer(
        cfg.kafka, f"reader-{uuid.uuid4()}", {"enable.auto.commit": False, "enable.partition.eof": True}
    )
    admin = kafka_admin(cfg.kafka)
    try:
        meta = admin.list_topics(topic, timeout=10).topics[topic]
        starts = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            start = max(low, (since or {}).get(p, low))
            if high > start:
                starts[p] = start
        consumer.assign([TopicPartition(topic, p, start) for p, start in starts.items()])
        out, open_partitions = [], set(starts)
        deadline = time.monotonic() + timeout
        while open_partitions:
            assert time.monotonic() < deadline, f"{topic}: partitions {sorted(open_partitions)} did not reach their end"
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(msg.partition())
                continue
            out.append(msg)
        return out
    finally:
        consumer.close()


def topic_records(cfg: Config, topic: str) -> list[tuple[bytes, dict]]:
    """Every decodable record of a topic from the beginning, decoded with the project's codec.

    Messages that are not ours (a test writes junk to check dead-lettering) are left out.
    """
    codec = default_codec()
    out = []
    for msg in read_messages(cfg, topic):
        try:
            out.append((msg.key(), codec.decode(msg.value())[1]))
        except DecodeError:
            continue
    return out


def message_count(cfg: Config, topic: str) -> int:
    """Messages in a topic now (decodable or not), from the watermarks."""
    admin = kafka_admin(cfg.kafka)
    consumer = kafka_consumer(cfg.kafka, f"count-{uuid.uuid4()}")
    try:
        parts = admin.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            high - low
            for low, high in (consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts)
        )
    finally:
        consumer.close()


def os_search(cfg: Config, index: str, query: dict, size: int = 1000) -> list[dict]:

    client = opensearch_client(cfg.opensearch)
    client.indices.refresh(index=index)
    result = client.search(index=index, body={"query": query, "size": size})
    return [hit["_source"] | {"_id": hit["_id"]} for hit in result["hits"]["hits"]]
