"""Unit: how `diana reindex` shares partitions among its catch-up processes."""

from __future__ import annotations

from diana.operations.reindex import share_out


def test_every_busy_partition_goes_to_exactly_one_process_and_loads_are_balanced():
    work = {("dicom.instances", 0): 900, ("dicom.instances", 1): 500, ("dicom.instances", 2): 400}
    work |= {("dicom.series", 0): 100, ("dicom.series", 1): 0}
    shares = share_out(work, 2)
    assert len(shares) == 2
    assigned = [tp for share in shares for tp in share]
    assert sorted(assigned) == sorted(tp for tp, n in work.items() if n > 0)  # the empty partition is nobody's
    loads = sorted(sum(work[tp] for tp in share) for share in shares)
    assert loads == [900, 1000]


def test_no_more_processes_than_partitions_with_events():
    work = {("dicom.instances", 0): 10, ("dicom.instances", 1): 0, ("dicom.instances", 2): 0}
    assert share_out(work, 4) == [[("dicom.instances", 0)]]
    assert share_out({("dicom.instances", 0): 0}, 4) == []


def test_too_few_events_for_another_process_stay_in_fewer_shares():
    work = {("dicom.instances", p): 2_000 for p in range(3)}  # 6,000 events
    assert len(share_out(work, 2, min_events=10_000)) == 1  # not worth a second process's start-up
    assert len(share_out(work, 2, min_events=3_000)) == 2
    assert len(share_out(work, 4, min_events=1_000)) == 3  # still no more than the busy partitions
    assert sorted(tp for share in share_out(work, 2, min_events=10_000) for tp in share) == sorted(work)


def test_the_help_states_the_events_per_process_the_command_uses():
    # The CLI does not import the reindex module to declare its options (it pulls in Kafka and
    # OpenSearch's clients): the number in the help is written out, and must stay the constant's.
    from diana.cli import build_parser
    from diana.operations.reindex import MIN_EVENTS_PER_PROCESS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = next(a.help for a in sub.choices["reindex"]._actions if a.dest == "processes")
    assert f"{MIN_EVENTS_PER_PROCESS:,} events" in help_text
