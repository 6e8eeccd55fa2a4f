"""The fault-injection suite's short form (bench/faults.py): every scenario must keep its invariants.

It runs its own stack and pipeline on other ports (27092, 27200, 27112); the full form
(2,000 instances per scenario) is `python -m bench.faults`, results in docs/RELIABILITY.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_short_form_of_the_fault_suite_keeps_every_invariant():
    out = REPO / "var" / "faults-smoke"
    result = subprocess.run([sys.executable, "-m", "bench.faults", "--instances", "200", "--short",
                             "--timeout", "300", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=1800)
    outcomes = json.loads((out / "results.json").read_text())
    assert [o["scenario"] for o in outcomes] == ["receiver-kill", "worker-kill", "sinks-kill", "broker-down",
                                                 "opensearch-down", "disk-full", "slow-consumer"], result.stdout
    failed = {o["scenario"]: o["problems"] for o in outcomes if not o["passed"]}
    assert not failed, f"{failed}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for o in outcomes:
        assert o["acknowledged"] == o["sent"] == 200 and o["archived"] == o["indexed"] == 200
        assert o["lost"] == 0 and o["duplicates"] == 0 and o["orphans"] == 0
