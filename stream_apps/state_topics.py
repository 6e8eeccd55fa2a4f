"""State topics (changelogs) of the stream workers, created before a worker starts."""

from __future__ import annotations

import time

import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from diana.clients import kafka_admin
from diana.config import Config
from diana.schemas.topics import INSTANCES, replication

log = structlog.get_logger("diana.stream")

__all__ = ["CHANGELOG_CONFIG", "PartitionMismatch", "ensure_state_topics"]

# Compaction only cleans closed segments: the broker's default segment (1 GiB or 7 days) kept a
# changelog's records, superseded or not, for a week or more. Rolled hourly (or at 64 MiB), the
# cleaner can drop superseded state within about an hour; it starts once 10 % of the log is dirty.
# Tombstones (the aggregates worker deletes each completed series' ``seen`` entries, and a retired
# study's whole state) are removed by the cleaner this long after it compacted them: an hour, far
# longer than a restore reading the changelog takes, so a restore never sees a record without
# the tombstone that deleted it; the broker's default keeps them a day.
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": str(3600 * 1000),
    "segment.bytes": str(64 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": str(3600 * 1000),
}


class PartitionMismatch(RuntimeError):
    """dicom.instances, a changelog and ``[kafka] partitions`` disagree on the partition count."""


def _check_partitions(config: Config, counts: dict[str, int]) -> None:
    """A worker's state for input partition p lives in partition p of its changelogs, and a study's
    events in one partition: a count changed under a running archive would put a study's later
    events beside another partition's state (counts restarting, revisions the sinks refuse)."""
    wanted = config.kafka.partitions
    wrong = {name: n for name, n in counts.items() if n != wanted}
    if wrong:
        # dicom.instances first: the count everything else follows
        found = ", ".join(f"{name} has {n}" for name, n in sorted(wrong.items(), key=lambda i: i[0] != INSTANCES.name))
        raise PartitionMismatch(
            f"[kafka] partitions is {wanted}, but {found}. A stream worker needs dicom.instances and its "
            "changelogs to have the same count: set [kafka] partitions to the topics' count. Changing the "
            'count of a running archive is not supported (docs/OPERATIONS.md, "The partition count").'
        )


def ensure_state_topics(config: Config, names: list[str], timeout: float = 60.0) -> int:
    """Create compacted state topics (changelogs) before a worker starts, and wait until the broker lists them.

    Replicated as the event topics are (``[kafka] replication_factor``, automatic: 3 replicas and
    ``min.insync.replicas`` 2 on a cluster of three brokers); returns the replication factor, for the
    topics Faust creates itself.

    Faust creates its changelogs itself, but on a busy fresh broker its next metadata read could
    miss them, and the agent then crashed with PartitionsMismatch (seen when two workers started
    together). They are co-partitioned with dicom.instances.
    """
    admin = kafka_admin(config.kafka)
    first = min(5.0, timeout)
    try:
        metadata = admin.list_topics(timeout=first)
    except KafkaException:
        # Said before the rest of the wait, which ends in the CLI's own message if Kafka never answers.
        log.warning("stream.waiting_for_kafka", bootstrap=config.kafka.bootstrap, seconds=timeout)
        metadata = admin.list_topics(timeout=timeout - first)
    existing = set(metadata.topics)
    _check_partitions(
        config, {n: len(metadata.topics[n].partitions) for n in [INSTANCES.name, *names] if n in existing}
    )
    rf, isr = replication(len(metadata.brokers), config.kafka.replication_factor, config.kafka.min_insync_replicas)
    # The same record size limit as the event topics and the worker's producer (app.py).
    size_limit = {"max.message.bytes": str(config.kafka.max_message_bytes)}
    topic_config = {**CHANGELOG_CONFIG, **size_limit, "min.insync.replicas": str(isr)}
    wanted = [
        NewTopic(n, num_partitions=config.kafka.partitions, replication_factor=rf, config=topic_config)
        for n in names
        if n not in existing
    ]
    present = [n for n in names if n in existing]
    if present:  # changelogs made before these settings get them too
        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in {**CHANGELOG_CONFIG, **size_limit}.items()
        ]
        resources = [ConfigResource("TOPIC", n, incremental_configs=entries) for n in present]
        for future in admin.incremental_alter_configs(resources, request_timeout=timeout).values():
            future.result()
    for future in admin.create_topics(wanted, request_timeout=timeout).values() if wanted else []:
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        if all(n in topics and len(topics[n].partitions) == config.kafka.partitions for n in names):
            return rf
        if time.monotonic() > deadline:
            raise RuntimeError(f"changelog topics not visible after {timeout:.0f} s: {names}")
        time.sleep(0.2)
