"""The one place that builds Kafka, OpenSearch and S3 clients from the configuration.

Every Kafka client of diana-star starts from the same connection settings (bootstrap servers, and
[kafka]'s security: SASL_SSL with SCRAM, a private CA) and the same logging: librdkafka's messages go through
the structured ``diana.kafka`` logger at warning level and above, instead of raw lines on stderr.
Callers add only what is particular to their use (a group id, acks, transactions).
"""

from __future__ import annotations

import configparser
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from opensearchpy import OpenSearch

from diana.config import (
    ConfigError,
    KafkaConfig,
    OpenSearchConfig,
    StorageConfig,
    kafka_debug_contexts,
    opensearch_urls,
)
from diana.credentials import MIN_SECRET_LENGTH, CredentialError, remember_secret, secret_value
from diana.logs import KAFKA_CLIENT_LOGGER

__all__ = [
    "kafka_settings",
    "kafka_producer",
    "kafka_consumer",
    "kafka_admin",
    "kafka_security_settings",
    "faust_broker_settings",
    "opensearch_auth",
    "opensearch_client",
    "s3_client",
    "s3_credentials",
]

# librdkafka's syslog levels: 3 is error, 4 warning. Connection refusals during an outage are
# logged as errors by librdkafka and are worth seeing; its debug chatter is not, unless asked for.
_KAFKA_LOG_LEVEL = 3
_KAFKA_DEBUG_LOG_LEVEL = 7


def _kafka_password(kafka: KafkaConfig) -> str:
    try:
        return secret_value("kafka", "sasl_password", kafka.sasl_password, kafka.sasl_password_file)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None


def kafka_security_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """librdkafka's security settings for [kafka] (empty for PLAINTEXT)."""
    if kafka.security_protocol == "PLAINTEXT":
        return {}
    settings: dict[str, Any] = {
        "security.protocol": kafka.security_protocol,
        # The broker's certificate must name the host we dial: no silent man in the middle.
        "ssl.endpoint.identification.algorithm": "https",
    }
    if kafka.ssl_ca_file:
        settings["ssl.ca.location"] = kafka.ssl_ca_file
    if kafka.security_protocol == "SASL_SSL":
        settings.update(
            {
                "sasl.mechanism": kafka.sasl_mechanism,
                "sasl.username": kafka.sasl_username,
                "sasl.password": _kafka_password(kafka),
            }
        )
    return settings


# Room left under [kafka] max_message_bytes (the topics' max.message.bytes, which the broker checks
# against a whole record batch) for the batch's and a record's framing.
RECORD_FRAMING = 1024
# librdkafka's batch.size default: it caps a record batch at min(message.max.bytes, batch.size).
_LIBRDKAFKA_BATCH_SIZE = 1_000_000


def producer_size_limits(max_message_bytes: int) -> dict[str, int]:
    """A producer's size settings under the topics' limit ([kafka] max_message_bytes): one record up to
    the limit, and a record batch of several never over it. librdkafka fills a batch up to
    min(message.max.bytes, batch.size); with batch.size at its 1,000,000-byte default and a limit below
    that, a batch grew past the limit (665,536 bytes under 600,000) and the broker refused it."""
    return {
        "message.max.bytes": max_message_bytes,
        "batch.size": min(_LIBRDKAFKA_BATCH_SIZE, max_message_bytes - RECORD_FRAMING),
    }


def kafka_settings(kafka: KafkaConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings every client shares, then ``extra`` (librdkafka names, e.g. ``group.id``)."""
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap,
        "log_level": _KAFKA_LOG_LEVEL,
        "logger": KAFKA_CLIENT_LOGGER,
        **kafka_security_settings(kafka),
    }
    if debug := kafka_debug_contexts(kafka.debug):
        # [kafka] debug: librdkafka's debug lines, written whatever [log] level says (they were asked for).
        settings.update({"debug": ",".join(debug), "log_level": _KAFKA_DEBUG_LOG_LEVEL})
        KAFKA_CLIENT_LOGGER.setLevel(logging.DEBUG)
    settings.update(extra or {})
    return settings


def faust_broker_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """``faust.App`` keyword arguments for [kafka]: the broker URL and, when secured, its credentials."""
    import ssl

    import faust

    settings: dict[str, Any] = {"broker": f"kafka://{kafka.bootstrap}"}
    if kafka.security_protocol == "PLAINTEXT":
        return settings
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_ca_file or None)
    if kafka.security_protocol == "SSL":
        settings["broker_credentials"] = faust.SSLCredentials(context)
    else:
        settings["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=_kafka_password(kafka),
            ssl_context=context,
            mechanism=kafka.sasl_mechanism,
        )
    return settings


def kafka_producer(kafka: KafkaConfig, extra: Mapping[str, Any] | None = None) -> Producer:
    """A producer under the topics' size limit (``producer_size_limits``), then ``extra``: every one of
    them, not only the few whose records are large (a burst of small records fills a batch too)."""
    return Producer(kafka_settings(kafka, {**producer_size_limits(kafka.max_message_bytes), **(extra or {})}))


def consumer_settings(kafka: KafkaConfig, group_id: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A consumer's settings: the shared ones, the fetch batching of [kafka], then ``extra``."""
    batching = {"fetch.min.bytes": kafka.fetch_min_bytes, "fetch.wait.max.ms": kafka.fetch_wait_max_ms}
    return kafka_settings(kafka, {"group.id": group_id, **batching, **(extra or {})})


def kafka_consumer(kafka: KafkaConfig, group_id: str, extra: Mapping[str, Any] | None = None) -> Consumer:
    return Consumer(consumer_settings(kafka, group_id, extra))


def kafka_admin(kafka: KafkaConfig, extra: Mapping[str, Any] | None = None) -> AdminClient:
    return AdminClient(kafka_settings(kafka, extra))


def opensearch_auth(opensearch: OpenSearchConfig) -> tuple[str, str] | None:
    """(user, password) for HTTP basic authentication, or None when [opensearch] has no username."""
    if not opensearch.username:
        return None
    try:
        password = secret_value("opensearch", "password", opensearch.password, opensearch.password_file)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    return opensearch.username, password


def opensearch_client(opensearch: OpenSearchConfig, timeout: float = 30) -> OpenSearch:
    """https urls are verified (against ca_file when set); basic authentication when username is set.

    Several urls (a cluster's nodes): a node that does not answer is marked dead for a while and the
    request goes to the next one (opensearch-py's connection pool).
    """
    secure = opensearch.url.startswith("https://")
    return OpenSearch(
        hosts=opensearch_urls(opensearch),
        timeout=timeout,
        http_auth=opensearch_auth(opensearch),
        use_ssl=secure,
        verify_certs=secure,
        ca_certs=(opensearch.ca_file or None) if secure else None,
        ssl_show_warn=False,
        # Connections kept open per node. urllib3's default, 1, closed all but one after every
        # round of the sinks' parallel bulk requests (4 at once) and logged a warning for each.
        pool_maxsize=10,
    )


def _remember_s3_secret(secret: str, where: str) -> None:
    """Remember the S3 secret key for redaction (diana/credentials.py), refusing a short one as
    ``secret_value`` refuses a short password: redaction leaves values under MIN_SECRET_LENGTH alone (masking
    them would eat ordinary words from every log line), so a short key could be printed. The message names
    the setting, never the value."""
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"[storage] {where}: use a secret key of at least {MIN_SECRET_LENGTH} characters")
    remember_secret(secret)


def s3_credentials(storage: StorageConfig) -> tuple[str, str] | None:
    """(access key id, secret key) from [storage]: the credentials file, else the keys; None: boto3's own chain."""
    if storage.s3_credentials_file:
        path = Path(storage.s3_credentials_file).expanduser()
        parser = configparser.ConfigParser()
        try:
            with open(path) as fh:
                parser.read_file(fh)
            section = parser["default"]
            keys = section["aws_access_key_id"].strip(), section["aws_secret_access_key"].strip()
            _remember_s3_secret(keys[1], f"s3_credentials_file {path}: aws_secret_access_key")
            return keys
        except FileNotFoundError:
            raise ConfigError(f"[storage] s3_credentials_file {path} does not exist") from None
        except (KeyError, configparser.Error):
            # The message names the file and the keys expected, never what the file holds.
            raise ConfigError(
                f"[storage] s3_credentials_file {path}: expected a [default] section with aws_access_key_id "
                f"and aws_secret_access_key"
            ) from None
    if storage.s3_access_key_id:
        _remember_s3_secret(storage.s3_secret_access_key, "s3_secret_access_key")
        return storage.s3_access_key_id, storage.s3_secret_access_key
    return None


def s3_client(storage: StorageConfig, endpoint: str | None = None) -> Any:
    """A boto3 S3 client for [storage] (``endpoint`` overrides s3_endpoint, e.g. the local stack's).

    Checksums only when an operation requires them: S3-compatible servers such as S3Proxy 2.6
    answer NotImplemented to the newer default checksum headers. The stores send Content-MD5
    themselves and keep each object's SHA-256.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    keys = s3_credentials(storage)
    return boto3.client(
        "s3",
        endpoint_url=endpoint or storage.s3_endpoint or None,
        region_name=storage.s3_region,
        aws_access_key_id=keys[0] if keys else None,
        aws_secret_access_key=keys[1] if keys else None,
        verify=storage.s3_ca_file or None,
        config=BotoConfig(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
        ),
    )
