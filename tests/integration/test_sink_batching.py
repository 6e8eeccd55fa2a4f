"""The sinks' batches on the real Kafka: an event is never held for a batch to fill (issue 19).

Before, a batch was ``consume(n, timeout)``: under a trickle every event waited the whole timeout.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import TopicPartition

from diana.clients import kafka_consumer
from diana.sinks.consumer import _next_batch
from tests.support.helpers import topic_with_events

LONG_LINGER_S = 10.0  # far longer than any wait the assertions allow: a batch that lingered would fail them


def _topic_with(cfg, count: int) -> str:
    return topic_with_events(cfg, "test-batching", count)


def _consumer_on(cfg, topic: str):
    consumer = kafka_consumer(cfg.kafka, f"test-batching-{uuid.uuid4().hex[:8]}", {"enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    return consumer


def _values(messages) -> list[bytes]:
    return [m.value() for m in messages if m.error() is None]


def test_events_already_fetched_are_a_batch_at_once(stack, cfg):
    topic = _topic_with(cfg, 3)
    consumer = _consumer_on(cfg, topic)
    try:
        time.sleep(3)  # the consumer fetches them in the background meanwhile
        started = time.monotonic()
        batch = _values(_next_batch(consumer, 500, LONG_LINGER_S))
        elapsed = time.monotonic() - started
        assert batch == [b"event 0", b"event 1", b"event 2"], batch
        assert elapsed < 2.5, f"a batch of 3 fetched events waited {elapsed:.2f} s for 497 more"
    finally:
        consumer.close()


def test_a_full_batch_goes_at_once_and_the_rest_follows(stack, cfg):
    topic = _topic_with(cfg, 10)
    consumer = _consumer_on(cfg, topic)
    try:
        time.sleep(3)
        first = _values(_next_batch(consumer, 4, LONG_LINGER_S))
        rest: list[bytes] = []
        started = time.monotonic()
        while len(rest) < 6 and time.monotonic() - started < 30:
            rest += _values(_next_batch(consumer, 500, LONG_LINGER_S))
        assert first == [f"event {i}".encode() for i in range(4)]
        assert rest == [f"event {i}".encode() for i in range(4, 10)]
        assert time.monotonic() - started < 2.5, "the 6 already fetched events waited for a batch to fill"
    finally:
        consumer.close()


def test_an_idle_consumer_returns_nothing_without_hanging(stack, cfg):
    topic = _topic_with(cfg, 0)
    consumer = _consumer_on(cfg, topic)
    try:
        started = time.monotonic()
        assert _values(_next_batch(consumer, 500, LONG_LINGER_S)) == []
        # It waits for a first event a bounded time (the sink then looks at its stop flag), never the linger.
        assert time.monotonic() - started < 5
    finally:
        consumer.close()
