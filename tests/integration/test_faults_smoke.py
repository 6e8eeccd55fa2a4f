"""The fault-injection suite's short form (bench/faults.py): every scenario must keep its invariants.

It runs its own stack and pipeline on other ports (27092, 27200, 27112); the full form
(2,000 instances per scenario) is `python -m bench.faults`, results in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import REPO

# The module's fixture runs all seven scenarios (4-5 minutes here, longer on a loaded machine)
# before the first test: it may need more than the suite's 600 s per-test limit.
pytestmark = pytest.mark.timeout(2400)

SCENARIOS = [
    "receiver-kill",
    "sinks-kill",
    "broker-down",
    "opensearch-down",
    "disk-full",
    "slow-consumer",
    "worker-kill",
]


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    out = REPO / "var" / "faults-smoke"
    result = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--instances", "200", "--short", "--timeout", "240", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    found = {o["scenario"]: o for o in json.loads((out / "results.json").read_text())}
    assert list(found) == SCENARIOS, result.stdout[-3000:] + result.stderr[-3000:]
    return found


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_nothing_acknowledged_is_lost_or_doubled(outcomes, scenario):
    o = outcomes[scenario]
    assert o["acknowledged"] == o["sent"] == 200, o["problems"]
    assert o["archived"] == o["indexed"] == 200 and o["lost"] == 0 and o["duplicates"] == 0, o["problems"]
    assert o["orphans"] == 0 and o["unexplained_deadletters"] == 0, o["problems"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_invariant_holds(outcomes, scenario):
    o = outcomes[scenario]
    # On failure the threads of every pipeline process (py-spy) say where a stalled one waits.
    stacks = "".join(f"\n--- {name}\n{stack}" for name, stack in o["stacks"].items())
    notes = "".join(f"\n{note}" for note in o["notes"])
    assert o["passed"], "; ".join(o["problems"]) + notes + stacks
