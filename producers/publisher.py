"""Publish events and wait for the broker's acknowledgement, shared by all associations.

One idempotent producer (acks=all) for the whole receiver: concurrent C-STOREs are batched
by librdkafka (linger.ms), and each caller waits only for its own delivery report.
"""

from __future__ import annotations

import threading
import time

from confluent_kafka import KafkaError, Producer

from diana.logs import KAFKA_CLIENT_LOGGER

__all__ = ["EventPublisher", "PublishError"]


class PublishError(RuntimeError):
    """The broker did not acknowledge the event in time (or refused it)."""


class EventPublisher:
    def __init__(self, bootstrap: str, timeout_s: float, client_id: str = "diana-receiver", linger_ms: int = 0):
        self.timeout_s = timeout_s
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
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
                "socket.nagle.disable": True,
                "log_level": 3,
                "logger": KAFKA_CLIENT_LOGGER,
            }
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def publish(self, topic: str, key: bytes, value: bytes) -> float:
        """Send and block until acknowledged; return the latency in seconds or raise PublishError."""
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            outcome.append(err)
            done.set()

        started = time.monotonic()
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except BufferError:
            raise PublishError("producer queue full") from None
        except Exception as exc:  # KafkaException for unknown topic, oversize message, ...
            raise PublishError(f"produce refused: {exc}") from None
        if not done.wait(self.timeout_s + 1.0):
            raise PublishError(f"no acknowledgement within {self.timeout_s:.1f}s")
        if outcome[0] is not None:
            raise PublishError(f"broker refused: {outcome[0].str()}")
        return time.monotonic() - started

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._poller.join()
        self._producer.flush(timeout)
