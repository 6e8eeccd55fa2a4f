"""A sink commits only what it has written, on the real Kafka (librdkafka issue 4534).

``commit(asynchronous=True)`` without offsets lets librdkafka read the stored offsets later, on its
own thread; the sink's next ``consume`` stores the offsets of messages it has not written yet. A sink
killed during that write lost them: on CI the fault smoke's sinks-kill left 3 acknowledged instances
unarchived with their events committed. ``commit_written`` takes the positions at once.
"""

from __future__ import annotations

import time
import uuid

from diana.clients import kafka_consumer
from diana.sinks.consumer import commit_written
from tests.support.helpers import committed_offset, topic_with_events

ROUNDS = 20


def _consume(consumer, count: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += [m for m in consumer.consume(count - len(got), timeout=1.0) if m.error() is None]
    assert len(got) == count, f"{len(got)} of {count} messages"
    return got


def test_a_commit_never_covers_messages_consumed_after_it(stack, cfg):
    """Each round: consume 5 (the batch written), commit, consume the next 5 at once (fetched already:
    a batch not written yet), then read the group's offset: it must be the end of the first 5."""
    topic = topic_with_events(cfg, "test-sink-commit", ROUNDS * 10)
    group = f"test-sink-commit-{uuid.uuid4().hex[:8]}"
    consumer = kafka_consumer(cfg.kafka, group, {"enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:
        wrong = []
        for round_ in range(ROUNDS):
            written = _consume(consumer, 5)
            time.sleep(0.2)  # the next messages are fetched meanwhile
            commit_written(consumer)
            _consume(consumer, 5)  # returned, offsets stored, not "written"
            expected = written[-1].offset() + 1
            # Until the commit has reached the broker (a fixed sleep was a guess); then it must be exact.
            deadline = time.monotonic() + 30
            while (found := committed_offset(cfg, group, topic)) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
            if found != expected:
                wrong.append(f"round {round_}: committed {found}, written up to {expected}")
            commit_written(consumer)  # the second five "written": the next round starts past them
        assert not wrong, wrong
    finally:
        consumer.close()
