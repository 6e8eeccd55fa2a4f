"""A restart of the aggregates worker restores only the changelog's tail, on the real broker.

A worker of its own (own app id: own group, changelog and state folder) aggregates events written
straight to dicom.instances. Checked after each kill -9 and restart:
- the number of changelog records it read (its ``state.partition_restored`` log lines) is exactly
  the number of committed records after each partition's local checkpoint, not the whole changelog;
- its local files hold exactly the state the changelog replays to (they are written from its
  memory, so this is the worker's state), and later instances are counted exactly;
- a local file older than the changelog's tail (a crash before its last writes) reads the longer
  tail; a damaged file, and one older than delete.retention.ms, fall back to the whole changelog
  with the same result.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import urllib.request
import uuid
from collections import defaultdict
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import TopicCollection
from pydicom.uid import generate_uid

from diana.clients import kafka_admin
from diana.stream_apps.local_state import PartitionFile
from tests.support.helpers import read_messages
from tests.support.paths import TEST_HOME, port
from tests.support.stream_events import AggregatesWorker, instance_event
from tests.support.stream_events import send_events as _send
from tests.support.stream_events import wait_for as _wait_for

PER_SERIES = 5


def _event(study: str, series: str, number: int, sop: str | None = None) -> dict:
    return instance_event(study, series, number, "TAILSTORE", sop=sop)


def _studies(count: int, series_each: int) -> tuple[list[tuple[str, str]], list[dict]]:
    """(study, series) pairs and their instances 1..PER_SERIES."""
    pairs = [(study, generate_uid()) for study in (generate_uid() for _ in range(count)) for _ in range(series_each)]
    return pairs, [_event(st, se, n) for st, se in pairs for n in range(1, PER_SERIES + 1)]


def _changelog(cfg, topic: str, since: dict[int, int] | None = None) -> tuple[dict, dict[int, int]]:
    """The state the changelog replays to, per partition, and its committed records per partition."""
    state: dict[int, dict[str, dict]] = defaultdict(dict)
    counts: dict[int, int] = defaultdict(int)
    for m in read_messages(cfg, topic, since=since):
        counts[m.partition()] += 1
        namespace, _, key = m.key().decode().partition("/")
        space = state[m.partition()].setdefault(namespace, {})
        if m.value() is None:
            space.pop(key, None)
        else:
            space[key] = json.loads(m.value())
    return {p: {ns: s for ns, s in spaces.items() if s} for p, spaces in state.items()}, dict(counts)


class Worker(AggregatesWorker):
    def kill(self) -> None:
        self.stop(kill=True)

    def restart(self) -> dict[int, dict[str, str]]:
        """kill -9 is done by the caller; start again and return the restore of each partition."""
        before, restores = len(self.lines("state.partition_restored")), len(self.lines("state.restored"))
        self.start()
        _wait_for(lambda: len(self.lines("state.restored")) > restores, what="the restart's restore")
        out = {}
        for line in self.lines("state.partition_restored")[before:]:
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            out[int(fields["partition"])] = fields
        return out


_TOPIC_IDS: dict[str, str] = {}


def _files(folder: Path, changelog: str) -> dict[int, PartitionFile]:
    """The worker's files, opened as the worker does: for this changelog, by the broker's topic id."""
    topic_id = _TOPIC_IDS[changelog]
    return {
        int(p.stem.split("-")[1]): PartitionFile(p, changelog, int(p.stem.split("-")[1]), topic_id)
        for p in folder.glob("partition-*.sqlite")
    }


def _local_state(folder: Path, changelog: str) -> dict[int, dict]:
    out = {}
    for p, file in _files(folder, changelog).items():
        _, state = file.load()
        file.close()
        out[p] = {ns: s for ns, s in state.items() if s}
    return {p: s for p, s in out.items() if s}


def _checkpoints(folder: Path, changelog: str) -> dict[int, int]:
    out = {}
    for p, file in _files(folder, changelog).items():
        out[p] = file.load()[0].position
        file.close()
    return out


def _snapshot(folder: Path, to: Path) -> None:
    """A consistent copy of each file (SQLite's backup), as the worker's files were at this moment."""
    to.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("partition-*.sqlite"):
        with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(to / path.name)) as copy:
            source.backup(copy)


def _put_back(snapshot: Path, folder: Path, partitions: list[int]) -> None:
    for p in partitions:
        name = f"partition-{p}.sqlite"
        for suffix in ("-wal", "-shm"):
            Path(f"{folder / name}{suffix}").unlink(missing_ok=True)
        shutil.copy(snapshot / name, folder / name)


def _series_count(cfg, changelog: str, series: str) -> tuple[int, str]:
    state, _ = _changelog(cfg, changelog)
    for spaces in state.values():
        if series in spaces.get("series", {}):
            value = spaces["series"][series]
            return value["instance_count"], value["status"]
    return 0, ""


def test_a_restart_reads_only_the_tail_and_falls_back_to_the_whole_changelog_when_the_file_cannot_be_trusted(
    stack, cfg, test_config_file
):
    app_id = f"tail-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-state-changelog"
    state_dir = TEST_HOME / "aggregates-state"
    logs = TEST_HOME / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker = Worker(
        test_config_file,
        logs / f"{app_id}.log",
        {
            "DIANA_STREAM_APP_ID": app_id,
            "DIANA_STREAM_WEB_PORT": str(port(16076)),
            "DIANA_STREAM_STATE_DIR": str(state_dir),
        },
    )
    worker.start()
    try:
        _wait_for(lambda: worker.lines("partitions.assigned"), what="the worker assigned")
        admin = kafka_admin(cfg.kafka)  # referenced until answered: a collected client cancels its requests
        described = admin.describe_topics(TopicCollection([changelog]))[changelog].result(30)
        _TOPIC_IDS[changelog] = str(described.topic_id)
        [folder] = [f for f in state_dir.glob(f"{app_id}-*") if f.is_dir()]  # <app_id>-<worker_id>

        def all_completed(pairs):
            state, _ = _changelog(cfg, changelog)
            series = {k: v for spaces in state.values() for k, v in spaces.get("series", {}).items()}
            return all(series.get(se, {}).get("status") in ("COMPLETED", "AMENDED") for _, se in pairs)

        def files_equal_changelog():
            return _local_state(folder, changelog) == _changelog(cfg, changelog)[0]

        # 1. Four studies of two series; once complete, the files hold what the changelog replays to.
        first, events = _studies(4, 2)
        _send(cfg, events)
        _wait_for(lambda: all_completed(first), what="the first studies completed")
        _wait_for(files_equal_changelog, timeout=30, what="the local files equal to the changelog's state")
        old = TEST_HOME / f"{app_id}-old"
        _snapshot(folder, old)
        old_checkpoints = _checkpoints(old, changelog)

        # 2. Eight more studies, a late instance and a re-send of the first series.
        second, events = _studies(8, 1)
        late_study, late_series = first[0]
        resent = events[0]
        _send(cfg, [*events, _event(late_study, late_series, PER_SERIES + 1)])
        _send(cfg, [dict(resent, received_at=datetime.now(UTC))])
        _wait_for(lambda: all_completed(second), what="the second studies completed")
        _wait_for(lambda: _series_count(cfg, changelog, late_series) == (PER_SERIES + 1, "AMENDED"), what="amended")
        _wait_for(files_equal_changelog, timeout=30, what="the local files equal to the changelog's state")

        # 3. kill -9 and restart: only the records after each file's checkpoint are read.
        worker.kill()
        checkpoints = _checkpoints(folder, changelog)
        _, tail = _changelog(cfg, changelog, since=checkpoints)
        _, whole = _changelog(cfg, changelog)
        restored = worker.restart()
        assert {p: r["kind"] for p, r in restored.items()} == dict.fromkeys(range(cfg.kafka.partitions), "tail")
        assert {p: int(r["records"]) for p, r in restored.items()} == {
            p: tail.get(p, 0) for p in range(cfg.kafka.partitions)
        }
        assert sum(whole.values()) > 100  # what a full restore would have read
        _wait_for(files_equal_changelog, timeout=30, what="the local files equal to the changelog's state")

        # 4. Files older than the changelog (a crash before their last writes): the longer tail is
        # read, exactly, and the state is the same.
        worker.kill()
        _put_back(old, folder, list(old_checkpoints))
        _, tail = _changelog(cfg, changelog, since=old_checkpoints)
        restored = worker.restart()
        assert {p: r["kind"] for p, r in restored.items()} == dict.fromkeys(range(cfg.kafka.partitions), "tail")
        assert {p: int(r["records"]) for p, r in restored.items()} == {
            p: tail.get(p, 0) for p in range(cfg.kafka.partitions)
        }
        assert sum(tail.values()) > 0
        _wait_for(files_equal_changelog, timeout=30, what="the local files equal to the changelog's state")
        # Counting goes on exactly: a re-send of a second-phase instance is not counted, a late one is.
        study, series = second[0]
        _send(cfg, [dict(resent, received_at=datetime.now(UTC)), _event(study, series, PER_SERIES + 1)])
        _wait_for(lambda: _series_count(cfg, changelog, series) == (PER_SERIES + 1, "AMENDED"), what="amended")

        # 5. One file damaged, one older than delete.retention.ms with a tail after it: both
        # partitions are read whole; the others still from their files.
        _wait_for(files_equal_changelog, timeout=30, what="the local files equal to the changelog's state")
        _snapshot(folder, old := TEST_HOME / f"{app_id}-old2")
        study3, events3 = _studies(2, 1)
        _send(cfg, events3)
        _wait_for(lambda: all_completed(study3), what="the third studies completed")
        worker.kill()
        _, counts = _changelog(cfg, changelog)
        stale_checkpoints = _checkpoints(old, changelog)
        current = _checkpoints(folder, changelog)
        behind = [p for p in stale_checkpoints if stale_checkpoints[p] < current[p]]
        assert behind, "the third studies wrote to no partition"
        stale = behind[0]
        damaged = next(p for p in current if p != stale)
        _put_back(old, folder, [stale])
        with closing(sqlite3.connect(folder / f"partition-{stale}.sqlite")) as db, db:
            db.execute("UPDATE checkpoint SET written_ms = written_ms - 2 * 3600 * 1000")
        for suffix in ("-wal", "-shm"):
            Path(f"{folder}/partition-{damaged}.sqlite{suffix}").unlink(missing_ok=True)
        (folder / f"partition-{damaged}.sqlite").write_bytes(b"\0garbage" * 512)
        restored = worker.restart()
        assert restored[stale]["kind"] == "full" and restored[stale]["reason"] == "older_than_delete_retention"
        assert restored[damaged]["kind"] == "full" and restored[damaged]["reason"] == "damaged"
        for p in (stale, damaged):
            assert int(restored[p]["records"]) == counts.get(p, 0)  # the whole changelog partition
        assert all(restored[p]["kind"] == "tail" for p in range(cfg.kafka.partitions) if p not in (stale, damaged))
        _wait_for(files_equal_changelog, timeout=30, what="the local files equal to the changelog's state")
        _send(cfg, [_event(study, series, PER_SERIES + 2)])
        _wait_for(lambda: _series_count(cfg, changelog, series) == (PER_SERIES + 2, "AMENDED"), what="amended again")
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()


# A series of PER_SERIES instances, completed, then one late instance after its completion: 5 instances
# (revisions 1-5), the completion (6), the late one (7), its amended completion (8).
AMENDED_EXACTLY = {
    "status": "AMENDED",
    "version": 2,
    "revision": PER_SERIES + 3,
    "instance_count": PER_SERIES + 1,
    "total_bytes": 100 * (PER_SERIES + 1),
    "min_instance_number": 1,
    "max_instance_number": PER_SERIES + 1,
    "verdict": "COMPLETE",
    "missing_instance_numbers": [],
}


def _disk_reads(web_port: int) -> dict[str, float]:
    """The worker's diana_stream_state_disk_reads_total by namespace, from its metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^diana_stream_state_disk_reads_total\{namespace="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {namespace: float(value) for namespace, value in found}


def _series_state(cfg, changelog: str, series: str) -> dict:
    state, _ = _changelog(cfg, changelog)
    return next((spaces["series"][series] for spaces in state.values() if series in spaces.get("series", {})), {})


def test_a_late_instance_of_a_series_kept_only_on_disk_amends_it_exactly_also_after_a_kill_9(
    stack, cfg, test_config_file
):
    """Completed series, their studies and digests leave memory once in the local file
    (stream_apps/state_store.py); a late instance reads them back and gives the AMENDED revision the
    in-memory state gave: every count, the revision number, the verdict, a re-send counted once."""
    app_id = f"cold-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-state-changelog"
    state_dir = TEST_HOME / "aggregates-state"
    logs = TEST_HOME / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    web_port = port(16077)
    worker = Worker(
        test_config_file,
        logs / f"{app_id}.log",
        {
            "DIANA_STREAM_APP_ID": app_id,
            "DIANA_STREAM_WEB_PORT": str(web_port),
            "DIANA_STREAM_STATE_DIR": str(state_dir),
        },
    )
    worker.start()
    try:
        _wait_for(lambda: worker.lines("partitions.assigned"), what="the worker assigned")
        admin = kafka_admin(cfg.kafka)
        _TOPIC_IDS[changelog] = str(admin.describe_topics(TopicCollection([changelog]))[changelog].result(30).topic_id)
        [folder] = [f for f in state_dir.glob(f"{app_id}-*") if f.is_dir()]
        study, series_a, series_b = generate_uid(), generate_uid(), generate_uid()
        events = [_event(study, se, n) for se in (series_a, series_b) for n in range(1, PER_SERIES + 1)]
        _send(cfg, events)
        for series in (series_a, series_b):
            _wait_for(lambda s=series: _series_state(cfg, changelog, s).get("status") == "COMPLETED", what="completed")
        _wait_for(
            lambda: _local_state(folder, changelog) == _changelog(cfg, changelog)[0], timeout=30, what="files written"
        )

        def fields(series: str) -> dict:
            state = _series_state(cfg, changelog, series)
            return {k: state.get(k) for k in AMENDED_EXACTLY}

        # 1. A late instance of A and a re-send of A's first: read from disk, amended once, counted once.
        before = _disk_reads(web_port)
        _send(cfg, [_event(study, series_a, PER_SERIES + 1), dict(events[0], received_at=datetime.now(UTC))])
        _wait_for(lambda: fields(series_a) == AMENDED_EXACTLY, what="A amended exactly")
        after = _disk_reads(web_port)
        for namespace in ("series", "study", "digest"):
            assert after.get(namespace, 0) > before.get(namespace, 0), namespace  # it came from the file

        # 2. kill -9 and restart: the restore leaves them on disk; a late instance of B amends it the same way.
        worker.kill()
        restored = worker.restart()
        assert {r["kind"] for r in restored.values()} == {"tail"}
        [line] = worker.lines("state.restored")[-1:]
        assert "'series'" not in line and "'digest'" not in line  # not loaded into memory
        _send(cfg, [_event(study, series_b, PER_SERIES + 1), dict(events[1], received_at=datetime.now(UTC))])
        _wait_for(lambda: fields(series_b) == AMENDED_EXACTLY, what="B amended exactly after the restart")
        assert fields(series_a) == AMENDED_EXACTLY  # the re-send of A's second instance counted once
        state, _ = _changelog(cfg, changelog)
        [study_state] = [spaces["study"][study] for spaces in state.values() if study in spaces.get("study", {})]
        assert (study_state["instance_count"], study_state["status"]) == (2 * (PER_SERIES + 1), "AMENDED")
        assert _disk_reads(web_port).get("series", 0) > 0
        _wait_for(
            lambda: _local_state(folder, changelog) == _changelog(cfg, changelog)[0], timeout=30, what="files written"
        )
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
