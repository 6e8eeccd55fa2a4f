"""Every topic of diana-star: its name, its key, its value schema and its configuration.

The one place topics are declared; ``ensure_topics`` creates what is missing. Choices are
explained in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = [
    "Topic",
    "INSTANCES",
    "SERIES",
    "STUDIES",
    "DEADLETTER",
    "ARCHIVE_CONFLICTS",
    "TICKS",
    "DOSE_EVENTS",
    "DOSE_STUDIES",
    "DOSE_ALERTS",
    "DOSE_BY_PATIENT",
    "ALERT_ACTIONS",
    "COLLECT_JOBS",
    "ALL_TOPICS",
    "ensure_topics",
    "topic_settings",
    "replication",
    "topic_config",
]


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    schema: str | None  # the Avro record of its values; None: raw bytes (dead letters, ticks)
    config: dict[str, str] = field(default_factory=dict)

    @property
    def value_schema(self) -> str:
        """The schema name of an Avro topic (an error for a topic of raw bytes)."""
        if self.schema is None:
            raise ValueError(f"topic {self.name} carries raw bytes, not Avro records")
        return self.schema


# The log of record: kept forever so that every index and aggregate can be rebuilt from it.
# LogAppendTime: each event carries the broker's clock beside the receiver's received_at, and the
# aggregates' event time is never later than it (a receiver clock running fast cannot complete
# series early; stream_apps/README.md).
INSTANCES = Topic(
    "dicom.instances",
    key="StudyInstanceUID",
    schema="InstanceArrived",
    config={"retention.ms": "-1", "cleanup.policy": "delete", "message.timestamp.type": "LogAppendTime"},
)
# Latest state per key is all a reader needs: compacted.
SERIES = Topic(
    "dicom.series",
    key="SeriesInstanceUID",
    schema="SeriesAggregate",
    config={"cleanup.policy": "compact"},
)
STUDIES = Topic(
    "dicom.studies",
    key="StudyInstanceUID",
    schema="StudyAggregate",
    config={"cleanup.policy": "compact"},
)
DEADLETTER = Topic(
    "dicom.deadletter",
    key="origin topic/partition/offset",
    schema=None,
    config={"retention.ms": str(90 * 24 * 3600 * 1000)},
)
# Same SOP Instance UID, different bytes: each occurrence and what the archive did about it.
ARCHIVE_CONFLICTS = Topic(
    "dicom.archive-conflicts",
    key="SOPInstanceUID",
    schema="ArchiveConflict",
    config={"retention.ms": "-1"},
)
# A clock for quiet partitions: the aggregator's own ticks (wall time in ms, ASCII), one per
# partition per second, co-partitioned with dicom.instances. Worthless after a minute.
TICKS = Topic(
    "dicom.ticks",
    key="none (explicit partition)",
    schema=None,
    config={"retention.ms": str(3600 * 1000), "message.timestamp.type": "LogAppendTime"},
)
# Dose records (stream_apps/dose): one record per distinct irradiation event, a study's totals
# (latest per key: compacted), and alerts. All keyed by StudyInstanceUID, like dicom.instances.
DOSE_EVENTS = Topic("dose.events", key="StudyInstanceUID", schema="DoseEvent", config={"retention.ms": "-1"})
DOSE_STUDIES = Topic("dose.studies", key="StudyInstanceUID", schema="DoseStudy", config={"cleanup.policy": "compact"})
DOSE_ALERTS = Topic("dose.alerts", key="StudyInstanceUID", schema="DoseAlert", config={"retention.ms": "-1"})
# Study totals re-keyed by patient, so that one worker sees all of a patient's studies for the
# cumulative rules. Internal to the dose worker; derived, so rebuilt by a replay.
DOSE_BY_PATIENT = Topic("dose.by-patient", key="PatientID", schema="DoseStudy", config={"cleanup.policy": "compact"})
# What happened to each dose alert: deliveries, acknowledgments, closings (access/alerts). Kept
# forever: it is the alert's history and the delivery ledger that makes delivery happen once.
ALERT_ACTIONS = Topic("dose.alert-actions", key="alert_id", schema="AlertAction", config={"retention.ms": "-1"})
# Pulls from a PACS (producers/pacs_pull): each job's events keyed by job id, so one partition holds a
# job's whole history and a restarted `diana collect` folds it to go on where it stopped. Kept forever:
# it is the job's record (what was found, pulled, partial).
COLLECT_JOBS = Topic("collect.jobs", key="job_id", schema="CollectEvent", config={"retention.ms": "-1"})
ALL_TOPICS = (
    INSTANCES,
    SERIES,
    STUDIES,
    DEADLETTER,
    ARCHIVE_CONFLICTS,
    TICKS,
    DOSE_EVENTS,
    DOSE_STUDIES,
    DOSE_ALERTS,
    DOSE_BY_PATIENT,
    ALERT_ACTIONS,
    COLLECT_JOBS,
)


# Topics that carry instance events (the log of record, and its dead letters): compressed, since an
# event is mostly its DICOM JSON header.
_COMPRESSED = ("dicom.instances", "dicom.deadletter")

# Their codec, for the topics and for every producer writing to them. lz4, not gzip: the receiver
# sends each event in its own request, and per event gzip cost 90-124 us of the producer's CPU and
# 23-25 us of each consumer's, lz4 45 and 8, for 29% more bytes (2,150-byte events: 697 against 899;
# `python -m bench.event_codecs`, docs/PERFORMANCE.md, issue 19 stop 27). The dose worker's aiokafka
# reads lz4 with cramjam (a dependency).
EVENT_COMPRESSION = "lz4"


def expires(topic: Topic) -> bool:
    """Its messages are deleted after a time (dicom.deadletter: 90 days): an index made from it holds
    documents the topic no longer has. Kept for ever or compacted (the latest per key stays): False."""
    config = topic.config
    return "compact" not in config.get("cleanup.policy", "delete") and config.get("retention.ms", "-1") != "-1"


def topic_settings(kafka: Any) -> dict[str, int]:
    """ensure_topics' keyword arguments from a ``[kafka]`` config section."""
    return {
        "max_message_bytes": kafka.max_message_bytes,
        "replication_factor": kafka.replication_factor,
        "min_insync_replicas": kafka.min_insync_replicas,
    }


def replication(brokers: int, replication_factor: int = 0, min_insync_replicas: int = 0) -> tuple[int, int]:
    """(replication factor, min.insync.replicas); 0 means automatic: 3 and 2 on a cluster of 3 or more."""
    rf = replication_factor or min(3, max(brokers, 1))
    isr = min_insync_replicas or max(1, rf - 1)
    if isr > rf:
        raise ValueError(f"min_insync_replicas {isr} is more than the replication factor {rf}: no write could succeed")
    return rf, isr


def topic_config(topic: Topic, max_message_bytes: int, min_insync_replicas: int) -> dict[str, str]:
    config = dict(topic.config)
    config["max.message.bytes"] = str(max_message_bytes)
    config["min.insync.replicas"] = str(min_insync_replicas)
    if topic.name in _COMPRESSED:
        config["compression.type"] = EVENT_COMPRESSION
    return config


def ensure_topics(
    admin: AdminClient,
    partitions: int,
    timeout: float = 30.0,
    *,
    max_message_bytes: int = 8 * 1024 * 1024,
    replication_factor: int = 0,
    min_insync_replicas: int = 0,
) -> list[str]:
    """Create the missing topics with ``admin``; return the names created.

    Existing topics get the size, compression and timestamp settings again (they must agree with
    the producers' limit and the aggregates' event time); partitions and replication of an existing topic are left as they are.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

    metadata = admin.list_topics(timeout=timeout)
    rf, isr = replication(len(metadata.brokers), replication_factor, min_insync_replicas)
    existing = set(metadata.topics)
    wanted = [
        NewTopic(
            t.name, num_partitions=partitions, replication_factor=rf, config=topic_config(t, max_message_bytes, isr)
        )
        for t in ALL_TOPICS
        if t.name not in existing
    ]
    created = []
    if wanted:
        for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
    updates = []
    for t in ALL_TOPICS:
        if t.name in existing:
            entries = [
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in topic_config(t, max_message_bytes, isr).items()
                if k in ("max.message.bytes", "compression.type", "message.timestamp.type")
            ]
            updates.append(ConfigResource("TOPIC", t.name, incremental_configs=entries))
    if updates:
        for future in admin.incremental_alter_configs(updates, request_timeout=timeout).values():
            future.result()
    return created
