"""Publish events and wait for the broker's acknowledgement, shared by all associations.

One idempotent producer (acks=all) for the whole receiver: concurrent C-STOREs are batched
by librdkafka (linger.ms), and each caller waits only for its own delivery report.
Events are compressed (lz4, schemas/topics.py) and bounded by ``max_message_bytes``, the same limit the topic and
the local broker are configured with (docs/RELIABILITY.md, "Event size").
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import KafkaError, KafkaException, Producer

from diana.clients import kafka_settings, producer_size_limits
from diana.config import KafkaConfig
from diana.schemas.topics import EVENT_COMPRESSION

__all__ = ["EventPublisher", "PublishError", "PublishRefused", "PublishUncertain", "DEFAULT_MAX_MESSAGE_BYTES"]

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# Refusals that come back the same however often the event is sent again.
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
    KafkaError._INVALID_ARG,
}


class PublishError(RuntimeError):
    """The broker did not acknowledge the event in time: a transient failure, the sender may retry."""


class PublishUncertain(PublishError):
    """No acknowledgement in time, but the event may be in the log all the same (librdkafka's
    "possibly persisted": the request reached the broker, its answer did not come back). Whoever
    stored the object keeps it, so that an event that did go out finds its object."""

    possibly_published = True


class PublishRefused(PublishError):
    """The broker (or the producer's own limits) refuses this event for good: retrying cannot help."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _refusal(err: KafkaError, where: str, sent: bool) -> PublishError:
    """``sent``: the error came in a delivery report, after the request may have reached the broker."""
    text = f"{where}: {err.str()}"
    if err.code() in _PERMANENT and not err.fatal():
        return PublishRefused(text, err.name())
    # librdkafka's delivery report does not say whether a failed message was persisted (its
    # message status is not in the Python client): any transient failure after sending may have been.
    return PublishUncertain(text) if sent else PublishError(text)


class EventPublisher:
    def __init__(self, kafka: KafkaConfig, client_id: str = "diana-receiver"):
        # [kafka] publish_timeout_s, linger_ms and max_message_bytes shape this producer.
        timeout_s, linger_ms, max_message_bytes = kafka.publish_timeout_s, kafka.linger_ms, kafka.max_message_bytes
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._bootstrap = kafka.bootstrap
        self._config = kafka_settings(
            kafka,
            {
                "client.id": client_id,
                "acks": "all",
                "enable.idempotence": True,
                # One association waits for each ack in turn, so a linger is pure latency;
                # concurrent associations still batch while a request is in flight.
                "linger.ms": linger_ms,
                # Java clients and Faust hash keys with murmur2: one key, one partition for all.
                "partitioner": "murmur2_random",
                # librdkafka gives up at the same moment the C-STORE answers failure.
                "message.timeout.ms": int(timeout_s * 1000),
                # The topic's codec (lz4: schemas/topics.py says why), so the broker keeps the batches as sent.
                "compression.type": EVENT_COMPRESSION,
                # The uncompressed event's bound; the topic and the broker hold the same limit, and a
                # batch of events stays under it (batch.size: producer_size_limits).
                **producer_size_limits(max_message_bytes),
                "socket.nagle.disable": True,
            },
        )
        self._producer = Producer(self._config)
        self._replace_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def publish(self, topic: str, key: bytes, value: bytes) -> float:
        """Send and block until acknowledged; return the latency in seconds.

        Raises PublishRefused when the event can never be accepted (too large, not authorised),
        PublishError when the broker did not answer in time.
        """
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            outcome.append(err)
            done.set()

        started = time.monotonic()
        producer = self._producer
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except BufferError:
            raise PublishError("producer queue full") from None
        except KafkaException as exc:  # unknown topic, oversize message, ...
            if exc.args[0].fatal():
                self._replace(producer)
            raise _refusal(exc.args[0], "produce refused", sent=False) from None
        if not done.wait(self.timeout_s + 1.0):
            raise PublishUncertain(f"no acknowledgement within {self.timeout_s:.1f}s")
        if outcome[0] is not None:
            if outcome[0].fatal():
                self._replace(producer)
            if outcome[0].code() == KafkaError._MSG_TIMED_OUT:
                # Not a refusal: nothing answered (librdkafka's "Local: Message timed out").
                raise PublishUncertain(
                    f"no acknowledgement from Kafka at {self._bootstrap} within {self.timeout_s:g} s "
                    "(is it running? its address is [kafka] bootstrap)"
                )
            raise _refusal(outcome[0], "broker refused", sent=True)
        return time.monotonic() - started

    def _replace(self, failed: Producer) -> None:
        """A fatal error leaves an idempotent producer unusable: every later event would fail.
        The caller answers 'retry later' (its event is not lost: the sender sends it again), and
        the next events go through a new producer."""
        with self._replace_lock:
            if self._producer is failed:
                self._producer = Producer(self._config)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._poller.join()
        self._producer.flush(timeout)
