"""The dose worker seeks its stream partitions again once Faust has resumed them (stream_apps/faust_resume.py)."""

from __future__ import annotations

from faust.tables.recovery import Recovery
from faust.types import TP

from diana.stream_apps.faust_resume import seek_stream_partitions_again, stream_partitions_without_offset

CHANGELOG = "diana-dose-dose-patients-changelog"


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
