"""Unit: the benchmark's profile summary reads py-spy's folded stacks (own and inclusive samples)."""

from __future__ import annotations

from bench.profile import summarise_folded

FOLDED = """\
process 42:"python -m diana.cli receive";Thread.run (/usr/lib/python3.11/threading.py:975);run_reactor (/x/.venv/lib/python3.11/site-packages/pynetdicom/dul.py:403) 60
process 42:"python -m diana.cli receive";Thread.run (/usr/lib/python3.11/threading.py:975);handle_store (/work/wt-speed/producers/scp.py:72);fsync_dir (/work/wt-speed/diana/durable.py:25) 30
process 42:"python -m diana.cli receive";Thread.run (/usr/lib/python3.11/threading.py:975);handle_store (/work/wt-speed/producers/scp.py:80) 10
not a stack line
"""


def test_top_frames_by_own_and_inclusive_samples():
    summary = summarise_folded(FOLDED, top=3)
    assert summary["samples"] == 100
    assert summary["own"] == [
        {"frame": "run_reactor (pynetdicom/dul.py)", "percent": 60.0},
        {"frame": "fsync_dir (diana/durable.py)", "percent": 30.0},
        {"frame": "handle_store (producers/scp.py)", "percent": 10.0},
    ]
    inclusive = {row["frame"]: row["percent"] for row in summary["inclusive"]}
    assert inclusive["Thread.run (/usr/lib/python3.11/threading.py)"] == 100.0
    assert inclusive["handle_store (producers/scp.py)"] == 40.0  # two lines of one function
    assert not any(row["frame"].startswith("process") for row in summary["inclusive"])


def test_no_samples_is_an_empty_summary():
    assert summarise_folded("") == {"samples": 0, "own": [], "inclusive": []}
