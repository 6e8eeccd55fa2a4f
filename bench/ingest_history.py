"""Every recorded bench.ingest run, target by target: the figure, the same run's floor, met or not.

    python -m bench.ingest_history [--folder docs/bench] [--since 2026-11-29] [--runs]

Reads each ``results.json`` under the folder that carries issue 19's targets (bench.ingest writes
them) and prints, per target, how many runs met it, the range of its figure, and how often the
same run's floor could have met it; then the receiver's floors as ratios to the same run's storescp.
A target that even the floor misses in a run is out of reach in that run (bench/receiver_floor.py).
``--runs`` adds one line per run. The runs include experiments (folder names say which, and
docs/PERFORMANCE.md says what each was): this is the record, not a selection.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
# The floors bench.ingest runs over one association, from pynetdicom alone to the strict one.
FLOORS = ("floor: bare", "floor: fsync", "floor: kafka", "floor: parse", "floor: header")


@dataclass(frozen=True)
class Run:
    name: str  # the results folder, relative to the folder read
    when: str
    storescp_s: float
    targets: list[dict]
    floor_ratios: dict[str, float]  # floor -> its wall time over the same run's storescp's, 1 association


def read_runs(folder: Path, since: str = "") -> list[Run]:
    runs = []
    for path in sorted(folder.rglob("results.json")):
        data = json.loads(path.read_text())
        if "targets" not in data or data.get("when", "") < since:
            continue
        one = {row["receiver"]: row for row in data["runs"] if row["associations"] == 1}
        if "storescp" not in one:
            continue
        storescp = one["storescp"]["wall_s"]
        floors = {name: round(one[name]["wall_s"] / storescp, 2) for name in FLOORS if name in one}
        runs.append(Run(str(path.parent.relative_to(folder)), data["when"], storescp, data["targets"], floors))
    return sorted(runs, key=lambda run: run.when)


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def summary(runs: list[Run]) -> str:
    names = list(dict.fromkeys(t["target"] for run in runs for t in run.targets))
    lines = [
        f"{len(runs)} runs, {runs[0].when[:16]} to {runs[-1].when[:16]} UTC (storescp {_span([r.storescp_s for r in runs])} s)",
        "",
        "| target | bound | runs | met | figure | floor, same run | floor could meet it |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for name in names:
        # A run without the reference (bench.ingest --no-orthanc) has no figure for its target.
        rows = [t for run in runs for t in run.targets if t["target"] == name and t["value"] is not None]
        floors = [t["floor"] for t in rows if t.get("floor") is not None]
        could = sum(1 for t in rows if t.get("floor_met"))
        lines.append(
            f"| {name} | {rows[0]['bound']} | {len(rows)} | {sum(1 for t in rows if t['met'])} "
            f"| {_span([t['value'] for t in rows])} | {_span(floors)} | {could if floors else '-'} |"
        )
    lines += ["", "| floor (1 association) | runs | wall × storescp |", "|---|---:|---|"]
    for name in FLOORS:
        ratios = [run.floor_ratios[name] for run in runs if name in run.floor_ratios]
        if ratios:
            lines.append(f"| {name.removeprefix('floor: ')} | {len(ratios)} | {_span(ratios)} |")
    return "\n".join(lines)


def per_run(runs: list[Run]) -> str:
    lines = [
        "",
        "| run | when (UTC) | storescp s | " + " | ".join(_short(t["target"]) for t in runs[-1].targets) + " |",
    ]
    lines.append("|---|---|---:|" + "---:|" * len(runs[-1].targets))
    for run in runs:
        by_name = {t["target"]: t for t in run.targets}
        cells = []
        for name in (t["target"] for t in runs[-1].targets):
            t = by_name.get(name)
            cells.append("-" if t is None or t["value"] is None else f"{t['value']:g}{' ✓' if t['met'] else ''}")
        lines.append(f"| {run.name} | {run.when[:16]} | {run.storescp_s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(target: str) -> str:
    return target.split(",")[0].replace("diana ", "").replace("receipt → searchable", "p95 searchable")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest_history", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--folder", type=Path, default=_REPO / "docs" / "bench", help="where the results are (default docs/bench)"
    )
    ap.add_argument("--since", default="", help="only runs at or after this ISO date/time (UTC), e.g. 2026-11-29T17:00")
    ap.add_argument("--runs", action="store_true", help="also one line per run")
    args = ap.parse_args(argv)
    runs = read_runs(args.folder, args.since)
    if not runs:
        print(f"no bench.ingest results with targets under {args.folder}", file=sys.stderr)
        return 1
    print(summary(runs))
    if args.runs:
        print(per_run(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
