"""Where the JVMs' CPU goes: per-thread CPU of every Java process (Kafka, OpenSearch), sampled each second.

    python -m bench.jvm_threads sample --out jvm.jsonl --seconds 240   (beside a bench.ingest run)
    python -m bench.jvm_threads busiest jvm.jsonl --window 18           (the busiest 18 s, by thread)

Threads are grouped by process kind and name without its number ("kafka:C2 CompilerThre",
"opensearch:opensearch[dian"): the JIT compiler threads, the request handlers, GC. Read from
/proc/<pid>/task/<tid>/stat (user + system ticks); nothing is attached to the JVMs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


def _kind(pid: Path) -> str | None:
    try:
        if (pid / "comm").read_text().strip() != "java":
            return None
        command = (pid / "cmdline").read_bytes()
    except OSError:
        return None
    if b"kafka.Kafka" in command:
        return "kafka"
    return "opensearch" if b"opensearch" in command.lower() else "java"


def snapshot() -> dict[str, float]:
    """CPU seconds so far of each kind of JVM thread."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in Path("/proc").glob("[0-9]*"):
        kind = _kind(pid)
        if kind is None:
            continue
        for task in (pid / "task").glob("*"):
            try:
                name = re.sub(r"[-#\d]+$", "", (task / "comm").read_text().strip())
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended meanwhile
            key = f"{kind}:{name}"
            totals[key] = totals.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def sample(out: Path, seconds: float) -> None:
    end = time.time() + seconds
    with out.open("w") as fh:
        while time.time() < end:
            fh.write(json.dumps({"t": time.time(), "s": snapshot()}) + "\n")
            fh.flush()
            time.sleep(1)


def busiest(path: Path, window_s: float, top: int = 15) -> list[str]:
    """The ``window_s`` seconds with the most JVM CPU, and its threads by CPU."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    totals = [sum(r["s"].values()) for r in rows]
    best: tuple[float, int, int] | None = None
    for i, start in enumerate(rows):
        j = next((j for j in range(i, len(rows)) if rows[j]["t"] - start["t"] >= window_s), None)
        # A JVM that ended takes its ticks with it: a window that ends after that is not comparable.
        if j is not None and totals[j] >= totals[i] and (best is None or totals[j] - totals[i] > best[0]):
            best = (totals[j] - totals[i], i, j)
    if best is None:
        return [f"no window of {window_s} s in {path}"]
    cpu, i, j = best
    before, after = rows[i]["s"], rows[j]["s"]
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    compiling = sum(v for k, v in delta.items() if "Compiler" in k)
    lines = [
        f"busiest {rows[j]['t'] - rows[i]['t']:.0f} s from {time.strftime('%H:%M:%S', time.gmtime(rows[i]['t']))} UTC: "
        f"{cpu:.1f} CPU s of JVM threads, {compiling:.1f} of them in JIT compiler threads"
    ]
    lines += [f"{v:7.2f}  {k}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1])[:top]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jvm_threads", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("sample", help="sample every Java process's threads once a second")
    run.add_argument("--out", type=Path, required=True, help="JSON lines, one snapshot each")
    run.add_argument("--seconds", type=float, default=240, help="how long (default 240)")
    read = commands.add_parser("busiest", help="the busiest window of a sample, thread by thread")
    read.add_argument("file", type=Path)
    read.add_argument("--window", type=float, default=18, help="seconds (default 18)")
    args = parser.parse_args(argv)
    if args.command == "sample":
        sample(args.out, args.seconds)
    else:
        print("\n".join(busiest(args.file, args.window)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
