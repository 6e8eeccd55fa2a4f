"""The dose worker's stream partitions sought again once Faust resumes them (faust-streaming 0.15.3).

After a rebalance Faust's recovery resumes the stream partitions, seeks them to the group's committed
offsets, and only then resumes its flow control (``Recovery.on_recovery_completed``,
``Recovery._resume_streams``). Resuming the flow control clears every agent's queue. A message the
fetcher hands over in between (while the seek is awaited) is put in an agent's queue and cleared
there: never processed, never acknowledged, and not fetched again, since the fetch position has
moved past it. A partition the group has committed an offset on is sought back to it, which mostly
throws such a prefetched message away before it is handed over; one the group never committed on
(offset None: ``seek_to_committed`` leaves its position alone) hands over at once what the fetcher
read ahead during the recovery. Seen in the fault suite (docs/RELIABILITY.md, "A dose worker's lag
of 1"): a ``dose.by-patient`` partition with one message, processed by the surviving worker but
not committed before the partitions moved, moved to the restarted worker, which never processed it;
a lag of 1 that stayed.

``seek_stream_partitions_again`` runs after those two steps (nothing clears the queues again until
the next rebalance) and seeks every stream partition once more: to the group's committed offset, or
to the start of the partition where the group has none. Whatever was cleared is fetched again; what
was processed in between is processed twice (the dose agents re-send the same records, harmless:
stream_apps/README.md, "Outputs of the dose worker").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

__all__ = ["seek_stream_partitions_again", "stream_partitions_without_offset"]

log = structlog.get_logger("diana.stream.dose")

_PATCHED = "diana_seeks_again"


def stream_partitions_without_offset(
    assigned: Iterable[Any], is_stream: Callable[[str], bool], read_offsets: dict[Any, int | None]
) -> list[Any]:
    """The assigned partitions of the agents' topics (``is_stream``: Faust's acking topics, not the
    tables' changelogs nor its own assignor topic) for which the group holds no committed offset (or
    0): Faust's seek left their position where the fetcher had it (``read_offsets`` None)."""
    return sorted(
        (tp for tp in assigned if is_stream(tp.topic) and not read_offsets.get(tp)),
        key=lambda tp: (tp.topic, tp.partition),
    )


async def _seek_again(recovery: Any, generation_id: int) -> None:
    app, consumer = recovery.app, recovery.app.consumer
    if recovery.should_stop or app.consumer_generation_id != generation_id or not consumer.assignment():
        return  # a newer rebalance seeks for itself
    await consumer.perform_seek()  # the committed ones, with Faust's own bookkeeping
    fresh = stream_partitions_without_offset(consumer.assignment(), app.topics.acks_enabled_for, consumer._read_offset)
    for tp in fresh:
        await consumer.seek(tp, 0)  # before the log start: the fetcher resets to it (earliest)
    log.info(
        "dose.streams_sought_again", generation=generation_id, from_start=[f"{tp.topic}/{tp.partition}" for tp in fresh]
    )


def seek_stream_partitions_again() -> None:
    """Called once when the dose worker starts: a process-wide change to Faust, never made on import."""
    from faust.tables.recovery import Recovery

    for name in ("on_recovery_completed", "_resume_streams"):
        original: Callable[..., Awaitable[None]] = getattr(Recovery, name)
        if getattr(original, _PATCHED, False):
            continue

        async def after(
            self: Any, generation_id: int = 0, _original: Callable[..., Awaitable[None]] = original
        ) -> None:
            await _original(self, generation_id=generation_id)
            try:
                await _seek_again(self, generation_id)
            except Exception as exc:  # a partition revoked meanwhile: the next assignment seeks again
                log.warning("dose.streams_not_sought_again", generation=generation_id, error=type(exc).__name__)

        setattr(after, _PATCHED, True)
        setattr(Recovery, name, after)
