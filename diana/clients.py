"""The one place that builds Kafka and OpenSearch clients from the configuration.

Every Kafka client of diana-star starts from the same connection settings (bootstrap servers, and
whatever security a site configures later) and the same logging: librdkafka's messages go through
the structured ``diana.kafka`` logger at warning level and above, instead of raw lines on stderr.
Callers add only what is particular to their use (a group id, acks, transactions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from opensearchpy import OpenSearch

from diana.config import KafkaConfig, OpenSearchConfig
from diana.logs import KAFKA_CLIENT_LOGGER

__all__ = ["kafka_settings", "kafka_producer", "kafka_consumer", "kafka_admin", "opensearch_client"]

# librdkafka's syslog levels: 3 is error, 4 warning. Connection refusals during an outage are
# logged as errors by librdkafka and are worth seeing; its debug chatter is not.
_KAFKA_LOG_LEVEL = 3


def kafka_settings(kafka: KafkaConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings every client shares, then ``extra`` (librdkafka names, e.g. ``group.id``)."""
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap,
        "log_level": _KAFKA_LOG_LEVEL,
        "logger": KAFKA_CLIENT_LOGGER,
    }
    settings.update(extra or {})
    return settings


def kafka_producer(kafka: KafkaConfig, extra: Mapping[str, Any] | None = None) -> Producer:
    return Producer(kafka_settings(kafka, extra))


def kafka_consumer(kafka: KafkaConfig, group_id: str, extra: Mapping[str, Any] | None = None) -> Consumer:
    return Consumer(kafka_settings(kafka, {"group.id": group_id, **(extra or {})}))


def kafka_admin(kafka: KafkaConfig, extra: Mapping[str, Any] | None = None) -> AdminClient:
    return AdminClient(kafka_settings(kafka, extra))


def opensearch_client(opensearch: OpenSearchConfig, timeout: float = 30) -> OpenSearch:
    return OpenSearch(hosts=[opensearch.url], timeout=timeout)
