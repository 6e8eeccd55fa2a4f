"""State topics (changelogs) of the stream workers, created before a worker starts."""

from __future__ import annotations

import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import NewTopic

from diana.clients import kafka_admin
from diana.config import Config

__all__ = ["ensure_state_topics"]


def ensure_state_topics(config: Config, names: list[str], timeout: float = 60.0) -> None:
    """Create compacted state topics (changelogs) before a worker starts, and wait until the broker lists them.

    Faust creates its changelogs itself, but on a busy fresh broker its next metadata read could
    miss them, and the agent then crashed with PartitionsMismatch (seen when two workers started
    together). They are co-partitioned with dicom.instances.
    """
    admin = kafka_admin(config.kafka)
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(n, num_partitions=config.kafka.partitions, replication_factor=-1, config={"cleanup.policy": "compact"})
        for n in names
        if n not in existing
    ]
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
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"changelog topics not visible after {timeout:.0f} s: {names}")
        time.sleep(0.2)
