"""Sinks on the real stack: status, replay, zero-downtime reindex, an OpenSearch outage, conflicts."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time

import pydicom
from opensearchpy import OpenSearch

from diana.schemas.codec import DecodeError, default_codec
from diana.schemas.topics import ARCHIVE_CONFLICTS, DEADLETTER, INSTANCES, SERIES, STUDIES
from diana.sinks.archive import archive_relative_path
from tests.support.dicomgen import SeriesSpec, make_instance, make_study
from tests.support.helpers import (
    DCMTK_ENV,
    message_count,
    os_search,
    read_messages,
    storescu,
    topic_records,
    wait_until_caught_up,
)
from tests.support.paths import REPO


def _diana(pipeline, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(pipeline.config_file)
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def _not_indexable(cfg) -> set[str]:
    """SOP Instance UIDs whose event the OpenSearch sink dead-lettered and did not index (another test sends
    refused ones on purpose: those are indexed again without their header, their dead letter says so)."""
    codec, refused, indexed_anyway = default_codec(), set(), set()
    for msg in read_messages(cfg, DEADLETTER.name):
        headers = {k: (v or b"").decode() for k, v in msg.headers() or []}
        if headers.get("sink") == "opensearch" and headers.get("origin", "").startswith(f"{INSTANCES.name}/"):
            try:
                uid = codec.decode(msg.value())[1]["sop_instance_uid"]
            except DecodeError:
                continue
            # Refused once and indexed without the header, or refused again once a document was there.
            reason = headers.get("reason", "")
            indexed = "(indexed without its header)" in reason or "(indexed before, or without its header)" in reason
            (indexed_anyway if indexed else refused).add(uid)
    return refused - indexed_anyway


def _distinct_keys(cfg) -> dict[str, int]:
    indexable = {e["sop_instance_uid"] for _, e in topic_records(cfg, INSTANCES.name)} - _not_indexable(cfg)
    return {
        "instances": len(indexable),
        "series": len({k for k, _ in topic_records(cfg, SERIES.name)}),
        "studies": len({k for k, _ in topic_records(cfg, STUDIES.name)}),
    }


def _alias_counts(cfg) -> dict[str, int]:
    client = OpenSearch(hosts=[cfg.opensearch.url])
    out = {}
    for kind in ("instances", "series", "studies"):
        client.indices.refresh(index=f"diana-{kind}")
        out[kind] = client.count(index=f"diana-{kind}")["count"]
    return out


def test_status_shows_offsets_lag_counts_and_archive(pipeline, tmp_path):
    cfg = pipeline.cfg
    study = make_study(tmp_path / "s", [SeriesSpec("CT", "STATUS", 6)], patient_id="STATUS1")
    assert storescu(cfg, study.files).returncode == 0
    wait_until_caught_up(cfg)
    result = _diana(pipeline, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    counts = _alias_counts(cfg)
    for kind, count in counts.items():
        assert re.search(rf"diana-{kind}\s+diana-{kind}-v\d+\s+{count}\n", out), (kind, count, out)
    for group in (cfg.stream.app_id, cfg.sinks.archive_group, cfg.sinks.opensearch_group):
        assert re.search(rf"{group}\s+dicom\.instances\s+0\n", out), (group, out)
    events = message_count(cfg, INSTANCES.name)
    ends = sum(int(m.group(1)) for m in re.finditer(r"dicom\.instances\s+\d+\s+\d+\s+(\d+)", out))
    assert ends == events
    archived = sum(1 for p in cfg.path(cfg.storage.archive_dir).rglob("*.dcm") if not p.name.startswith("."))
    assert f"ARCHIVE  objects: {archived}\n" in out


def _indexed_something(cfg, tmp_path) -> None:
    """One study sent and indexed, so that the aliases exist whichever test of the file runs first."""
    study = make_study(tmp_path / "first", [SeriesSpec("CT", "BEFORE REINDEX", 2)], patient_id="REINDEX0")
    assert storescu(cfg, study.files).returncode == 0
    wait_until_caught_up(cfg)


def _spawned_children(parent: int) -> list[int]:
    """Processes ``parent`` started with multiprocessing's spawn (not its resource tracker), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and b"spawn_main" in command:
            found.append(int(entry))
    return found


def test_reindex_whose_process_dies_swaps_nothing_and_leaves_nothing(pipeline, tmp_path):
    """kill -9 of one catch-up process: the reindex fails with a message, the aliases keep their
    versions, the half-built version is deleted, and the next reindex works."""
    cfg = pipeline.cfg
    _indexed_something(cfg, tmp_path)
    client = OpenSearch(hosts=[cfg.opensearch.url])
    before = {kind: sorted(client.indices.get_alias(name=f"diana-{kind}")) for kind in ("instances", "series")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(pipeline.config_file)
    reindex = subprocess.Popen(
        [sys.executable, "-m", "diana.cli", "reindex", "--no-progress", "--processes", "2"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and reindex.poll() is None and time.monotonic() < deadline:
        children = _spawned_children(reindex.pid)
        if children:  # a spawned process takes about a second to import before it reads anything
            killed = children[0]
            os.kill(killed, 9)
        time.sleep(0.02)
    out, err = reindex.communicate(timeout=300)
    assert killed is not None, f"no catch-up process seen: {out}{err}"
    assert reindex.returncode == 1, out + err
    assert re.search(r"reindex process \d exited \(-9\) before it was done\. Nothing was swapped", err), err
    after = {kind: sorted(client.indices.get_alias(name=f"diana-{kind}")) for kind in ("instances", "series")}
    assert after == before
    for kind, (index,) in before.items():
        version = int(index.rsplit("-v", 1)[1])
        assert not client.indices.exists(index=f"diana-{kind}-v{version + 1}"), "the half-built version is left"
    # With the default processes: one per core, fewer for topics with few events (how many depends on
    # what the session's earlier tests sent; the choice itself: tests/unit/test_reindex_share_out.py).
    again = _diana(pipeline, "reindex", "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    wait_until_caught_up(cfg)
    assert _alias_counts(cfg) == _distinct_keys(cfg)


def test_reindex_while_instances_arrive_swaps_the_alias_with_exact_counts(pipeline, tmp_path):
    cfg = pipeline.cfg
    _indexed_something(cfg, tmp_path)
    client = OpenSearch(hosts=[cfg.opensearch.url])
    before = sorted(client.indices.get_alias(name="diana-instances"))
    arriving = make_study(tmp_path / "b", [SeriesSpec("CT", "DURING REINDEX", 150)], patient_id="REINDEX1")
    sender = subprocess.Popen(
        ["storescu", "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port), *map(str, arriving.files)],
        env=DCMTK_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # Three catch-up processes sharing the partitions (the default is one per core).
    result = _diana(pipeline, "reindex", "--no-progress", "--processes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reindex.processes" in result.stdout + result.stderr, result.stdout + result.stderr
    assert sender.wait(120) == 0
    wait_until_caught_up(cfg)

    after = sorted(client.indices.get_alias(name="diana-instances"))
    assert len(after) == 1 and after != before
    old_version = int(before[0].rsplit("-v", 1)[1])
    assert after == [f"diana-instances-v{old_version + 1}"]
    assert client.indices.exists(index=before[0])  # kept: only --delete-old removes it
    # Filled with refresh off (created so), and given the template's interval back before the swap.
    settings = client.indices.get_settings(index=after[0])[after[0]]["settings"]["index"]
    assert settings["refresh_interval"] == "1s"
    assert _alias_counts(cfg) == _distinct_keys(cfg)
    docs = os_search(cfg, "diana-instances", {"term": {"study_instance_uid": arriving.study_uid}})
    assert len(docs) == 150


def test_reindex_keeps_the_dead_letters_their_topic_no_longer_holds(pipeline):
    """dicom.deadletter keeps 90 days: a dead letter older than that is in the index only. Rebuilt from
    the topic alone it was lost, for good with --delete-old; the old version is copied in first now."""
    cfg = pipeline.cfg
    client = OpenSearch(hosts=[cfg.opensearch.url])
    expired = {
        "origin": f"{INSTANCES.name}/0/1",
        "origin_topic": INSTANCES.name,
        "reason": "archive: the landing copy is missing",
        "stage": "archive",
        "size_bytes": 10,
        "received_at": "2020-01-01T00:00:00+00:00",
        "deadletter_offset": "0/-1",  # no offset of the topic: its id is none of the topic's letters
    }
    client.index(index="diana-deadletters", id=expired["deadletter_offset"], body=expired, refresh=True)
    try:
        result = _diana(pipeline, "reindex", "--no-progress", "--kinds", "deadletters", "--delete-old")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "reindex.carried_over" in result.stdout + result.stderr
        assert client.get(index="diana-deadletters", id=expired["deadletter_offset"])["_source"] == expired
        client.indices.refresh(index="diana-deadletters")
        in_topic = len(read_messages(cfg, DEADLETTER.name))
        assert client.count(index="diana-deadletters")["count"] == in_topic + 1
    finally:
        client.delete(index="diana-deadletters", id=expired["deadletter_offset"], ignore=[404], refresh=True)


def test_opensearch_down_for_a_minute_loses_and_duplicates_nothing(pipeline, stack, tmp_path):
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    study = make_study(tmp_path / "o", [SeriesSpec("CT", "DURING OUTAGE", 30)], patient_id="OUTAGE2")
    stack._stop(stack.opensearch)
    try:
        started = time.monotonic()
        assert storescu(cfg, study.files).returncode == 0  # ingest does not depend on OpenSearch
        time.sleep(max(0.0, 60 - (time.monotonic() - started)))
    finally:
        stack.start_opensearch()
        stack.wait_opensearch()
    wait_until_caught_up(cfg, timeout=300)
    docs = os_search(cfg, "diana-instances", {"term": {"study_instance_uid": study.study_uid}})
    assert len(docs) == 30 and len({d["_id"] for d in docs}) == 30
    assert _alias_counts(cfg) == _distinct_keys(cfg)
    assert pipeline.procs["opensearch-sink"].poll() is None
    assert "sink.retry" in pipeline.log_text("opensearch-sink")


def test_replay_moves_a_stopped_group_and_reprocessing_duplicates_nothing(pipeline):
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    live = _diana(pipeline, "replay", cfg.sinks.opensearch_group, "--to-beginning")
    assert live.returncode == 1 and "stop its consumers first" in live.stderr

    pipeline.stop("opensearch-sink")
    try:
        events = message_count(cfg, INSTANCES.name)
        dry = _diana(
            pipeline, "replay", cfg.sinks.opensearch_group, "--to-beginning", "--topic", INSTANCES.name, "--dry-run"
        )
        assert dry.returncode == 0, dry.stderr
        assert f"dry run: {events} messages would be processed again" in dry.stdout
        moved = _diana(pipeline, "replay", cfg.sinks.opensearch_group, "--to-beginning", "--topic", INSTANCES.name)
        assert moved.returncode == 0, moved.stderr

        from tests.support.helpers import group_lag

        assert group_lag(cfg, cfg.sinks.opensearch_group, [INSTANCES.name]) == events
    finally:
        pipeline.start("opensearch-sink", "sink", "opensearch")  # the later tests need it, pass or fail
    wait_until_caught_up(cfg, timeout=300)
    assert _alias_counts(cfg) == _distinct_keys(cfg)


def test_same_uid_with_different_bytes_is_reported(pipeline, tmp_path):
    cfg = pipeline.cfg
    assert cfg.sinks.archive_conflict_policy == "KEEP_FIRST"
    first = make_instance(
        pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 1, patient_id="CONFLICT1", study_date="20241001"
    )
    second = copy.deepcopy(first)
    second.SeriesDescription = "CHANGED AFTER SENDING"
    paths = [tmp_path / "first.dcm", tmp_path / "second.dcm"]
    first.save_as(paths[0], enforce_file_format=True)
    second.save_as(paths[1], enforce_file_format=True)
    for path in paths:
        assert storescu(cfg, [path]).returncode == 0
        wait_until_caught_up(cfg)
    reports = [
        r for _, r in topic_records(cfg, ARCHIVE_CONFLICTS.name) if r["sop_instance_uid"] == first.SOPInstanceUID
    ]
    assert len(reports) == 1 and reports[0]["policy"] == "KEEP_FIRST"
    archived = cfg.path(cfg.storage.archive_dir) / archive_relative_path(
        {
            "study_instance_uid": first.StudyInstanceUID,
            "series_instance_uid": first.SeriesInstanceUID,
            "sop_instance_uid": first.SOPInstanceUID,
        }
    )
    assert pydicom.dcmread(archived).SeriesDescription == "AXIAL"
