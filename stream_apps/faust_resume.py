"""Faust's offset bookkeeping in the dose worker made to survive a rebalance (faust-streaming 0.15.3).

Two faults of Faust around a rebalance, both seen in the fault suite (docs/RELIABILITY.md):

**Messages cleared from the agents' queues** ("A dose worker's lag of 1"). After a rebalance Faust's
recovery resumes the stream partitions, seeks them to the group's committed offsets, and only then
resumes its flow control (``Recovery.on_recovery_completed``, ``Recovery._resume_streams``), which
clears every agent's queue. A message the fetcher hands over in between is cleared there: never
processed, never acknowledged, and not fetched again, since the fetch position has moved past it. A
partition the group never committed on (offset None: ``seek_to_committed`` leaves its position
alone) hands over at once what the fetcher read ahead during the recovery.

**Offsets committed one per commit interval** ("worker-kill: the dose group's lag"). Faust's seek
sets its read positions back to the committed offsets while its fetch loop is still handing over a
batch fetched before the seek. The next message of that batch is then further than one past the read
position, which Faust takes for a gap in the log (as a compacted topic has) and counts as
acknowledged; the same offsets are acknowledged again when processed. ``Consumer._new_offset`` commits
the first run of consecutive offsets of its sorted list, and a repeated offset ends a run: with
every offset of a range acknowledged twice, each commit (every 2.8 s) moved by one offset, and a
restarted worker took minutes to commit what it had processed in seconds (robinhood/faust issue 625
describes the same repeated offsets).

What this module changes, once, when the dose worker starts:
- ``Recovery.on_recovery_completed`` and ``_resume_streams`` stop the consumer's flow first, so that
  Faust's own seek happens while nothing is handed over (both resume the flow when they are done, and
  where they raise, the flow is resumed here);
- after them, with the flow stopped again and the fetch loop parked, every stream partition is sought
  once more: to the group's committed offset, or to the start of the partition where it has none;
  the acknowledgements and gaps Faust recorded past those offsets are dropped, as Faust itself drops
  them for a revoked partition, since everything past them is fetched and processed again;
- ``_new_offset`` counts a repeated offset as part of its run, so a repeat can no longer hold a commit
  back.
What was processed twice is harmless: the dose agents re-send the same records (stream_apps/README.md,
"Outputs of the dose worker").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import structlog

__all__ = ["runs_of_offsets", "seek_stream_partitions_again", "stream_partitions_without_offset"]

log = structlog.get_logger("diana.stream.dose")

_PATCHED = "diana_seeks_again"
# How long the fetch loop may take to park once the flow is stopped: it finishes the fetch it is
# waiting on first (Faust asks for records with a 1 s timeout).
_PARK_TIMEOUT_S = 3.0


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


def runs_of_offsets(offsets: Iterable[int]) -> Iterator[Sequence[int]]:
    """Runs of consecutive offsets in a sorted list, a repeated offset staying in its run:
    ``[4, 5, 5, 6, 8]`` gives ``[4, 5, 5, 6]`` then ``[8]``. Faust removes a run's length from the
    front of its list and commits one past its last offset."""
    run: list[int] = []
    for offset in offsets:
        if run and offset - run[-1] > 1:
            yield run
            run = []
        run.append(offset)
    if run:
        yield run


async def _fetch_loop_parked(consumer: Any, timeout_s: float = _PARK_TIMEOUT_S) -> bool:
    """Wait until Faust's fetch loop waits for the flow to resume (its only wait on
    ``can_resume_flow``): from then on it neither hands over nor fetches until the flow resumes.

    A waiter already woken by the last resume stays in the event's list until its task runs: only
    one still pending counts."""
    waiters = getattr(consumer.can_resume_flow, "_waiters", None)
    if waiters is None:  # not an asyncio.Event any more: wait out one fetch instead
        await asyncio.sleep(timeout_s)
        return False
    deadline = time.monotonic() + timeout_s
    await asyncio.sleep(0)  # let a loop woken by the last resume run on to its next wait
    while not any(not waiter.done() for waiter in waiters):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _resume_flow_unless_rebalanced(recovery: Any, generation_id: int) -> None:
    """Resume the consumer's flow, unless a newer rebalance began: its own recovery resumes it then."""
    if recovery.app.consumer_generation_id == generation_id and not recovery.should_stop:
        recovery.app.consumer.resume_flow()


async def _seek_again(recovery: Any, generation_id: int) -> None:
    app, consumer = recovery.app, recovery.app.consumer
    if recovery.should_stop or app.consumer_generation_id != generation_id or not consumer.assignment():
        return  # a newer rebalance seeks for itself
    consumer.stop_flow()
    try:
        parked = await _fetch_loop_parked(consumer)
        await consumer.perform_seek()  # the committed ones, with Faust's own bookkeeping
        streams = [tp for tp in consumer.assignment() if app.topics.acks_enabled_for(tp.topic)]
        fresh = stream_partitions_without_offset(streams, app.topics.acks_enabled_for, consumer._read_offset)
        for tp in fresh:
            await consumer.seek(tp, 0)  # before the log start: the fetcher resets to it (earliest)
        for tp in streams:  # everything past the committed offset is handed over again
            consumer._gap.pop(tp, None)
            consumer._acked.pop(tp, None)
            consumer._acked_index.pop(tp, None)
    finally:
        _resume_flow_unless_rebalanced(recovery, generation_id)
    log.info(
        "dose.streams_sought_again",
        generation=generation_id,
        fetch_loop_parked=parked,
        from_start=[f"{tp.topic}/{tp.partition}" for tp in fresh],
    )


def _count_repeated_offsets_in_runs() -> None:
    from faust.transport import consumer as faust_consumer

    faust_consumer.consecutive_numbers = runs_of_offsets  # the name ``_new_offset`` calls


def seek_stream_partitions_again() -> None:
    """Called once when the dose worker starts: a process-wide change to Faust, never made on import."""
    from faust.tables.recovery import Recovery

    _count_repeated_offsets_in_runs()
    for name in ("on_recovery_completed", "_resume_streams"):
        original: Callable[..., Awaitable[None]] = getattr(Recovery, name)
        if getattr(original, _PATCHED, False):
            continue

        async def around(
            self: Any, generation_id: int = 0, _original: Callable[..., Awaitable[None]] = original
        ) -> None:
            self.app.consumer.stop_flow()  # resumed by the original once its seek is done
            try:
                await _original(self, generation_id=generation_id)
            except BaseException:
                # E.g. its seek timed out and recovery gave up: the flow was running there before this
                # change, so it runs again.
                _resume_flow_unless_rebalanced(self, generation_id)
                raise
            try:
                await _seek_again(self, generation_id)
            except Exception as exc:  # a partition revoked meanwhile: the next assignment seeks again
                log.warning("dose.streams_not_sought_again", generation=generation_id, error=type(exc).__name__)

        setattr(around, _PATCHED, True)
        setattr(Recovery, name, around)
