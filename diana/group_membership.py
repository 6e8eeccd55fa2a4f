"""A consumer's check that it still takes part in its group, read from the client's own statistics: the
sinks (sinks/consumer.py) and the aggregates worker (stream_apps/partition_assignment.py) replace a
consumer that stopped.

Seen on CI (docs/RELIABILITY.md, "broker-down: an archive sink that never rejoined its group"): a
librdkafka 2.16 consumer whose coordinator died about 3 s after its first assignment sent no heartbeat
again and never rejoined. It kept polling, nothing in the client reported an error, and its group sat
EMPTY while events waited. Seen again in stop 30's CI on the aggregates worker, after
test_receiver_durability stopped and restarted the broker: its partitions were revoked 8 s after the
broker came back, never assigned again, and diana-aggregates stayed EMPTY while 351 instance events waited.

A member of a group sends the coordinator a heartbeat every few seconds; a consumer joining sends
JoinGroup and SyncGroup, and waits for their answers. librdkafka counts the requests it has sent, per
broker, in the statistics it reports every ``statistics.interval.ms``. A consumer connected to a
broker that has sent none of these, with no request awaiting an answer on its coordinator connection,
for ``limit_s`` has stopped taking part in its group; the caller (``run_sink``, the stream loop) replaces it.

Asking the broker instead (``AdminClient.describe_consumer_groups`` every few seconds, is the member
id listed?) was tried first: in librdkafka 2.16.0 that loop aborted its process when the broker
restarted (``rd_kafka_enq_once_del_source_return``: an assertion; 4 of 4 such processes within two
restarts, docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import KafkaError

__all__ = [
    "GroupActivity",
    "GroupWatch",
    "TOPICS_MISSING_FIX",
    "close_within",
    "group_activity",
    "missing_topic",
    "stats_interval_s",
    "waiting_for_topics",
]

log = structlog.get_logger("diana.group_membership")


def stats_interval_s(session_s: float) -> float:
    """How often a watched consumer reports its statistics: every half session, at most 5 s apart."""
    return min(5.0, session_s / 2)


def close_within(consumer: Any, wait_s: float, keep_waiting: Callable[[], bool], name: str) -> bool:
    """Close ``consumer`` on a thread of its own (``name``), waiting at most ``wait_s`` and only while
    ``keep_waiting()``: a consumer outside its group may not finish closing, and its owner must not hang on
    it (one that never finishes is left to its thread). True if it closed in time."""

    def close() -> None:
        try:
            consumer.close()
        except Exception as exc:  # it is being replaced: closing is only housekeeping
            log.warning("consumer.close_failed", reason=str(exc))

    closing = threading.Thread(target=close, name=name, daemon=True)
    closing.start()
    deadline = time.monotonic() + wait_s
    while closing.is_alive() and time.monotonic() < deadline and keep_waiting():
        closing.join(0.2)
    return not closing.is_alive()


# What an operator does about a consumer kept waiting for its topics.
TOPICS_MISSING_FIX = "create them (diana topics), or let this client see them ([kafka] sasl_username's ACLs)"


def waiting_for_topics(consumer: Any, topics: Iterable[str], timeout_s: float = 5.0) -> bool:
    """Whether none of ``topics`` exists on the cluster (or none is visible to this client), by the
    consumer's own metadata request.

    A consumer whose subscribed topics do not exist (yet) sends its group no request at all until one is
    created (librdkafka 2.16 on the real broker: join state ``init`` and ``wait-metadata`` in turn), so its
    watch counts it stuck; replacing it helps nothing. Its statistics cannot tell it apart: a member
    with no partition lists no topic either. False when a topic exists, or when the metadata does not
    come within ``timeout_s`` (the consumer is then taken for stuck, as before)."""
    try:
        known = consumer.list_topics(timeout=timeout_s).topics
    except Exception:  # KafkaException, or a closed or broken client: not a reason to keep it
        return False
    return all(missing_topic(known, topic) for topic in topics)


def missing_topic(known: dict[str, Any], topic: str) -> bool:
    """Whether cluster metadata (``ClusterMetadata.topics``) says ``topic`` does not exist. Any other
    error of an existing topic (a leader not available while a broker restarts) is not "missing"."""
    metadata = known.get(topic)
    if metadata is None:
        return True
    return metadata.error is not None and metadata.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART


# The requests of a consumer taking part in its group (classic protocol).
GROUP_REQUESTS = ("Heartbeat", "JoinGroup", "SyncGroup")
# Brokers of a statistics report that stand for a connection: those the client learned or was given,
# and its group coordinator (a "logical" broker); not its "internal" one.
CONNECTING_SOURCES = ("learned", "configured", "logical")


@dataclass(frozen=True)
class GroupActivity:
    """What one statistics report says of a consumer's part in its group."""

    requests: int  # group requests sent so far, over every broker
    awaiting: int  # requests of any kind awaiting an answer on the group coordinator's connection
    connected: bool  # a connection to a broker (the coordinator's included) is up


def group_activity(stats: dict[str, Any]) -> GroupActivity:
    """The group activity in a librdkafka statistics report (its JSON, parsed)."""
    brokers = list(stats.get("brokers", {}).values())
    return GroupActivity(
        requests=sum(broker.get("req", {}).get(name, 0) for broker in brokers for name in GROUP_REQUESTS),
        # The coordinator is a "logical" broker of the client, beside the brokers it learned.
        awaiting=sum(broker.get("waitresp_cnt", 0) for broker in brokers if broker.get("source") == "logical"),
        connected=any(broker.get("state") == "UP" and broker.get("source") in CONNECTING_SOURCES for broker in brokers),
    )


class GroupWatch:
    """Told each statistics report of one consumer (``on_stats``, its ``stats_cb``); ``stuck`` turns True
    once the consumer has sent no group request, with none awaiting an answer, for ``limit_s`` while
    connected to a broker. Time without a connection is not counted: a consumer rejoins after an outage.
    Any request sent clears ``stuck`` again.

    The callback runs inside the consumer's ``poll``/``consume``, on the caller's own thread, so reports
    wait while the sink writes (or the stream worker restores state): a report handled more than two intervals after the one before (the
    sink was busy meanwhile) starts the count again, and the reports queued behind it, handled at the
    same moment, cannot add the write's time to it."""

    def __init__(self, limit_s: float, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit_s = limit_s
        self.interval_s = interval_s
        self.stuck = False
        self.quiet_since: float | None = None
        self._clock = clock
        self._requests: int | None = None
        self._reported_at: float | None = None
        self.unconnected_since: float | None = None  # since when no broker connection is up (None: one is)

    def restart(self) -> None:
        """Count again from the next report (a consumer found waiting for its topics, not stuck)."""
        self.stuck, self.quiet_since = False, None

    def kept_waiting_for(self, consumer: Any, topics: Iterable[str]) -> bool:
        """Found stuck, but none of ``topics`` exists (``waiting_for_topics``): the consumer is waiting
        rightly, the count starts again, and True (the caller says so, with ``TOPICS_MISSING_FIX``)."""
        if not (self.stuck and waiting_for_topics(consumer, topics)):
            return False
        self.restart()
        return True

    def settings(self) -> dict[str, Any]:
        """The consumer settings that send this watch the client's statistics."""
        return {"statistics.interval.ms": max(1, int(self.interval_s * 1000)), "stats_cb": self.on_stats}

    def on_stats(self, stats_json: str) -> None:
        self.observe(group_activity(json.loads(stats_json)), self._clock())

    def unconnected_for(self, now: float) -> float:
        """Seconds since the reports last showed a broker connection up (0 while one is)."""
        return 0.0 if self.unconnected_since is None else now - self.unconnected_since

    def observe(self, activity: GroupActivity, now: float) -> None:
        if activity.connected:
            self.unconnected_since = None
        elif self.unconnected_since is None:
            self.unconnected_since = now
        sent = self._requests is not None and activity.requests != self._requests
        late = self._reported_at is not None and now - self._reported_at > 2 * self.interval_s
        self._requests, self._reported_at = activity.requests, now
        if sent:
            self.stuck = False
        if late or sent or not activity.connected or activity.awaiting:
            self.quiet_since = None
            return
        if self.quiet_since is None:
            self.quiet_since = now
        elif now - self.quiet_since >= self.limit_s:
            self.stuck = True
