"""`python -m bench.serve` keeps working: a tiny run, checked for shape, never for speed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO


def test_bench_serve_runs_end_to_end(tmp_path, stack):
    # `stack` only orders this after the session's stack exists; the bench runs its own on ports 28xxx.
    out = tmp_path / "bench-serve"
    result = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--find-instances", "300", "--series", "20", "--study", "100"]
        + ["--queries", "10", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["corpus"]["instances"] == 270
    assert set(data["c_find_study"]) == {"diana-star", "orthanc"}
    assert all(row["matches"] == 10 for row in data["c_find_study"].values())  # one study per Patient ID
    moves = data["c_move_series"]
    assert moves["diana-star"]["completed"] == moves["orthanc"]["completed"] == 20
    assert moves["diana-star"]["failed"] == 0
    # the same files, in multipart bodies whose boundaries differ
    sizes = [row["MB"] for row in data["wado_series"].values()]
    assert len(sizes) == 2 and min(sizes) > 0 and abs(sizes[0] - sizes[1]) <= 0.05 * max(sizes)
    assert {"diana-star (prepared)", "diana-star (per instance)", "orthanc"} == set(data["wado_metadata_study"])
    assert len(data["targets"]) == 5 and "| target | result | met? |" in (out / "results.md").read_text()
