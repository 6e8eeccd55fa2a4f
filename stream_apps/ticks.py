"""The clock of quiet partitions: one tick per partition per second to dicom.ticks.

A partition's watermark moves with its events; a quiet partition's would never move, so every
worker writes a tick per partition every second, carrying the wall clock and the partition's end
offset in dicom.instances. The aggregates worker (aggregates.py, ``_tick``) lets a tick move the
watermark only under the conditions below and in stream_apps/README.md ("Time").
"""

from __future__ import annotations

import json
import time

import structlog
from confluent_kafka import TopicPartition

from diana.clients import kafka_consumer, kafka_producer
from diana.config import KafkaConfig
from diana.schemas.topics import INSTANCES, TICKS

__all__ = ["IDLE_S", "STALE_TICK_S", "TickWriter"]

log = structlog.get_logger("diana.stream.ticks")

# A partition counts as quiet after this long without an instance (wall time).
IDLE_S = 2.0
# Ticks older than this are history (a replay), not a clock.
STALE_TICK_S = 5.0


class TickWriter:
    """Writes one tick per partition to dicom.ticks: the wall clock and the end offset of dicom.instances.

    Every worker ticks every partition (a duplicate tick is harmless); ticks are not part of any
    transaction, they are a clock.
    """

    def __init__(self, kafka: KafkaConfig, partitions: int) -> None:
        self.kafka = kafka
        self.partitions = partitions
        self.producer = kafka_producer(kafka, {"linger.ms": 5})
        self.offsets = kafka_consumer(kafka, "diana-ticks")

    def __call__(self) -> None:
        for partition in range(self.partitions):
            try:
                end = self.offsets.get_watermark_offsets(TopicPartition(INSTANCES.name, partition), timeout=2)[1]
            except Exception as exc:  # broker unreachable: no tick, no harm
                log.warning("tick.skipped", partition=partition, reason=str(exc))
                # A new client for the next tick: after a broker of a cluster was killed, this one
                # kept timing out minutes after every broker was back (the stale leader of a
                # partition it never subscribes to), and without ticks no series completes.
                self.offsets.close()
                self.offsets = kafka_consumer(self.kafka, "diana-ticks")
                return
            value = json.dumps({"t": int(time.time() * 1000), "end": end}).encode()
            self.producer.produce(TICKS.name, value=value, partition=partition)
        self.producer.poll(0)
