"""A sink's check, asked of the broker, that its consumer is still a member of its group.

Seen once on CI (docs/RELIABILITY.md, "broker-down: an archive sink that never rejoined its group"): a
librdkafka 2.16 consumer whose coordinator died about 3 s after its first assignment sent no heartbeat
again and never rejoined. It kept polling, nothing in the client reported an error, and its group sat
EMPTY while events waited. The client's own view is what went wrong, so the check asks the group
coordinator which members it has; a consumer missing from that list, every time the broker answered,
for longer than ``limit_s``, is replaced by the caller (``run_sink``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["MembershipWatch", "OutsideTimer", "member_in_group"]


class OutsideTimer:
    """How long a consumer has been outside its group, counted only while the broker answered.

    A check the broker did not answer (it is down, or its coordinator is loading) starts the count
    again: a consumer needs a moment to rejoin after an outage, and that moment is not a fault.
    """

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.outside_since: float | None = None

    def observe(self, inside: bool | None, now: float) -> bool:
        """Record one check (``inside`` None: no answer); True when the consumer has been outside,
        the broker answering, for ``limit_s`` or longer. The count then starts again."""
        if inside is None or inside:
            self.outside_since = None
            return False
        if self.outside_since is None:
            self.outside_since = now
        if now - self.outside_since >= self.limit_s:
            self.outside_since = None
            return True
        return False


def member_in_group(description: Any, member_id: str | None) -> bool:
    """Whether ``member_id`` is among the members of a ConsumerGroupDescription (no id: not joined)."""
    return bool(member_id) and any(member.member_id == member_id for member in description.members)


class MembershipWatch:
    """Asks the broker every ``interval_s`` whether a consumer is in its group, without blocking.

    ``stuck(member_id)`` is called from the sink's loop between batches: it sends a describe request
    when one is due and reads its answer when it has come, so the loop never waits on it.
    """

    def __init__(
        self,
        admin: Any,
        group_id: str,
        limit_s: float,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.admin = admin
        self.group_id = group_id
        self.interval_s = interval_s
        self.timer = OutsideTimer(limit_s)
        self._clock = clock
        self._asked_at = clock()  # the first check waits one interval: a new consumer is still joining
        self._answer: Future | None = None
        self._asked_for: str | None = None

    def stuck(self, member_id: str | None) -> bool:
        now = self._clock()
        if self._answer is not None:
            if not self._answer.done():
                return False
            answer, self._answer = self._answer, None
            try:
                inside: bool | None = member_in_group(answer.result(), self._asked_for)
            except Exception:  # the broker did not answer (KafkaException), or answered with an error
                inside = None
            if self._asked_for != member_id:
                inside = None  # the consumer changed member id meanwhile (it rejoined): ask again
            return self.timer.observe(inside, now)
        if now - self._asked_at >= self.interval_s:
            self._asked_at = now
            self._asked_for = member_id
            self._answer = self.admin.describe_consumer_groups([self.group_id], request_timeout=self.interval_s)[
                self.group_id
            ]
        return False
