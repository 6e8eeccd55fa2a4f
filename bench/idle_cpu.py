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
    if b"diana" in command and b"python" in command.split(b"\0")[0]:
        return "diana"
    return None


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds so far of each kind of process."""
    totals: dict[str, float] = {}
    for pid in Path("/proc").glob("[0-9]*"):
        kind = _kind(pid)
        if kind is None:
            continue
        try:
            totals[kind] = totals.get(kind, 0.0) + cpu_seconds(pid / "stat")
        except OSError:
            continue  # ended meanwhile
    return totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.idle_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="the window (default 60)")
    args = ap.parse_args(argv)
    before = cpu_by_kind()
    time.sleep(args.seconds)
    after = cpu_by_kind()
    if not after:
        print("no Kafka, OpenSearch or diana process is running", file=sys.stderr)
        return 1
    for kind in sorted(after):
        print(f"{kind}: {(after[kind] - before.get(kind, 0.0)) / args.seconds * 100:.2f} % of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
