"""Transactions that keep failing with nothing committed: how long, why, and when to stop.

The loop aborts a failed transaction and does its batch again, which rides out what passes (a
broker restart, a coordinator move, a timeout). A cause that lasts (an output topic the worker may
not write, one deleted while topics are not created automatically, a topic whose replicas cannot
take the write) failed every redo the same way, for ever: the worker's partitions stood still and
only a warning per try said so. ``FailureStreak`` counts the failures since the last commit; past
``[stream] transaction_max_retry_s`` without one, and after at least ``MIN_FAILURES`` of them, the
worker stops, naming the cause and the fix. The loop's own recovery steps (a new producer's
init_transactions, the restore after a failed commit) are left out of the time: they have their own
120 s limits, and counting them stopped a worker after 2 tries (a broker restart the recovery rode
out, then one more failure).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["FailureStreak", "fix_for"]

# The first redo follows at once (as before: most transient failures cost one); later ones wait
# this long, doubling, at most _BACKOFF_MAX_S, so a lasting cause is not a busy loop.
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 5.0

# Failures in a row needed for a stop besides the time: a passing fault costs a few; a lasting cause
# at the default 300 s makes about 33 (a failed commit and a 5 s wait each, the unit test's clock).
MIN_FAILURES = 10

_AUTHORISATION = {
    "TOPIC_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
}
_MISSING_TOPIC = {"UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC", "_UNKNOWN_PARTITION"}
_REPLICAS = {"NOT_ENOUGH_REPLICAS", "NOT_ENOUGH_REPLICAS_AFTER_APPEND"}


def fix_for(causes: list[str], topics: list[str]) -> str:
    """What the operator can do about ``causes`` (Kafka error names), naming ``topics`` where known."""
    where = f" ({', '.join(topics)})" if topics else ""
    if _AUTHORISATION.intersection(causes):
        return (
            f"give the worker's Kafka user ([kafka] sasl_username) the right to write its output topics{where}, "
            "the changelog and dicom.deadletter, to use its transactional id and to commit for its group"
        )
    if _MISSING_TOPIC.intersection(causes):
        return (
            f"a topic the worker writes is missing{where}: run `diana topics` (its changelog is created at "
            "the worker's start), and keep the topics from being deleted"
        )
    if _REPLICAS.intersection(causes):
        return f"fewer in-sync replicas than the topic's min.insync.replicas{where}: bring the brokers back"
    return (
        f"find the cause in the broker's log and the worker's transaction.* lines{where}, "
        "remove it, and start the worker again"
    )


@dataclass
class FailureStreak:
    """Failed transactions since the last commit (the loop's): when the first failed, how many, why."""

    give_up_after_s: float
    since: float | None = None
    # Seconds since ``since`` spent in recovery steps (not counted), and when the current one began.
    recovering_s: float = 0.0
    recovering_since: float | None = None
    failures: int = 0
    causes: Counter[str] = field(default_factory=Counter)
    topics: set[str] = field(default_factory=set)
    last: str = ""

    def failed(self, cause: str, topics: set[str], now: float | None = None) -> None:
        if self.since is None:
            self.since = time.monotonic() if now is None else now
        self.failures += 1
        self.causes[cause] += 1
        self.topics |= topics
        self.last = cause

    def reset(self) -> None:
        """A transaction committed, or the worker's partitions changed (another batch): count anew."""
        self.since, self.recovering_s, self.failures, self.last = None, 0.0, 0, ""
        self.causes.clear()
        self.topics.clear()

    @contextmanager
    def recovering(self) -> Iterator[None]:
        """A recovery step of the loop (abort, restore after a failed commit): its time is not counted."""
        began = time.monotonic()
        self.recovering_since = began
        try:
            yield
        finally:
            self.recovering_since = None
            since = self.since  # None if a commit found by the restore reset the count
            if since is not None:
                self.recovering_s += max(0.0, time.monotonic() - max(began, since))

    def seconds(self, now: float | None = None) -> float:
        """How long transactions have failed with none committed, recovery steps left out; 0: the last
        one committed. Read by the metrics thread too: each field is read once (a reset() between a
        check and a use made it raise TypeError)."""
        since, recovering_since, recovering_s = self.since, self.recovering_since, self.recovering_s
        if since is None:
            return 0.0
        end = time.monotonic() if now is None else now
        if recovering_since is not None:
            end = min(end, recovering_since)
        return max(0.0, end - since - recovering_s)

    def lasting(self, now: float | None = None) -> bool:
        return self.failures >= MIN_FAILURES and self.seconds(now) > self.give_up_after_s

    def backoff_s(self) -> float:
        """The wait before the next redo: none after the first failure, then 1, 2, 4, 5, 5, ... s."""
        if self.failures <= 1:
            return 0.0
        return min(_BACKOFF_FIRST_S * 2 ** (self.failures - 2), _BACKOFF_MAX_S)

    def summary(self) -> str:
        """The causes by count, most frequent first, e.g. ``TOPIC_AUTHORIZATION_FAILED x12``."""
        return ", ".join(f"{cause} x{n}" for cause, n in self.causes.most_common())

    def give_up_message(self, reason: str) -> str:
        causes = sorted(self.causes)
        return (
            f"transactions kept failing for {self.seconds():.0f} s with none committed, recovery steps left out "
            f"({self.failures} tries: "
            f"{self.summary()}; the last: {reason}), over [stream] transaction_max_retry_s "
            f"({self.give_up_after_s:.0f} s); the next start resumes from what Kafka committed. Fix: "
            f"{fix_for(causes, sorted(self.topics))}; then start the worker again"
        )
