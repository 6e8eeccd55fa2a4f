"""Cold namespaces on local disk only (stream_apps/state_store.py), without a broker.

What the store must promise: an entry leaves memory only once its committed value is in the file;
a read of an evicted entry gives that value; a deletion of an evicted entry writes its tombstone
and hides the file's value until the file has the deletion; after a failed write nothing leaves
memory; the restore leaves cold namespaces in the file and keeps a tail's deletions of them.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from diana.stream_apps.batch import Batch
from diana.stream_apps.local_state import Checkpoint, LocalStateError, LocalStates, PartitionFile
from diana.stream_apps.state_restore import apply_record
from diana.stream_apps.state_store import StateStore

COLD = frozenset({"series", "digest"})


class ChangelogRecorder:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        self.records.append((topic, key, value, partition))


def _commit(store: StateStore, local: LocalStates, producer: ChangelogRecorder, batch: Batch) -> bool:
    """What the loop does after the broker's commit: memory, then the file, then the eviction."""
    batch.write_changelog()
    batch.commit_locally()
    written = local.write(0, batch.encoded.get(0, []), Checkpoint(len(producer.records), 1), encoded=True)
    if written:
        store.evict(0)
    return written


def _backed_store(tmp_path) -> tuple[StateStore, LocalStates, ChangelogRecorder]:
    local = LocalStates(tmp_path, "state", COLD)
    store = StateStore(local, COLD)
    assert local.replace(0, {}, Checkpoint(0, 1))  # as a restore leaves it: the file holds the state
    store.backed.add(0)
    return store, local, ChangelogRecorder()


def test_a_committed_cold_entry_leaves_memory_and_is_read_back_from_the_file(tmp_path):
    store, local, producer = _backed_store(tmp_path)
    batch = Batch(store, producer, "state")
    batch.put(0, "series", "1.2", {"instance_count": 3, "status": "COMPLETED"})
    batch.put(0, "digest", "1.2", "AAAA")
    batch.put(0, "open", "1.3", 1000)
    assert _commit(store, local, producer, batch)
    assert store.partitions[0] == {"open": {"1.3": 1000}}  # hot stays, cold left memory
    later = Batch(store, producer, "state")
    assert later.get(0, "series", "1.2") == {"instance_count": 3, "status": "COMPLETED"}
    assert later.get(0, "digest", "1.2") == "AAAA"
    assert later.get(0, "series", "9.9") is None


def test_deleting_an_evicted_entry_writes_its_tombstone_and_hides_the_file_until_written(tmp_path):
    store, local, producer = _backed_store(tmp_path)
    first = Batch(store, producer, "state")
    first.put(0, "series", "1.2", {"n": 1})
    assert _commit(store, local, producer, first)
    second = Batch(store, producer, "state")
    second.delete(0, "series", "1.2")
    second.write_changelog()
    assert producer.records[-1] == ("state", b"series/1.2", None, 0)  # only in the file, still deleted
    second.commit_locally()
    assert store.get(0, "series", "1.2") is None  # the file still has it: memory says deleted
    assert local.file(0).lookup("series", "1.2") == {"n": 1}
    local.write(0, second.encoded[0], Checkpoint(len(producer.records), 1), encoded=True)
    store.evict(0)
    assert local.file(0).lookup("series", "1.2") is None and store.get(0, "series", "1.2") is None


def test_after_a_failed_write_nothing_leaves_memory_and_reads_stay_right(tmp_path):
    store, local, producer = _backed_store(tmp_path)
    first = Batch(store, producer, "state")
    first.put(0, "series", "a", {"n": 1})
    first.put(0, "series", "b", {"n": 1})
    assert _commit(store, local, producer, first)
    local.suspend(0, "disk full (test)")  # the next writes fail: the file stays the older snapshot
    second = Batch(store, producer, "state")
    second.put(0, "series", "a", {"n": 2})
    second.delete(0, "series", "b")
    assert not _commit(store, local, producer, second)
    assert store.partitions[0]["series"] == {"a": {"n": 2}, "b": None}  # kept, deletion included
    third = Batch(store, producer, "state")
    assert (third.get(0, "series", "a"), third.get(0, "series", "b")) == ({"n": 2}, None)


def test_a_store_without_a_backing_file_keeps_everything_in_memory(tmp_path):
    store, producer = StateStore(None, COLD), ChangelogRecorder()
    batch = Batch(store, producer, "state")
    batch.put(0, "series", "a", {"n": 1})
    batch.write_changelog()
    batch.commit_locally()
    store.evict(0)
    assert store.partitions[0] == {"series": {"a": {"n": 1}}}
    gone = Batch(store, producer, "state")
    gone.delete(0, "series", "a")
    gone.commit_locally()
    assert store.partitions[0] == {"series": {}}  # no None left behind without a file


def test_a_load_leaves_cold_namespaces_in_the_file_and_a_damaged_row_is_refused_when_read(tmp_path):
    file = PartitionFile(tmp_path / "p0.sqlite", "state", 0)
    file.write([("series", "a", {"n": 1}), ("seen", "x", [1]), ("digest", "a", "AAAA")], Checkpoint(3, 1))
    assert file.load(skip=COLD) == (Checkpoint(3, 1), {"seen": {"x": [1]}})
    assert file.load()[1] == {"series": {"a": {"n": 1}}, "seen": {"x": [1]}, "digest": {"a": "AAAA"}}
    file.close()
    with closing(sqlite3.connect(tmp_path / "p0.sqlite")) as db, db:
        db.execute("UPDATE state SET value = '{\"n\":2}' WHERE namespace = 'series'")
    with pytest.raises(LocalStateError, match="damaged"):
        PartitionFile(tmp_path / "p0.sqlite", "state", 0).lookup("series", "a")


def test_a_tail_read_over_a_loaded_file_keeps_its_deletions_of_cold_entries():
    state: dict = {"seen": {"x": [1]}}
    apply_record(state, "series/a", None, COLD)  # a key the file holds: hidden until written back
    apply_record(state, "seen/x", None, COLD)
    apply_record(state, "digest/b", "BBBB", COLD)
    assert state == {"seen": {}, "series": {"a": None}, "digest": {"b": "BBBB"}}
    full: dict = {"series": {"a": {"n": 1}}}
    apply_record(full, "series/a", None)  # a full read: nothing under it
    assert full == {"series": {}}
