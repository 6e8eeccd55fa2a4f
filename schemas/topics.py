"""Every topic of diana-star: its name, its key, its value schema and its configuration.

The one place topics are declared; ``ensure_topics`` creates what is missing. Choices are
explained in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    "ALL_TOPICS",
    "ensure_topics",
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
INSTANCES = Topic(
    "dicom.instances",
    key="StudyInstanceUID",
    schema="InstanceArrived",
    config={"retention.ms": "-1", "cleanup.policy": "delete"},
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
    config={"retention.ms": str(3600 * 1000)},
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
)


def ensure_topics(admin: AdminClient, partitions: int, timeout: float = 30.0) -> list[str]:
    """Create the missing topics with ``admin`` (the broker's default replication); return the names created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(t.name, num_partitions=partitions, replication_factor=-1, config=dict(t.config))
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
    return created
