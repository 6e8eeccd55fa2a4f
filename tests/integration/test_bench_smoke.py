"""The benchmark command keeps working: a tiny run, checked for shape, never for speed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO


def test_bench_ingest_runs_end_to_end(tmp_path, stack):
    # `stack` only orders this after the session's stack exists; the bench runs its own on other ports.
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.ingest", "--ct", "8", "--dx", "4", "--jvm-warm-up", "10"),
            *("--opensearch-warm-up", "500", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    receivers = {(r["receiver"], r["associations"]) for r in data["runs"]}
    assert {("diana-star", 1), ("diana-star", 4), ("storescp", 1), ("storescp", 4)} <= receivers
    # Before the timed sends, a few warm-up instances go through the pipeline (its start-up, reported apart).
    warm_up = data["startup"]["instances"]
    assert warm_up > 0
    jvm_warm_up = data["startup"]["jvm_warm_up_instances"]
    assert jvm_warm_up == 10
    # Then OpenSearch's bulk path, in a scratch index deleted afterwards (its documents counted nowhere).
    assert data["startup"]["opensearch_warm_up_documents"] == 500
    assert "500 copies of their documents bulk-indexed" in (out / "results.md").read_text()
    assert data["end_to_end"]["archived"] == 12 + warm_up + jvm_warm_up
    assert data["reindex"]["events"] == 36 + warm_up + jvm_warm_up
    # Timed three times, the median the figure; what each process spent during it.
    runs = data["reindex"]["runs_seconds"]
    assert len(runs) == 3 and data["reindex"]["seconds"] == sorted(runs)[1]
    assert data["reindex"]["cpu_s"]["diana reindex"] > 0 and data["reindex"]["machine_cpu_s"]["busy"] > 0
    # The warm-up's own reindex, before the measured runs (untimed as a target, reported).
    assert data["reindex"]["warm_up_events"] == warm_up + jvm_warm_up and data["reindex"]["warm_up_seconds"] > 0
    # When each phase ran, in order (to line them up with samples taken beside the bench).
    warm_from, warm_to = data["startup"]["jvm_warm_up_utc"]
    first_run, last_run = data["runs"][0]["started_utc"], data["runs"][-1]["started_utc"]
    assert warm_from <= warm_to <= first_run <= last_run <= data["reindex"]["started_utc"]
    assert "| diana-star | 1 |" in (out / "results.md").read_text()
    # What every process of the end-to-end run spent, the broker and the search engine included.
    window = data["end_to_end"]["window_cpu_s"]
    assert {"receive", "sink opensearch", "kafka", "opensearch"} <= set(window) and window["receive"] > 0
    # And while diana-star received over 4 associations, the senders included.
    four = data["four_associations"]["cpu_s"]
    assert {"receive", "kafka", "opensearch", "storescu"} <= set(four) and four["receive"] > 0 and four["storescu"] > 0
    assert "received over 4 associations" in (out / "results.md").read_text()
    # The receiver's floors ran beside it (bench/receiver_floor.py), and the targets read them.
    assert {
        ("floor: bare", 1),
        ("floor: fsync", 1),
        ("floor: kafka", 1),
        ("floor: parse", 1),
        ("floor: parse", 4),
        ("floor: header", 1),
        ("diana-star, pipeline paused", 1),
    } <= receivers
    wall = next(t for t in data["targets"] if t["target"].startswith("receiver wall"))
    assert wall["floor"] > 0 and wall["floor_met"] in (True, False)
