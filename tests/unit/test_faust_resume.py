"""The dose worker's changes to Faust's offset bookkeeping around a rebalance (stream_apps/faust_resume.py)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from diana.stream_apps import faust_resume
from diana.stream_apps.faust_resume import (
    runs_of_offsets,
    seek_stream_partitions_again,
    stream_partitions_without_offset,
)

CHANGELOG = "diana-dose-dose-patients-changelog"
STREAM = TP("dicom.instances", 2)


def test_only_the_agents_partitions_without_a_committed_offset_go_back_to_the_start():
    assigned = {
        TP("dose.by-patient", 0),  # one message, never committed by the group: the lag of 1
        TP("dose.by-patient", 1),  # committed at 3: sought there by Faust's own seek
        TP("dicom.instances", 0),  # committed at 0 (Faust reads 0 as "none")
        TP(CHANGELOG, 0),  # a table changelog: recovery's business, never committed
        TP("diana-dose-__assignor-__leader", 0),  # Faust's own
    }
    read_offsets = {TP("dose.by-patient", 0): None, TP("dose.by-patient", 1): 3, TP("dicom.instances", 0): None}
    agents_topics = {"dose.by-patient", "dicom.instances"}  # Faust's acking topics
    fresh = stream_partitions_without_offset(assigned, agents_topics.__contains__, read_offsets)
    assert fresh == [TP("dicom.instances", 0), TP("dose.by-patient", 0)]


def test_the_change_to_faust_is_made_once_on_both_resume_paths():
    seek_stream_partitions_again()
    first = (Recovery.on_recovery_completed, Recovery._resume_streams)
    seek_stream_partitions_again()
    assert (Recovery.on_recovery_completed, Recovery._resume_streams) == first
    assert all(getattr(f, "diana_seeks_again", False) for f in first)


def test_a_repeated_offset_stays_in_its_run():
    assert list(runs_of_offsets([4, 5, 5, 6, 8, 8, 9])) == [[4, 5, 5, 6], [8, 8, 9]]
    assert list(runs_of_offsets([7])) == [[7]]
    assert list(runs_of_offsets([])) == []


def _bookkeeping(committed: int, acked: list[int], gap: tuple[int, int] | None = None) -> SimpleNamespace:
    gaps: defaultdict = defaultdict(IntervalTree)
    if gap:
        gaps[STREAM].addi(*gap)
    return SimpleNamespace(
        _acked=defaultdict(list, {STREAM: list(acked)}),
        _acked_index=defaultdict(set, {STREAM: set(acked)}),
        _gap=gaps,
        _committed_offset=defaultdict(lambda: None, {STREAM: committed}),
    )


def test_faust_commits_past_offsets_acknowledged_twice_in_one_step():
    # As traced in the fault suite: 100-140 processed after a seek back to 100, 101-123 also taken
    # for a gap (a batch fetched before the seek was still being handed over).
    seek_stream_partitions_again()
    consumer = _bookkeeping(committed=100, acked=list(range(100, 141)), gap=(101, 124))
    assert Consumer._new_offset(consumer, STREAM) == 141  # Faust's own method: 102 before the change
    assert consumer._acked[STREAM] == []


def test_a_hole_still_holds_the_commit_back():
    seek_stream_partitions_again()
    consumer = _bookkeeping(committed=100, acked=[100, 101, 101, 102, 104, 105])
    assert Consumer._new_offset(consumer, STREAM) == 103  # 103 never acknowledged
    assert consumer._acked[STREAM] == [104, 105]


class _Consumer:
    """What ``_seek_again`` uses of Faust's consumer, recording what happens in which order."""

    def __init__(self, app: SimpleNamespace, committed: dict[TP, int | None]):
        self.app, self.committed, self.calls = app, committed, []
        self.can_resume_flow = asyncio.Event()
        self.flowing = True
        self._read_offset: dict = {}
        self._gap = {STREAM: IntervalTree.from_tuples([(101, 124)])}
        self._acked = {STREAM: [101, 102]}
        self._acked_index = {STREAM: {101, 102}}

    def assignment(self) -> set[TP]:
        return set(self.committed) | {TP(CHANGELOG, 0)}

    def stop_flow(self) -> None:
        self.flowing = False
        self.calls.append("stop_flow")
        # Faust's fetch loop parks on the event a moment later.
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.can_resume_flow.wait()))

    def resume_flow(self) -> None:
        self.flowing = True
        self.calls.append("resume_flow")

    async def perform_seek(self) -> None:
        assert not self.flowing and self.can_resume_flow._waiters, "sought while the fetch loop hands over"
        self._read_offset.update(self.committed)
        self.calls.append("perform_seek")

    async def seek(self, tp: TP, offset: int) -> None:
        assert not self.flowing
        self._read_offset[tp] = offset or None
        self.calls.append(f"seek {tp.topic}/{tp.partition} {offset}")


def _recovery(committed: dict[TP, int | None], generation_after_seek: int = 7) -> SimpleNamespace:
    app = SimpleNamespace(consumer_generation_id=7, topics=SimpleNamespace(acks_enabled_for=lambda t: t != CHANGELOG))
    app.consumer = _Consumer(app, committed)
    if generation_after_seek != 7:
        seek = app.consumer.perform_seek

        async def seek_then_rebalance() -> None:
            await seek()
            app.consumer_generation_id = generation_after_seek

        app.consumer.perform_seek = seek_then_rebalance
    return SimpleNamespace(app=app, should_stop=False)


def test_the_streams_are_sought_again_with_the_flow_stopped_and_their_acknowledgements_dropped():
    recovery = _recovery({STREAM: 100, TP("dose.by-patient", 0): None})
    asyncio.run(faust_resume._seek_again(recovery, 7))
    consumer = recovery.app.consumer
    assert consumer.calls == ["stop_flow", "perform_seek", "seek dose.by-patient/0 0", "resume_flow"]
    assert consumer._gap == {} and consumer._acked == {} and consumer._acked_index == {}


def test_the_flow_stays_stopped_for_a_rebalance_that_began_meanwhile():
    recovery = _recovery({STREAM: 100}, generation_after_seek=8)
    asyncio.run(faust_resume._seek_again(recovery, 7))
    assert recovery.app.consumer.calls == ["stop_flow", "perform_seek"]  # the new recovery resumes it


def test_a_waiter_woken_by_the_last_resume_is_not_a_parked_fetch_loop():
    async def scenario() -> tuple[bool, float]:
        consumer = SimpleNamespace(can_resume_flow=asyncio.Event())
        woken = asyncio.get_running_loop().create_future()
        woken.set_result(True)  # resumed, its task not run yet: still in the event's list
        consumer.can_resume_flow._waiters.append(woken)
        loop = asyncio.get_running_loop()
        began = loop.time()
        loop.call_later(0.1, lambda: asyncio.ensure_future(consumer.can_resume_flow.wait()))
        parked = await faust_resume._fetch_loop_parked(consumer, timeout_s=2.0)
        return parked, loop.time() - began

    parked, waited = asyncio.run(scenario())
    assert parked and waited >= 0.1  # only the loop's next wait counted


def test_the_flow_runs_again_when_faust_s_recovery_gives_up():
    from faust.tables.recovery import ServiceStopped

    seek_stream_partitions_again()
    calls: list[str] = []

    async def stopped() -> None:
        raise ServiceStopped()  # as when its seek timed out: recovery stops for good

    consumer = SimpleNamespace(stop_flow=lambda: calls.append("stop_flow"), resume_flow=lambda: calls.append("resume"))
    app = SimpleNamespace(
        consumer=consumer, consumer_generation_id=3, on_rebalance_complete=SimpleNamespace(send=stopped)
    )
    recovery = SimpleNamespace(app=app, should_stop=False, log=SimpleNamespace(info=lambda *a, **k: None))
    try:
        asyncio.run(Recovery.on_recovery_completed(recovery, generation_id=3))
    except ServiceStopped:
        pass
    else:
        raise AssertionError("the recovery's own error is raised")
    assert calls == ["stop_flow", "resume"]  # not left stopped: the worker would look alive and do nothing
