"""The aggregates worker's local state files (stream_apps/local_state.py), without a broker.

What a file must promise: its content is exactly the state at its checkpoint, a crash mid-write
leaves the previous checkpoint and content, a damaged file is refused, and a tail that cannot be
trusted (beyond the changelog, deleted, older than delete.retention.ms) is refused.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diana.stream_apps.batch import Batch, _Store
from diana.stream_apps.local_state import Checkpoint, LocalStateError, LocalStates, PartitionFile, tail_refusal

HOUR = 3_600_000


class ChangelogRecorder:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def produce(self, topic, key=None, value=None, partition=None, headers=None, on_delivery=None) -> None:
        self.records.append((topic, key, value, partition))


def test_tail_refusal_names_each_reason_and_trusts_a_young_checkpoint():
    now = 10 * HOUR
    young, old = Checkpoint(50, now - 10 * 60_000), Checkpoint(50, now - 2 * HOUR)
    assert tail_refusal(young, 0, 80, now, HOUR) is None
    assert tail_refusal(young, 0, 49, now, HOUR) == "beyond_end"
    assert tail_refusal(young, 51, 80, now, HOUR) == "before_log_start"
    assert tail_refusal(old, 0, 80, now, HOUR) == "older_than_delete_retention"
    # Nothing appended since the checkpoint: no tombstone can be missing, however old it is.
    assert tail_refusal(old, 0, 50, now, HOUR) is None
    # The margin: 10 % of delete.retention.ms (at least a minute) before it runs out.
    assert tail_refusal(Checkpoint(50, now - 55 * 60_000), 0, 80, now, HOUR) == "older_than_delete_retention"
    assert tail_refusal(Checkpoint(50, now - 53 * 60_000), 0, 80, now, HOUR) is None
    assert tail_refusal(young, 0, 80, now, None) == "delete_retention_unknown"


def test_a_file_holds_exactly_what_the_committed_batches_left_in_memory(tmp_path):
    store, producer = _Store(), ChangelogRecorder()
    file = PartitionFile(tmp_path / "p0.sqlite", "state", 0)
    first = Batch(store, producer, "state")
    first.put(0, "series", "1.2.3", {"instance_count": 1})
    first.put(0, "seen", "9.9", [7, "ab", 100, "1.2.3"])
    first.put(0, "open", "1.2.3", 1000)
    first.commit_locally()
    file.write(first.changes(0), Checkpoint(3, 1))

    second = Batch(store, producer, "state")
    second.put(0, "series", "1.2.3", {"instance_count": 2})
    second.delete(0, "seen", "9.9")
    second.delete(0, "open", "1.2.3")
    second.put(0, "digest", "1.2.3", "AAAA")
    second.commit_locally()
    file.write(second.changes(0), Checkpoint(8, 2))
    file.close()

    checkpoint, state = PartitionFile(tmp_path / "p0.sqlite", "state", 0).load()
    assert checkpoint == Checkpoint(8, 2)
    assert {ns: space for ns, space in store.partitions[0].items() if space} == state
    assert state == {"series": {"1.2.3": {"instance_count": 2}}, "digest": {"1.2.3": "AAAA"}}


def test_replace_writes_a_whole_state_into_a_new_file(tmp_path):
    file = PartitionFile(tmp_path / "p1.sqlite", "state", 1)
    file.write([("seen", "x", 1), ("seen", "y", 2)], Checkpoint(5, 1))
    file.replace({"series": {"s": {"n": 1}}, "clock": {"watermark": 9}}, Checkpoint(40, 2))
    assert file.load() == (Checkpoint(40, 2), {"series": {"s": {"n": 1}}, "clock": {"watermark": 9}})


def test_missing_damaged_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(LocalStateError, match="no_local_state"):
        PartitionFile(tmp_path / "none.sqlite", "state", 0).load()

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all " * 300)
    with pytest.raises(LocalStateError, match="damaged"):
        PartitionFile(garbage, "state", 0).load()

    path = tmp_path / "p2.sqlite"
    file = PartitionFile(path, "state", 2)
    file.write([("series", "s", {"instance_count": 3})], Checkpoint(5, 1))
    file.close()
    with pytest.raises(LocalStateError, match="other_changelog"):
        PartitionFile(path, "other-changelog", 2).load()
    with pytest.raises(LocalStateError, match="other_changelog"):
        PartitionFile(path, "state", 3).load()
    # The changelog deleted and made again under the same name: another topic id.
    with pytest.raises(LocalStateError, match="other_changelog"):
        PartitionFile(path, "state", 2, topic_id="AAAAAAAAAAAAAAAAAAAAAA").load()

    # A value changed behind the file's back (bit rot, a hand edit): its row's CRC no longer matches.
    with sqlite3.connect(path) as db:
        db.execute("""UPDATE state SET value = '{"instance_count":4}'""")
    with pytest.raises(LocalStateError, match="damaged: a row of series/"):
        PartitionFile(path, "state", 2).load()


def test_a_failed_write_keeps_the_previous_checkpoint_and_suspends_the_partition(tmp_path):
    states = LocalStates(tmp_path / "worker", "state")
    assert states.write(0, [("series", "s", {"n": 1})], Checkpoint(4, 1))
    # A value JSON cannot encode fails half-way through the transaction: rolled back whole.
    assert not states.write(0, [("series", "s", {"n": 2}), ("series", "t", {1, 2})], Checkpoint(9, 2))
    assert 0 in states.suspended
    # Suspended: a later write must not skip over the lost one (its checkpoint would claim it).
    assert not states.write(0, [("series", "u", {"n": 3})], Checkpoint(12, 3))
    assert states.file(0).load() == (Checkpoint(4, 1), {"series": {"s": {"n": 1}}})
    states.resume(0)  # restored again on the next assignment: written again
    assert states.write(0, [("series", "s", {"n": 5})], Checkpoint(20, 4))
    assert states.file(0).load() == (Checkpoint(20, 4), {"series": {"s": {"n": 5}}})
    states.close_all()


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from diana.stream_apps.local_state import Checkpoint, PartitionFile

    file = PartitionFile(Path(sys.argv[1]), "state", 0)
    i = 0
    while True:
        i += 1
        # Every key holds the number of the transaction that wrote it, the checkpoint too.
        file.write([("seen", f"k{k}", [i, "x" * 200]) for k in range(2000)], Checkpoint(i, i))
    """
)


def test_a_kill_9_mid_write_leaves_the_previous_checkpoint_valid(tmp_path):
    for attempt in range(3):
        path = tmp_path / f"crash-{attempt}.sqlite"
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until a few transactions are committed
                try:
                    with sqlite3.connect(path) as db:
                        row = db.execute("SELECT position FROM checkpoint").fetchone()
                    if row and row[0] >= 3 + attempt:
                        break
                except sqlite3.Error:
                    pass
                time.sleep(0.05)
            else:
                pytest.fail("the writer committed nothing in 60 s")
            time.sleep(0.013 * (attempt + 1))  # somewhere inside a later transaction
        finally:
            writer.kill()
            writer.wait()
        checkpoint, state = PartitionFile(path, "state", 0).load()
        assert checkpoint.position >= 3 + attempt
        values = {value[0] for value in state["seen"].values()}
        assert len(state["seen"]) == 2000 and values == {checkpoint.position}, (checkpoint, sorted(values)[:5])


def test_each_worker_has_a_folder_and_each_partition_a_file(tmp_path):
    states = LocalStates(tmp_path / "diana-aggregates-host-1a2b", "diana-aggregates-state-changelog")
    states.write(0, [("clock", "watermark", 1)], Checkpoint(2, 1))
    states.write(3, [("clock", "watermark", 5)], Checkpoint(7, 1))
    states.close_all()
    assert sorted(p.name for p in Path(tmp_path / "diana-aggregates-host-1a2b").glob("*.sqlite")) == [
        "partition-0.sqlite",
        "partition-3.sqlite",
    ]


def test_the_changelog_records_own_encoding_written_to_the_file_gives_the_same_state(tmp_path):
    """What the worker does after a commit: the batch's changelog encoding, not a second one."""
    store, producer = _Store(), ChangelogRecorder()
    file = PartitionFile(tmp_path / "p0.sqlite", "state", 0)
    for values in ({"a": 1, "b": [1, "x"]}, {"a": 2}):
        batch = Batch(store, producer, "state")
        for key, value in values.items():
            batch.put(0, "series", key, value)
        if "b" not in values:
            batch.delete(0, "series", "b")
        batch.write_changelog()
        batch.commit_locally()
        file.write(batch.encoded[0], Checkpoint(len(producer.records), 1), encoded=True)
    assert file.load() == (Checkpoint(4, 1), {"series": {"a": 2}}) and store.partitions[0] == {"series": {"a": 2}}
