"""`diana replay`: move a consumer group back (or forward) for reprocessing.

The group must be stopped (no active members): Kafka refuses to move the offsets of a live
group, and a live consumer would overwrite them. Moves to the beginning, the end, a point in
time, or an offset; --dry-run shows what would move. A move forward past messages the group has not
processed skips them: the plan counts them per partition (Move.to_skip) and the command asks for
--allow-skip (or --to-end, which says so itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from confluent_kafka import ConsumerGroupState, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition

from diana.clients import kafka_admin, kafka_consumer
from diana.config import Config
from diana.operations.status import kafka_error_code, watermarks

__all__ = ["ReplayError", "Move", "plan_replay", "apply_replay", "render_moves", "watch_lag"]

# How long one request about the group may take. Without it, librdkafka's admin requests waited for
# a coordinator for good while Kafka was down: `diana replay` hung instead of saying so.
_ADMIN_TIMEOUT_S = 10.0


class ReplayError(RuntimeError):
    """The replay cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Move:
    topic: str
    partition: int
    current: int | None  # None: the group never committed here
    target: int
    first_kept: int = 0  # the partition's low watermark: earlier messages are gone

    @property
    def to_reprocess(self) -> int:
        return max((self.current or 0) - self.target, 0) if self.current is not None else 0

    @property
    def to_skip(self) -> int:
        """Messages the group has not processed that it would never process after the move: from where it
        would resume to the target. Where it never committed, diana's consumers start at the first message
        kept; a committed offset retention has passed resumes there too."""
        resume = self.first_kept if self.current is None else max(self.current, self.first_kept)
        return max(self.target - resume, 0)


def plan_replay(
    cfg: Config,
    group: str,
    topics: list[str] | None,
    *,
    to: str,
    when: datetime | None = None,
    offset: int | None = None,
) -> list[Move]:
    admin = kafka_admin(cfg.kafka)
    described = admin.describe_consumer_groups([group], request_timeout=_ADMIN_TIMEOUT_S)[group].result()
    if described.state not in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD, ConsumerGroupState.UNKNOWN):
        members = ", ".join(m.client_id for m in described.members) or "?"
        raise ReplayError(
            f"group {group} is {described.state.name.lower()} with members ({members}): "
            f"stop its consumers first (e.g. the `diana sink ...` or `diana aggregate` process)"
        )
    if not topics:
        probe = watermarks(cfg, [t for t in admin.list_topics(timeout=10).topics if not t.startswith("__")])
        committed = (
            admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, ps in probe.items() for p in ps])],
                request_timeout=_ADMIN_TIMEOUT_S,
            )[group]
            .result()
            .topic_partitions
        )
        topics = sorted({tp.topic for tp in committed if tp.offset >= 0})
        if not topics:
            raise ReplayError(f"group {group} has no committed offsets: name the topics with --topic")
    marks = watermarks(cfg, topics)
    missing = sorted(set(topics) - set(marks))
    if missing:
        raise ReplayError(f"no such topic: {', '.join(missing)}")
    current = {
        (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
        for tp in admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t in marks for p in marks[t]])],
            request_timeout=_ADMIN_TIMEOUT_S,
        )[group]
        .result()
        .topic_partitions
    }
    targets: dict[tuple[str, int], int] = {}
    if to == "datetime":
        if when is None:
            raise ReplayError("--to-datetime needs a time")
        consumer = kafka_consumer(cfg.kafka, "diana-replay-probe")
        try:
            ms = int(when.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(t, p, ms) for t in marks for p in marks[t]], timeout=10)
        finally:
            consumer.close()
        for tp in found:
            # -1: nothing at or after that time in this partition: start at its end
            targets[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else marks[tp.topic][tp.partition][1]
    else:
        for t, parts in marks.items():
            for p, (low, high) in parts.items():
                if to == "beginning":
                    targets[(t, p)] = low
                elif to == "end":
                    targets[(t, p)] = high
                else:
                    if offset is None or not low <= offset <= high:
                        raise ReplayError(f"offset {offset} is outside {t}[{p}]: valid {low}..{high}")
                    targets[(t, p)] = offset
    return [Move(t, p, current.get((t, p)), targets[(t, p)], marks[t][p][0]) for (t, p) in sorted(targets)]


def apply_replay(cfg: Config, group: str, moves: list[Move]) -> None:
    admin = kafka_admin(cfg.kafka)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(m.topic, m.partition, m.target) for m in moves])
    try:
        result = admin.alter_consumer_group_offsets([request], request_timeout=_ADMIN_TIMEOUT_S)[group].result()
    except KafkaException as exc:
        if kafka_error_code(exc) == KafkaError._TIMED_OUT:
            # Asked, and no answer: the broker may have made the move all the same.
            raise ReplayError(
                f"Kafka did not confirm the move of {group} within {_ADMIN_TIMEOUT_S:.0f} s: it may or may not "
                "have been made. See where the group stands with --dry-run, then run this again (the "
                "positions asked for are absolute, so asking twice moves nothing further)."
            ) from None
        raise
    failed = [tp for tp in result.topic_partitions if tp.error is not None]
    if failed:
        raise ReplayError(f"Kafka refused to move {len(failed)} partitions: {failed[0].error}")


def render_moves(moves: list[Move]) -> str:
    """The plan as a table: topic, partition, current and new position, messages to process again, and
    messages never processed that the move skips."""
    lines = [f"{'topic':<24}{'partition':>10}{'current':>12}{'new':>12}{'to reprocess':>14}{'SKIPPED':>10}"]
    for m in moves:
        current = "-" if m.current is None else str(m.current)
        lines.append(f"{m.topic:<24}{m.partition:>10}{current:>12}{m.target:>12}{m.to_reprocess:>14}{m.to_skip:>10}")
    return "\n".join(lines)


def watch_lag(cfg: Config, group: str, topics: list[str]) -> None:
    """A progress bar of the group's remaining lag, with events/s, until it reaches zero."""
    from tqdm import tqdm

    from diana.operations.status import group_lag

    def lag() -> int:
        return sum(group_lag(cfg, group, watermarks(cfg, sorted(set(topics)))).values())

    start = lag()
    with tqdm(total=start, unit="event", desc=f"{group} catching up") as bar:
        remaining = start
        while remaining > 0:
            time.sleep(1)
            now = lag()
            bar.total = max(bar.total, bar.n + now)
            bar.update(max(remaining - now, 0))
            remaining = now
