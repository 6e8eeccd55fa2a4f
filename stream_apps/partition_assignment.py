"""Assignment, revocation and restore of the transactional loop's partitions (a mixin of TransactionalLoop).

On assignment the group's committed offsets are read once they are stable (no transaction of a
dead predecessor pending, KIP-447), each partition's state is restored from its local file and the
changelog's tail, or the whole changelog (state_restore.py), and only then is the input assigned at
those offsets: state and input position always agree. A revoked or lost partition's state is dropped.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter

from diana.clients import kafka_consumer
from diana.group_membership import GroupWatch, close_within, stats_interval_s
from diana.stream_apps.batch import Handler
from diana.stream_apps.failing_transactions import FailureStreak
from diana.stream_apps.local_state import LocalStates
from diana.stream_apps.loop_settings import ConsumerFatal, LoopSettings, Stopped, slow
from diana.stream_apps.state_restore import GiveUp, restore_partitions
from diana.stream_apps.state_store import StateStore

__all__ = ["PartitionAssignment"]

log = structlog.get_logger("diana.stream.transactional")

REPLACED_CONSUMERS = Counter(
    "diana_stream_consumers_replaced_total",
    "Consumers the stream worker closed and made anew: after a fatal error, or outside its group",
    ["reason"],
)


class PartitionAssignment:
    """The consumer side of TransactionalLoop: subscription, assignment, restore, a failed consumer."""

    settings: LoopSettings
    handler: Handler
    store: StateStore
    local: LocalStates | None
    consumer: Consumer
    running: bool
    _consumer_settings: dict[str, Any]
    _consumer_fatal_times: list[float]
    _watch: GroupWatch
    _streak: FailureStreak

    # -- assignment -------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer:  # a replaced consumer, still closing on its thread
            return
        # Blocks until the group's offsets for these partitions are stable: a transaction of a
        # worker that died is committed or aborted first, so the changelog read next is final.
        committed = self._committed(partitions)
        numbers = sorted({tp.partition for tp in committed})
        self._restore(numbers)
        self._started(committed)
        consumer.assign(committed)
        # Other partitions, another batch: failures before (and the idle time since) do not count.
        self._streak.reset()
        log.info("partitions.assigned", partitions=numbers)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer:
            # A replaced consumer revoking as it closes, on its own thread (_join_again), maybe after its
            # successor got the same partitions: their state is the successor's now.
            consumer.unassign()
            return
        for partition in sorted({tp.partition for tp in partitions}):
            self.store.drop(partition)
            self.handler.partition_stopped(partition)
            if self.local is not None:
                self.local.close(partition)
        consumer.unassign()
        self._streak.reset()
        log.info("partitions.revoked", partitions=sorted({tp.partition for tp in partitions}))

    def _reload(self, numbers: list[int]) -> dict[tuple[str, int], int]:
        """Drop the state of partitions ``numbers`` and restore it exactly as an assignment does: the
        committed offsets once stable, the changelog read read_committed from the local file's
        checkpoint (or whole), the local file resumed; the input then resumes at those offsets.

        For a transaction whose outcome is unknown (commit_transaction failed): whether it committed
        or not, state and input position afterwards are what Kafka holds. Returns the offsets.
        """
        wanted = set(numbers)
        assigned = [
            TopicPartition(tp.topic, tp.partition) for tp in self.consumer.assignment() if tp.partition in wanted
        ]
        for partition in sorted(wanted):
            self.store.drop(partition)
            self.handler.partition_stopped(partition)
            if self.local is not None:
                self.local.close(partition)
        committed = self._committed(assigned)
        self._restore(sorted({tp.partition for tp in committed}))
        self._started(committed)
        self._seek(committed)
        log.info("partitions.reloaded", partitions=sorted(wanted))
        return {(tp.topic, tp.partition): tp.offset for tp in committed}

    def _seek(self, positions: list[TopicPartition]) -> None:
        """Move the input of ``positions`` (their partitions stay assigned) to those offsets."""
        try:
            for tp in positions:
                self.consumer.seek(tp)
        except KafkaException as exc:  # a partition not fetching yet cannot seek: set all positions anew
            log.warning("rewind.reassign", reason=str(exc))
            assignment = self.consumer.assignment()
            moved = {(tp.topic, tp.partition) for tp in positions}
            others = [tp for tp in self.consumer.position(assignment) if (tp.topic, tp.partition) not in moved]
            self.consumer.assign(positions + others)

    def _committed(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Committed offsets, or the start of the log for a partition never committed.

        Both are broker calls made inside the assignment callback: an error there would end the
        worker from within ``consume`` (seen in the fault suite: "Not leader for partition" right
        after a broker restart), so both are retried until ``give_up_after_s``.
        """
        deadline = time.monotonic() + self.settings.give_up_after_s
        while True:
            try:
                with slow("offsets.committed"):
                    return [self._or_log_start(tp) for tp in self.consumer.committed(partitions, timeout=30)]
            except KafkaException as exc:
                self._still_running()
                if time.monotonic() > deadline:
                    raise GiveUp(
                        f"the group's committed offsets stayed unavailable for {self.settings.give_up_after_s:.0f} s "
                        f"({exc}); check that the broker is up and reachable, then start the worker again"
                    ) from exc
                log.warning("offsets.unavailable", reason=str(exc))
                time.sleep(1.0)

    def _or_log_start(self, tp: TopicPartition) -> TopicPartition:
        if tp.offset >= 0:
            return TopicPartition(tp.topic, tp.partition, tp.offset)
        low, _ = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=30)
        return TopicPartition(tp.topic, tp.partition, low)

    def _restore(self, partitions: list[int]) -> None:
        """Rebuild the state of ``partitions``: local file plus changelog tail, or the whole changelog."""
        self.store.backed.difference_update(partitions)
        report = restore_partitions(
            self.settings.kafka,
            self.settings.group_id,
            self.settings.changelog,
            partitions,
            self.store.partitions,
            self.local,
            self.settings.give_up_after_s,
            self._still_running,
        )
        self.store.backed.update(p for p in report.backed if p in partitions)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            list(self.settings.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _is_error(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        # A fatal consumer error comes as code _FATAL; its fatal() flag is not set (librdkafka 2.16).
        if error.code() == KafkaError._FATAL or error.fatal():
            raise ConsumerFatal(error)
        log.warning("consume.error", reason=str(error))
        return True

    def _new_consumer(self) -> Consumer:
        """A consumer of the group, watched: its statistics tell ``self._watch`` whether it still takes part
        in the group (diana/group_membership.py)."""
        session_s = self.settings.session_timeout_ms / 1000
        # Statistics every half session, at most 5 s apart. Stuck after 30 s (or a session, if longer)
        # without a group request: a member heartbeats every 3 s (librdkafka's default), and the
        # coordinator has dropped one silent for a session anyway. The sinks' limit is 30 s too.
        self._watch = GroupWatch(max(30.0, session_s), stats_interval_s(session_s))
        return kafka_consumer(
            self.settings.kafka, self.settings.group_id, {**self._consumer_settings, **self._watch.settings()}
        )

    def _rejoin_outside_group(self) -> None:
        """The consumer has sent its group no request (heartbeat, join) for 30 s while connected:
        librdkafka 2.16 left one so after a broker restart, its partitions revoked and never assigned again
        (stop 30's CI). Join again with a new consumer, as after a fatal error."""
        log.error(
            "consumer.outside_group", group=self.settings.group_id, action="joining the group again with a new consumer"
        )
        REPLACED_CONSUMERS.labels("outside_group").inc()
        self._join_again(close_wait_s=self.settings.session_timeout_ms / 1000)

    def _replace_consumer(self, error: KafkaError) -> None:
        """A fatal consumer error leaves the consumer unusable for good: join again with a new one.

        Seen after a broker restart (fault suite, librdkafka 2.16): "Static consumer fenced by other
        consumer with same group.instance.id" while no other worker ran; the old consumer then
        only returned that error, and the worker's partitions stood still. No transaction is open
        between two consume calls, so nothing is lost: the partitions' state is dropped and restored
        from the changelog on the new assignment, as after a restart.
        """
        now = time.monotonic()
        self._consumer_fatal_times = [t for t in self._consumer_fatal_times if now - t < 600] + [now]
        if len(self._consumer_fatal_times) > 5:
            raise GiveUp(
                f"the consumer failed fatally {len(self._consumer_fatal_times)} times in 10 minutes ({error}); "
                "if another worker runs with the same [stream] worker_id, give each its own"
            )
        log.error("consumer.fatal", reason=str(error), action="joining the group again with a new consumer")
        REPLACED_CONSUMERS.labels("fatal").inc()
        self._join_again(close_wait_s=self.settings.session_timeout_ms / 1000)

    def _join_again(self, close_wait_s: float) -> None:
        """Drop every partition's state (restored on the next assignment, as after a restart), close the
        consumer and subscribe a new one. No transaction is open between two consume calls.

        The old consumer is closed on a thread of its own, waited for at most ``close_wait_s``: a client in
        that state may not finish closing, and the worker must not hang on it."""
        for partition in sorted(self.store.partitions):
            self.store.drop(partition)
            self.handler.partition_stopped(partition)
            if self.local is not None:
                self.local.close(partition)
        if not close_within(self.consumer, close_wait_s, lambda: self.running, "close-consumer"):
            log.warning("consumer.close_unfinished", waited_s=close_wait_s)
        self.consumer = self._new_consumer()
        self._subscribe()

    def _started(self, positions: list[TopicPartition]) -> None:
        """Tell the handler where each partition resumes (topic -> next offset)."""
        for partition in sorted({tp.partition for tp in positions}):
            self.handler.partition_started(
                partition,
                {tp.topic: tp.offset for tp in positions if tp.partition == partition},
                self.store.partitions.get(partition, {}),
            )

    def _still_running(self) -> None:
        """Called while waiting for the broker: a stop request ends the wait."""
        if not self.running:
            raise Stopped()
