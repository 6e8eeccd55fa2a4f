"""Creates the Faust app of diana-star; the agents live in their own modules (aggregates.py)."""
from __future__ import annotations

import faust
from faust.transport.producer import ProducerBuffer

from diana.config import Config

# Faust blocks an agent in ProducerBuffer.wait_until_ebb once 100 table writes are pending; seen
# here right after a restart with a backlog, that wait never returned until the next rebalance.
# Each instance makes about five table writes, so allow a deep buffer instead.
ProducerBuffer.max_messages = 100_000

__all__ = ["create_app", "ensure_changelogs"]


def create_app(config: Config, app_id: str | None = None, web_port: int | None = None) -> faust.App:
    """The aggregates app by default; the dose worker passes its own id and port."""
    return faust.App(
        app_id or config.stream.app_id,
        broker=f"kafka://{config.kafka.bootstrap}",
        store="memory://",
        datadir=str(config.path(config.stream.data_dir)),
        # Changelogs are co-partitioned with dicom.instances: one study, one partition, one worker.
        topic_partitions=config.kafka.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_port=web_port or config.stream.web_port,
        web_host="127.0.0.1",
        autodiscover=False,
        processing_guarantee=config.stream.processing_guarantee,
    )


def ensure_changelogs(config: Config, app_id: str, tables: list[str], timeout: float = 60.0) -> None:
    """Create the tables' changelog topics before Faust starts, and wait until the broker lists them.

    Faust creates them itself, but on a busy fresh broker its next metadata read could miss them,
    and the agent then crashed with PartitionsMismatch (seen when two workers started together).
    """
    import time

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": config.kafka.bootstrap, "log_level": 3})
    names = [f"{app_id}-{table}-changelog" for table in tables]
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [NewTopic(n, num_partitions=config.kafka.partitions, replication_factor=-1,
                       config={"cleanup.policy": "compact"}) for n in names if n not in existing]
    for future in (admin.create_topics(wanted, request_timeout=timeout).values() if wanted else []):
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
