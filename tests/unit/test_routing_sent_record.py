"""The destination's record of what it was sent (sent.py) as a file: appended once a batch (one line),
not rewritten whole; read as the union of its lines; a line cut by a crash left out; rewritten whole
(compacted) only then or once it has many lines; pruned when not written for [routing]
sent_record_retention_days. Before, every batch rewrote and fsync'd the whole file, and no record was
ever removed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

import diana.access.routing.sent as sent_module
from diana.access.routing.sent import COMPACT_AFTER_LINES, StudiesSent
from diana.config import ConfigError, load_config


def _batch(record: StudiesSent, study: str, sops: dict[str, str | None], alerted: bool = False) -> None:
    """One batch that delivered ``sops`` of ``study`` (and its alert)."""
    record.forget_claimed()
    for sop in sops:
        assert sop not in record.sent(study)
    record.claim(study, sops)
    for sop in sops:
        record.delivered(study, sop)
    if alerted:
        record.claim_alert(study)
    record.write_delivered()


def _digest(n: int) -> str:
    return f"{n:064x}"


def test_a_study_sent_in_many_batches_is_appended_not_rewritten(tmp_path: Path, monkeypatch):
    """The review's figure: 5,000 instances in batches of 100 rewrote the file 50 times, 8.7 MB written
    for a 339 KB record. Now each batch appends its line: the bytes written are the file's size."""
    rewritten: list[int] = []
    original = sent_module.write_atomic

    def counted(path: Path, data: bytes) -> None:
        rewritten.append(len(data))
        original(path, data)

    monkeypatch.setattr(sent_module, "write_atomic", counted)
    record, study = StudiesSent("ws", tmp_path), generate_uid()
    sops = [generate_uid() for _ in range(5000)]
    for start in range(0, 5000, 100):
        _batch(record, study, {sop: _digest(n) for n, sop in enumerate(sops[start : start + 100], start)})
    path = tmp_path / f"{study}.json"
    assert rewritten == [] and len(path.read_bytes().splitlines()) == 50
    record.forget_claimed()
    assert record.sent(study) == {sop: _digest(n) for n, sop in enumerate(sops)}
    # About 140 bytes an instance (a 64-character UID and its SHA-256 in hex, quoted): 5,000 in ~0.7 MB.
    assert 130 * 5000 < path.stat().st_size < 145 * 5000


def test_a_record_is_compacted_once_it_has_many_lines(tmp_path: Path):
    record, study = StudiesSent("ws", tmp_path), generate_uid()
    sops = [generate_uid() for _ in range(COMPACT_AFTER_LINES + 1)]
    for n, sop in enumerate(sops):
        _batch(record, study, {sop: _digest(n)}, alerted=n == 3)
    path = tmp_path / f"{study}.json"
    assert len(path.read_bytes().splitlines()) == 1  # the 65th batch rewrote the 64 lines and its own as one
    record.forget_claimed()
    assert record.sent(study) == {sop: _digest(n) for n, sop in enumerate(sops)} and record.alerted(study)


def test_a_line_cut_by_a_crash_is_left_out_and_the_file_rewritten(tmp_path: Path):
    """The instances of the cut line are sent again (at least once); the others are not; the next write
    rewrites the file rather than appending to the cut line."""
    record, study = StudiesSent("ws", tmp_path), generate_uid()
    first, second, third = generate_uid(), generate_uid(), generate_uid()
    _batch(record, study, {first: _digest(1)})
    path = tmp_path / f"{study}.json"
    path.write_bytes(path.read_bytes() + f'{{"sent":{{"{second}":"'.encode())  # a crash mid-append
    record.forget_claimed()
    assert record.sent(study) == {first: _digest(1)}
    _batch(record, study, {second: _digest(2), third: None})
    assert len(path.read_bytes().splitlines()) == 1 and path.read_bytes().endswith(b"\n")
    record.forget_claimed()
    assert record.sent(study) == {first: _digest(1), second: _digest(2), third: None}


def test_a_corrected_copy_replaces_the_digest_recorded(tmp_path: Path):
    record, study, sop = StudiesSent("ws", tmp_path), generate_uid(), generate_uid()
    _batch(record, study, {sop: _digest(1)})
    record.forget_claimed()
    record.claim(study, {sop: _digest(2)})
    record.delivered(study, sop)
    record.write_delivered()
    record.forget_claimed()
    assert record.sent(study) == {sop: _digest(2)}


def test_records_not_written_for_the_retention_are_pruned(tmp_path: Path):
    """By modification time (each append sets it); other files are left alone; 0 keeps every record."""
    old, recent = generate_uid(), generate_uid()
    for study in (old, recent):
        _batch(StudiesSent("ws", tmp_path), study, {generate_uid(): None})
    (tmp_path / "notes.txt").write_text("")
    now = time.time()
    month_ago = now - 31 * 86400
    os.utime(tmp_path / f"{old}.json", (month_ago, month_ago))
    os.utime(tmp_path / "notes.txt", (month_ago, month_ago))
    assert StudiesSent("ws", tmp_path, 0).prune(now) == 0
    assert StudiesSent("ws", tmp_path, 30 * 86400).prune(now) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{recent}.json", "notes.txt"])
    assert StudiesSent("ws", tmp_path / "not-made", 86400).prune(now) == 0


def test_the_retention_setting_is_checked_and_reaches_each_destination(tmp_path: Path):
    from diana.access.routing.rules import parse_rules
    from diana.access.routing.service import build_workers

    def config(extra: str):
        (tmp_path / "archive").mkdir(exist_ok=True)
        path = tmp_path / "diana.toml"
        path.write_text(
            f'[storage]\narchive_dir = "{tmp_path / "archive"}"\n\n[routing]\n'
            f'state_dir = "{tmp_path / "state"}"\n{extra}'
        )
        return load_config(path, environ={})

    with pytest.raises(ConfigError, match=r"\[routing\] sent_record_retention_days = -1.0: use 0"):
        config("sent_record_retention_days = -1\n")
    assert config("").routing.sent_record_retention_days == 30.0
    ws = {"name": "ws", "ae_title": "WS", "host": "127.0.0.1", "port": 1}
    rules = parse_rules(
        {"destinations": [ws], "rules": [{"name": "w", "match": {}, "whole_study": True, "destinations": ["ws"]}]}
    )
    (worker,) = build_workers(config("sent_record_retention_days = 2\n"), rules, threading.Event())
    assert worker.studies_sent.retention_s == 2 * 86400
    worker.sender.close()
