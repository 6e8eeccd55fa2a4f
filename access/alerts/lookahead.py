"""Withdrawals published but not yet read: what the delivery worker checks just before each send.

The dose worker publishes an alert's withdrawal on ``dose.alerts`` with the alert's own key (its
study), so it lands on the alert's partition, behind it. The worker's consumer reads that partition in
order: while it delivers an alert, a withdrawal already published sits further on, unread. This reader
(a second consumer, assigned, never in the group, never committing) reads the partition from past the
alert up to the end the broker gives at that moment (the high watermark, queried then), and notes every
withdrawal it finds. What it has read it does not read again: its position per partition only moves
forward, so a backlog of alerts is read ahead once, not once per alert.

Guarantee: a withdrawal the broker had appended before the check began is seen (committed, with a dose
worker running ``processing_guarantee = "exactly_once"``: this reader is read_committed, and a
withdrawal in a transaction still open is not visible yet). Not covered: one
appended during the send (an SMTP dialogue, a webhook's answer; at most ``timeout_s`` per attempt),
which the worker then reads in order and answers with a correction to those it reached."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from diana.schemas.codec import Codec, DecodeError
from diana.schemas.topics import DOSE_ALERTS

__all__ = ["WithdrawalWatch", "NotReadInTime"]


class NotReadInTime(RuntimeError):
    """The partition could not be read to its end in time: whether the alert was withdrawn is not known."""


@dataclass
class WithdrawalWatch:
    consumer: Any  # a confluent_kafka.Consumer with enable.partition.eof, used by assign() only
    codec: Codec
    timeout_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    read_to: dict[int, int] = field(default_factory=dict)  # partition -> next offset not yet read
    # Alert ids whose withdrawal it read ahead of the worker's consumer; each forgotten once the worker
    # has read that withdrawal in turn (its ledger has it then), so the set holds only what lies ahead.
    withdrawn: set[str] = field(default_factory=set)

    def forget(self, alert_id: str) -> None:
        self.withdrawn.discard(alert_id)

    def is_withdrawn(self, alert_id: str, after: dict[int, int]) -> bool:
        """True when a withdrawal of ``alert_id`` is on ``dose.alerts`` now: each partition of ``after`` read
        from its offset (or where this reader stopped, if further) to the end. NotReadInTime when a
        partition could not be read to its end within ``timeout_s``."""
        for partition, offset in after.items():
            self._read(partition, max(offset, self.read_to.get(partition, 0)))
        return alert_id in self.withdrawn

    def _read(self, partition: int, start: int) -> None:
        tp = TopicPartition(DOSE_ALERTS.name, partition)
        _, end = self.consumer.get_watermark_offsets(tp, timeout=self.timeout_s, cached=False)
        if start >= end:
            return
        self.consumer.assign([TopicPartition(DOSE_ALERTS.name, partition, start)])
        try:
            self._read_assigned(partition, start, end)
        finally:
            # Unassigned after each read: assigned, librdkafka goes on fetching the partition into its
            # queue (up to queued.max.messages.kbytes) between the worker's sends, for nothing.
            self.consumer.unassign()

    def _read_assigned(self, partition: int, start: int, end: int) -> None:
        deadline = self.clock() + self.timeout_s
        position = start
        while position < end:
            if self.clock() >= deadline:
                # What was read stays read: the step tried again goes on from there (a long backlog).
                self.read_to[partition] = max(self.read_to.get(partition, 0), position)
                raise NotReadInTime(f"{DOSE_ALERTS.name} [{partition}] not read to its end in {self.timeout_s:g} s")
            msg = self.consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    # The end a read_committed reader may reach (an open transaction stops it short of
                    # the high watermark): nothing after it is published yet.
                    position = max(position, msg.offset() or position)
                    break
                continue
            position = (msg.offset() or 0) + 1
            try:
                _, alert = self.codec.decode(msg.value(), expect=DOSE_ALERTS.value_schema)
            except DecodeError:
                continue
            if alert.get("superseded_by"):
                self.withdrawn.add(alert["alert_id"])
        self.read_to[partition] = max(self.read_to.get(partition, 0), position)
