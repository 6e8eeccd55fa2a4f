"""`diana replay`: a time without a UTC offset is the host's local time, and a move forward past messages
the group has not processed says how many it skips and needs --allow-skip (--to-end excepted).

Kafka is replaced by recording stand-ins for plan_replay and apply_replay; the command on a real
group is in tests/integration/test_sinks_replay_reindex.py.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

import diana.operations.replay as replay
from diana.cli import main
from diana.operations.replay import Move, render_moves


def test_a_move_past_the_committed_offset_counts_the_messages_it_skips():
    lagging = Move("dicom.instances", 0, current=100, target=250, first_kept=0)
    assert (lagging.to_skip, lagging.to_reprocess) == (150, 0)
    back = Move("dicom.instances", 0, current=100, target=40, first_kept=0)
    assert (back.to_skip, back.to_reprocess) == (0, 60)
    never_committed = Move("dicom.instances", 1, current=None, target=30, first_kept=10)
    assert never_committed.to_skip == 20  # its consumers would have started at the first message kept
    expired = Move("dicom.instances", 2, current=5, target=30, first_kept=20)
    assert expired.to_skip == 10  # 5..19 are gone whatever happens
    assert render_moves([lagging]).splitlines()[1].split()[-2:] == ["0", "150"]


@pytest.fixture
def kafka(monkeypatch) -> dict:
    """plan_replay answers a lagging group moved forward by 150 on one partition; apply_replay records."""
    seen: dict = {"applied": []}

    def plan(cfg, group, topics, *, to, when=None, offset=None):
        seen["when"] = when
        return [Move("dicom.instances", 0, current=100, target=250)]

    monkeypatch.setattr(replay, "plan_replay", plan)
    monkeypatch.setattr(replay, "apply_replay", lambda cfg, group, moves: seen["applied"].append(moves))
    return seen


@pytest.fixture
def zurich(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Zurich")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_time_without_an_offset_is_local_and_its_utc_instant_is_printed(config, kafka, zurich, capsys):
    assert main(["--config", str(config), "replay", "g", "--to-datetime", "2024-03-15T08:00", "--dry-run"]) == 0
    assert kafka["when"] == datetime(2024, 3, 15, 7, 0, tzinfo=UTC)  # CET is UTC+1 in March
    out = capsys.readouterr().out
    assert "is 2024-03-15 07:00:00 UTC" in out and "this host's local time" in out
    main(["--config", str(config), "replay", "g", "--to-datetime", "2024-03-15T08:00+00:00", "--dry-run"])
    assert kafka["when"] == datetime(2024, 3, 15, 8, 0, tzinfo=UTC)


def test_a_forward_move_skipping_unprocessed_messages_needs_allow_skip(config, kafka, capsys):
    argv = ["--config", str(config), "replay", "diana-sink-archive", "--to-offset", "250"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "150 messages will be SKIPPED (never processed by diana-sink-archive)" in out
    assert "nothing moved" in err and "--allow-skip" in err
    assert kafka["applied"] == []
    assert main([*argv, "--allow-skip"]) == 0
    assert len(kafka["applied"]) == 1


def test_to_end_and_a_dry_run_say_what_they_skip_without_allow_skip(config, kafka, capsys):
    base = ["--config", str(config), "replay", "diana-sink-archive"]
    assert main([*base, "--to-offset", "250", "--dry-run"]) == 0
    assert "150 messages will be SKIPPED" in capsys.readouterr().out and kafka["applied"] == []
    assert main([*base, "--to-end"]) == 0
    assert "150 messages will be SKIPPED" in capsys.readouterr().out and len(kafka["applied"]) == 1
