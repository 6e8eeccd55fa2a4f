"""CPU of Kafka, OpenSearch and the diana processes over a window, in % of one core.

    .venv/bin/diana run &          # or anything else running; let it settle first
    python -m bench.idle_cpu --seconds 60

What a running pipeline costs when nothing arrives (issue 19, stop 24: the consumers' fetch settings).
Read from /proc/<pid>/stat (user + system) of every process whose command line is Kafka's
(``kafka.Kafka``), OpenSearch's (``org.opensearch``) or a Python running diana.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.proc_cpu import cpu_seconds


def _kind(pid: Path) -> str | None:
    try:
        command = (pid / "cmdline").read_bytes()
    except OSError:
        return None
    if b"kafka.Kafka" in command:
        return "kafka"
    if b"org.opensearch" in command:
        return "opensearch"
    arguments = command.split(b"\0")
    # `diana ...` (the console script) or `python -m diana.cli ...`, and the processes they fork.
    if b"python" in arguments[0] and any(a.endswith(b"/diana") or a == b"diana.cli" for a in arguments[1:3]):
        return "diana"
    return None


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Kind and CPU seconds so far of every process of a kind."""
    found: dict[int, tuple[str, float]] = {}
    for pid in Path("/proc").glob("[0-9]*"):
        kind = _kind(pid)
        if kind is None:
            continue
        try:
            found[int(pid.name)] = (kind, cpu_seconds(pid / "stat"))
        except OSError:
            continue  # ended meanwhile
    return found


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two readings by each kind, over the processes present at both (one
    that ended or started meanwhile would count its whole life, or take it away)."""
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        if pid in before:
            spent[kind] = spent.get(kind, 0.0) + cpu - before[pid][1]
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.idle_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="the window (default 60)")
    args = ap.parse_args(argv)
    before = cpu_by_process()
    time.sleep(args.seconds)
    spent = cpu_by_kind(before, cpu_by_process())
    if not spent:
        print("no Kafka, OpenSearch or diana process ran through the window", file=sys.stderr)
        return 1
    for kind in sorted(spent):
        print(f"{kind}: {spent[kind] / args.seconds * 100:.2f} % of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
