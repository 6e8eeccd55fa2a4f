"""Unit: the aggregates worker's bounded state, without a broker.

The handler folds real encoded events into a real ``Batch``; the transactional producer is replaced
by a recorder of what would be written (as in test_transactional_state.py), so the changelog a
restart would read is checked too: a completed series keeps a digest instead of one ``seen`` entry
per instance, a complete study leaves the state after the retention (tombstones), and a later
instance of it is dead-lettered, before and after a restart.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Message

from diana.schemas.codec import default_codec
from diana.schemas.topics import DEADLETTER, INSTANCES
from diana.stream_apps import digest as digest_module
from diana.stream_apps.aggregate_fold import number_runs, numbers_of_runs
from diana.stream_apps.aggregates import (
    COLD,
    DIGEST,
    GONE_SERIES,
    GONE_STUDY,
    OPEN,
    RETIRE,
    SEEN,
    SERIES_IN_TWO_STUDIES,
    SERIES_IN_TWO_STUDIES_REASON,
    SERIES_STATE,
    STUDY_STATE,
    AggregatesHandler,
)
from diana.stream_apps.batch import Batch, _Store
from diana.stream_apps.completeness import QuietTimes
from diana.stream_apps.digest import PART_ENTRIES, digest_build, digest_count, digest_part
from diana.stream_apps.local_state import Checkpoint, LocalStates
from diana.stream_apps.series_digest import PARTS_MISSING, delete_digest, lookup_digest, read_digest, write_digest
from diana.stream_apps.state_store import StateStore

CHANGELOG = "agg-state-changelog"
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
RETENTION_S = 60


class Recorder:
    """Stands in for the transactional producer: keeps what would be written, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, int | None, dict | None]] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        self.records.append((topic, key, value, partition, headers))

    def on(self, topic: str) -> list[tuple]:
        return [r for r in self.records if r[0] == topic]


class Worker:
    """One handler and its committed state, fed one message per transaction."""

    def __init__(self, store: _Store | None = None) -> None:
        self.store = store or _Store()
        self.producer = Recorder()
        self.handler = AggregatesHandler(QuietTimes.parse("*=4"), retention_days=RETENTION_S / 86400)
        self.handler.partition_started(0, {INSTANCES.name: 0}, self.store.partitions.setdefault(0, {}))
        self.offset = 0

    def feed(self, *events: dict) -> None:
        """The events in one transaction."""
        batch = Batch(self.store, self.producer, CHANGELOG)
        for event in events:
            value = default_codec().encode(INSTANCES.value_schema, event)
            stamp = int(event["received_at"].timestamp() * 1000)
            message = Message(topic=INSTANCES.name, partition=0, offset=self.offset, value=value, timestamp=(2, stamp))
            self.offset += 1
            self.handler.handle(batch, message)
            batch.message_done()
        batch.send_latest()
        batch.write_changelog()
        batch.commit_locally()

    def space(self, namespace: str) -> dict:
        return self.store.partitions[0].get(namespace, {})


def _event(study: str, series: str, number: int, seconds: float, sop: str | None = None) -> dict:
    return {
        "sop_instance_uid": sop or f"{series}.{number}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 100,
        "sha256": "a" * 64,
        "landing_path": "00/x.dcm",
        "received_at": T0 + timedelta(seconds=seconds),
        "source": "C_STORE",
        "modality": "CT",
        "instance_number": number,
        "patient_id": "P",
    }


def _replay(records) -> _Store:
    store = _Store()
    for topic, key, value, partition, _ in records:
        if topic == CHANGELOG:
            store.apply(partition, key.decode(), None if value is None else json.loads(value))
    return store


def test_a_completed_series_keeps_a_digest_and_counts_re_sends_and_late_instances_once():
    w = Worker()
    for n in (1, 2, 3):
        w.feed(_event("9.1", "9.1.1", n, n))
    assert len(w.space(SEEN)) == 3
    w.feed(_event("9.2", "9.2.1", 1, 10))  # another study: moves the watermark past 3 + 4 s
    assert w.space(SERIES_STATE)["9.1.1"]["status"] == "COMPLETED"
    assert set(w.space(SEEN)) == {"9.2.1.1"}  # the completed series' entries are gone...
    assert digest_count(w.space(DIGEST)["9.1.1"]) == 3  # ...into its digest
    tombstones = {r[1] for r in w.producer.on(CHANGELOG) if r[2] is None}
    assert {b"seen/9.1.1.1", b"seen/9.1.1.2", b"seen/9.1.1.3"} <= tombstones

    w.feed(_event("9.1", "9.1.1", 2, 11))  # a re-send of instance 2: found in the digest
    assert w.space(SERIES_STATE)["9.1.1"]["instance_count"] == 3
    assert "9.1.1" not in w.space(OPEN)
    w.feed(_event("9.1", "9.1.1", 4, 12))  # a late new instance: counted, the series reopens
    assert w.space(SERIES_STATE)["9.1.1"]["instance_count"] == 4
    w.feed(_event("9.2", "9.2.1", 2, 20))
    series = w.space(SERIES_STATE)["9.1.1"]
    assert (series["status"], series["version"], series["instance_count"]) == ("AMENDED", 2, 4)
    assert digest_count(w.space(DIGEST)["9.1.1"]) == 4
    # The study is scheduled to leave the state a retention after its last completion (16 s).
    assert w.space(RETIRE)["9.1"] == int((T0 + timedelta(seconds=16 + RETENTION_S)).timestamp() * 1000)


def test_after_the_retention_a_study_leaves_the_state_and_a_late_instance_is_dead_lettered_even_after_a_restart():
    w = Worker()
    for n in (1, 2):
        w.feed(_event("9.1", "9.1.1", n, n))
    w.feed(_event("9.2", "9.2.1", 1, 10))
    assert w.space(STUDY_STATE)["9.1"]["status"] == "COMPLETED"
    w.feed(_event("9.2", "9.2.1", 2, 6 + RETENTION_S - 1))  # a second before the retention ends
    assert "9.1" in w.space(STUDY_STATE)
    w.feed(_event("9.2", "9.2.1", 3, 6 + RETENTION_S))  # the watermark reaches it: study 9.1 leaves
    for namespace, key in ((STUDY_STATE, "9.1"), (SERIES_STATE, "9.1.1"), (DIGEST, "9.1.1"), (RETIRE, "9.1")):
        assert key not in w.space(namespace), namespace
    assert w.space(GONE_STUDY) == {"9.1": int((T0 + timedelta(seconds=6 + RETENTION_S)).timestamp() * 1000)}
    assert set(w.space(GONE_SERIES)) == {"9.1.1"}
    tombstones = {r[1] for r in w.producer.on(CHANGELOG) if r[2] is None}
    assert {b"study/9.1", b"series/9.1.1", b"digest/9.1.1", b"retire/9.1"} <= tombstones
    before = len(w.producer.records)

    w.feed(_event("9.1", "9.1.1", 3, 200))  # late, after the retention
    w.feed(_event("9.1", "9.1.9", 1, 201))  # a new series of the retired study
    letters = w.producer.on(DEADLETTER.name)
    assert len(letters) == 2
    assert all(b"state_retention_days" in r[4]["reason"] for r in letters)
    assert "9.1.1" not in w.space(SERIES_STATE) and "9.1" not in w.space(STUDY_STATE)
    # Nothing published for the retired study (9.2's own revisions follow, moved by the watermark).
    published = {r[1] for r in w.producer.records[before:] if r[0] in ("dicom.series", "dicom.studies")}
    assert published == {b"9.2", b"9.2.1"}

    # A restart rebuilds the state from the changelog: the markers come back, the study does not.
    again = Worker(_replay(w.producer.records))
    assert again.space(STUDY_STATE).keys() == w.space(STUDY_STATE).keys()
    assert again.space(GONE_STUDY) == w.space(GONE_STUDY)
    again.feed(_event("9.1", "9.1.1", 5, 300))
    assert len(again.producer.on(DEADLETTER.name)) == 1
    assert "9.1.1" not in again.space(SERIES_STATE)


def test_a_restart_rebuilds_the_open_series_index_so_completion_still_compacts():
    w = Worker()
    for n in (1, 2, 3):
        w.feed(_event("9.1", "9.1.1", n, n))
    again = Worker(_replay(w.producer.records))
    again.feed(_event("9.2", "9.2.1", 1, 20))
    assert again.space(SERIES_STATE)["9.1.1"]["status"] == "COMPLETED"
    assert set(again.space(SEEN)) == {"9.2.1.1"}
    assert digest_count(again.space(DIGEST)["9.1.1"]) == 3


def test_a_study_reopened_by_a_late_instance_is_not_retired_until_it_completes_again():
    w = Worker()
    w.feed(_event("9.1", "9.1.1", 1, 0))
    w.feed(_event("9.2", "9.2.1", 1, 5))  # 9.1 completes at 4 s: retire at 64 s
    w.feed(_event("9.1", "9.1.1", 2, 63))  # late, reopens 9.1.1 (deadline 67 s)
    w.feed(_event("9.2", "9.2.1", 2, 65))  # watermark past 64 s: the study is open, it stays
    assert "9.1" in w.space(STUDY_STATE)
    w.feed(_event("9.2", "9.2.1", 3, 68))  # 9.1.1 amended at 67 s: retire at 127 s
    assert w.space(SERIES_STATE)["9.1.1"]["status"] == "AMENDED"
    assert w.space(RETIRE)["9.1"] == int((T0 + timedelta(seconds=67 + RETENTION_S)).timestamp() * 1000)


def test_instance_numbers_of_a_completed_series_are_kept_as_runs_and_a_late_instance_expands_them():
    assert number_runs([1, 2, 3, 5, 7, 8]) == [[1, 3], [5, 5], [7, 8]]
    assert numbers_of_runs([[1, 3], [5, 5], [7, 8]]) == [1, 2, 3, 5, 7, 8]
    w = Worker()
    for n in (1, 2, 3, 5):
        w.feed(_event("9.1", "9.1.1", n, n))
    w.feed(_event("9.2", "9.2.1", 1, 20))
    series = w.space(SERIES_STATE)["9.1.1"]
    assert (series["verdict"], series["missing_instance_numbers"]) == ("GAPS", [4])
    assert (series["instance_numbers"], series["instance_number_runs"]) == ([], [[1, 3], [5, 5]])
    w.feed(_event("9.1", "9.1.1", 4, 21))  # the missing one, late
    w.feed(_event("9.2", "9.2.1", 2, 30))
    series = w.space(SERIES_STATE)["9.1.1"]
    assert (series["status"], series["verdict"], series["missing_instance_numbers"]) == ("AMENDED", "COMPLETE", [])
    assert (series["instance_numbers"], series["instance_number_runs"]) == ([], [[1, 5]])
    assert (series["min_instance_number"], series["max_instance_number"]) == (1, 5)


def test_the_completion_check_walks_the_open_series_only_when_one_may_be_due_and_misses_none():
    """The handler's floor of open deadlines (open_floor): an instance before it does not walk the open
    series; a series opened later with an earlier deadline (an instance received out of order), and
    one put back by a failed message, are completed at their deadlines all the same."""
    w = Worker()
    walked = []
    items = Batch.items

    def counting(self, partition, namespace):
        walked.append(namespace)
        return items(self, partition, namespace)

    Batch.items = counting  # type: ignore[method-assign]
    try:
        w.feed(_event("8.1", "8.1.1", 1, 10))  # deadline 14
        walked.clear()
        w.feed(_event("8.1", "8.1.1", 2, 11))  # deadline 15; watermark 11 < floor 14: no walk
        w.feed(_event("8.2", "8.2.1", 1, 5))  # out of order: deadline 9, the floor goes down
        assert walked == []
        w.feed(_event("8.3", "8.3.1", 1, 12))  # watermark 12 >= 9: walked, 8.2.1 completed
        assert walked == [OPEN]
        assert w.space(SERIES_STATE)["8.2.1"]["status"] == "COMPLETED"
        assert w.space(SERIES_STATE)["8.1.1"]["status"] == "UPDATED"

        # A message whose handling fails after its check completed a series: the loop undoes it
        # (message_failed), the series is open again, and the next check still finds it due.
        batch = Batch(w.store, w.producer, CHANGELOG)
        value = default_codec().encode(INSTANCES.value_schema, _event("8.4", "8.4.1", 1, 16))
        failing = Message(topic=INSTANCES.name, partition=0, offset=w.offset, value=value, timestamp=(2, 0))
        w.offset += 1
        original = w.handler._publish
        w.handler._publish = lambda *a: (_ for _ in ()).throw(RuntimeError("test"))  # type: ignore[method-assign]
        try:
            with pytest.raises(RuntimeError):
                w.handler.handle(batch, failing)
        finally:
            w.handler._publish = original  # type: ignore[method-assign]
        batch.message_failed()
        assert w.space(SERIES_STATE)["8.1.1"]["status"] == "UPDATED" and "8.1.1" in w.space(OPEN)
        w.feed(_event("8.3", "8.3.1", 2, 16))
        assert w.space(SERIES_STATE)["8.1.1"]["status"] == "COMPLETED"
    finally:
        Batch.items = items  # type: ignore[method-assign]


def _completed_series(w: Worker, instances: int) -> None:
    w.feed(*(_event("9.1", "9.1.1", n, n / 1000, sop=f"9.1.1.{n}") for n in range(1, instances + 1)))
    w.feed(_event("9.2", "9.2.1", 1, 20))  # moves the watermark: 9.1.1 completes


def test_a_digest_written_in_one_key_by_the_previous_version_is_read_and_amended_into_parts(monkeypatch):
    """State written before digests were split: ``digest/<series>`` holds every instance, however many."""
    monkeypatch.setattr(digest_module, "PART_ENTRIES", 10**9)  # the previous version: never split
    w = Worker()
    _completed_series(w, PART_ENTRIES + 100)
    old = w.space(DIGEST)["9.1.1"]
    assert isinstance(old, str) and digest_count(old) == PART_ENTRIES + 100
    monkeypatch.undo()

    again = Worker(_replay(w.producer.records))
    again.feed(_event("9.1", "9.1.1", 7, 30, sop="9.1.1.7"))  # a re-send: found in the one-key digest
    assert again.space(SERIES_STATE)["9.1.1"]["instance_count"] == PART_ENTRIES + 100
    again.feed(_event("9.1", "9.1.1", 0, 31, sop="9.1.1.new"))  # a late new one: amends
    again.feed(_event("9.2", "9.2.1", 2, 40))
    assert again.space(SERIES_STATE)["9.1.1"]["status"] == "AMENDED"
    index = again.space(DIGEST)["9.1.1"]
    assert index["parts"] == 2 and len(index["from"]) == 1
    parts = [again.space(DIGEST)[f"9.1.1/{p}"] for p in range(2)]
    assert [digest_count(p) for p in parts] == [PART_ENTRIES, 101]
    for n in (1, 7, PART_ENTRIES + 100):
        again.feed(_event("9.1", "9.1.1", n, 41, sop=f"9.1.1.{n}"))  # re-sends, found in their parts
    assert again.space(SERIES_STATE)["9.1.1"]["instance_count"] == PART_ENTRIES + 101
    assert "9.1.1" not in again.space(OPEN)
    # The replayed changelog rebuilds the parts (keys digest/<series>/<n>) as they are in memory.
    assert (
        _replay(again.producer.records).partitions[0][DIGEST]
        == _replay(w.producer.records + again.producer.records).partitions[0][DIGEST]
        == again.space(DIGEST)
    )


def test_the_parts_of_a_digest_on_local_disk_only_are_found_and_deleted(tmp_path):
    """Cold state (state_store.py): the index and parts leave memory once in the local file, a
    lookup reads them back from it, and a retirement writes a tombstone for each."""
    local = LocalStates(tmp_path, CHANGELOG, COLD)
    store = StateStore(local, COLD)
    assert local.replace(0, {}, Checkpoint(0, 1))
    store.backed.add(0)
    producer = Recorder()
    uids = [f"1.2.826.0.1.3680043.10.98.{i}" for i in range(2 * PART_ENTRIES + 5)]
    batch = Batch(store, producer, CHANGELOG)
    write_digest(batch, 0, "9.1.1", digest_build((uid, "ab" * 32, 10) for uid in uids))
    batch.write_changelog()
    batch.commit_locally()
    assert local.write(0, batch.encoded[0], Checkpoint(len(producer.records), 1), encoded=True)
    store.evict(0)
    assert DIGEST not in store.partitions[0]
    later = Batch(store, producer, CHANGELOG)
    assert all(lookup_digest(later, 0, "9.1.1", uid) == ("abababab", 10) for uid in uids[:: PART_ENTRIES // 7])
    assert lookup_digest(later, 0, "9.1.1", "1.2.826.0.1.3680043.10.99.1") is None
    assert digest_count(read_digest(later, 0, "9.1.1")) == len(uids)
    delete_digest(later, 0, "9.1.1")
    later.write_changelog()
    assert {r[1] for r in producer.records[-4:] if r[2] is None} == {
        b"digest/9.1.1",
        b"digest/9.1.1/0",
        b"digest/9.1.1/1",
        b"digest/9.1.1/2",
    }


def test_a_new_instance_of_a_series_counted_under_another_study_is_dead_lettered_and_both_studies_stay_right():
    """The auditor's series_two_studies.py: the series state is one per SeriesInstanceUID, so the
    second study got the series while its completion updated the first, and never completed."""
    before = SERIES_IN_TWO_STUDIES._value.get()
    w = Worker()
    w.feed(_event("1.2.3", "1.2.3.9", 1, 1))
    w.feed(_event("1.2.4", "1.2.3.9", 2, 2))  # the same series UID under another study
    (letter,) = w.producer.on(DEADLETTER.name)
    assert (
        letter[4]["reason"] == SERIES_IN_TWO_STUDIES_REASON.encode() and letter[4]["origin"] == b"dicom.instances/0/1"
    )
    assert b"1.2.3" not in letter[4]["reason"] and b"1.2.4" not in letter[4]["reason"]
    assert SERIES_IN_TWO_STUDIES._value.get() == before + 1
    assert "1.2.4" not in w.space(STUDY_STATE) and "1.2.3.9.2" not in w.space(SEEN)
    assert w.space(SERIES_STATE)["1.2.3.9"]["instance_count"] == 1
    published = {r[1] for r in w.producer.records if r[0] in ("dicom.series", "dicom.studies")}
    assert b"1.2.4" not in published

    w.feed(_event("1.2.3", "1.2.3.9", 3, 3))  # the series' own study goes on as usual
    w.feed(_event("7.7.7", "7.7.7.1", 1, 20))  # the watermark passes: the series and its study complete
    study = w.space(STUDY_STATE)["1.2.3"]
    assert (study["status"], study["series_count"], study["completed_series_count"], study["instance_count"]) == (
        "COMPLETED",
        1,
        1,
        2,
    )
    w.feed(_event("1.2.4", "1.2.4.1", 1, 21))  # the other study's own series: a study of its own
    w.feed(_event("7.7.7", "7.7.7.1", 2, 30))
    assert w.space(STUDY_STATE)["1.2.4"]["status"] == "COMPLETED"
    assert w.space(STUDY_STATE)["1.2.4"]["series_instance_uids"] == ["1.2.4.1"]
    w.feed(_event("1.2.4", "1.2.3.9", 4, 31))  # a completed series: still refused
    assert len(w.producer.on(DEADLETTER.name)) == 2
    assert w.space(SERIES_STATE)["1.2.3.9"]["instance_count"] == 2


def test_a_corrected_re_send_naming_another_study_changes_neither_study():
    w = Worker()
    w.handler.replace = True
    w.feed(_event("1.2.3", "1.2.3.9", 1, 1))
    w.feed(_event("1.2.4", "1.2.4.1", 1, 2))
    corrected = _event("1.2.4", "1.2.3.9", 1, 3)  # instance 1 of 1.2.3.9 again, other bytes, under 1.2.4
    corrected["sha256"], corrected["size_bytes"] = "b" * 64, 5000
    w.feed(corrected)
    assert w.space(STUDY_STATE)["1.2.4"]["total_bytes"] == 100
    assert w.space(STUDY_STATE)["1.2.3"]["total_bytes"] == w.space(SERIES_STATE)["1.2.3.9"]["total_bytes"] == 100


def test_a_corrected_re_send_naming_another_series_of_the_same_study_changes_no_series(capsys):
    """The reviewer's test_replace_other_series.py: the copy's size went into the series it named,
    one it was never counted in; and the log line named the instance by its UID."""
    w = Worker()
    w.handler.replace = True
    w.feed(_event("1.2.3", "1.2.3.4", 1, 1), _event("1.2.3", "1.2.3.5", 2, 2))
    corrected = _event("1.2.3", "1.2.3.5", 1, 3, sop="1.2.3.4.1")  # instance 1 of 1.2.3.4, naming 1.2.3.5
    corrected["sha256"], corrected["size_bytes"] = "b" * 64, 5000
    w.feed(corrected)
    assert w.space(SERIES_STATE)["1.2.3.4"]["total_bytes"] == w.space(SERIES_STATE)["1.2.3.5"]["total_bytes"] == 100
    assert w.space(STUDY_STATE)["1.2.3"]["total_bytes"] == 200
    assert w.space(SEEN)["1.2.3.4.1"][1] == "a" * 16  # still counted with its first bytes
    logged = capsys.readouterr().out
    assert "replace.elsewhere" in logged and "origin=dicom.instances/0/2" in logged
    assert "1.2.3.4.1" not in logged


def test_a_digest_part_the_index_names_but_the_state_lacks_is_read_as_empty_said_and_counted(capsys):
    """Ending the worker on it was a crash loop (its restart loads the same local file and meets the
    same event); it is read as empty, with a warning and a counter, and the other parts still answer."""
    w = Worker()
    _completed_series(w, PART_ENTRIES + 100)
    del w.space(DIGEST)["9.1.1/1"]
    head = w.space(DIGEST)["9.1.1"]
    uids = [f"9.1.1.{n}" for n in range(1, PART_ENTRIES + 101)]
    in_part_one = next(u for u in uids if digest_part(head, u) == 1)
    in_part_zero = next(u for u in uids if digest_part(head, u) == 0)
    batch = Batch(w.store, w.producer, CHANGELOG)
    before = PARTS_MISSING._value.get()
    capsys.readouterr()  # the completion's own lines name the series
    assert lookup_digest(batch, 0, "9.1.1", in_part_one) is None
    assert lookup_digest(batch, 0, "9.1.1", in_part_zero) is not None
    assert read_digest(batch, 0, "9.1.1") == w.space(DIGEST)["9.1.1/0"]
    assert PARTS_MISSING._value.get() == before + 2
    logged = capsys.readouterr().out
    assert "digest.part_missing" in logged and "parts=2" in logged and "9.1.1" not in logged
