"""Where the JVMs' CPU goes: per-thread CPU of every Java process (Kafka, OpenSearch), sampled each second.

    python -m bench.jvm_threads sample --out jvm.jsonl --seconds 240   (beside a bench.ingest run)
    python -m bench.jvm_threads busiest jvm.jsonl --window 18           (the busiest 18 s, by thread)

Threads are grouped by process kind and name without its numbers ("kafka:C2 CompilerThread",
"opensearch:opensearch[][write][T]"): the JIT compiler threads, the request handlers, GC. CPU is read
from /proc/<pid>/task/<tid>/stat (user + system ticks). The kernel keeps only 15 characters of a
thread's name, and every OpenSearch thread starts "opensearch[node"; the full Java names come from
``jcmd <pid> Thread.print`` (its nid is the thread id), asked again at most every 5 s while a thread is
unnamed. Without jcmd the kernel's names are used.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.proc_cpu import cpu_seconds

_JCMD_EVERY_S = 5.0
# nid: hexadecimal up to JDK 17, decimal from JDK 18 on.
_THREAD_LINE = re.compile(r'^"(?P<name>.*)" .*\bnid=(?P<nid>0x[0-9a-f]+|\d+)', re.MULTILINE)


def java_thread_names(thread_dump: str) -> dict[int, str]:
    """Thread id → Java thread name, from ``jcmd <pid> Thread.print``'s output."""
    return {int(m["nid"], 0): m["name"] for m in _THREAD_LINE.finditer(thread_dump)}


def thread_group(name: str) -> str:
    """A thread's name without what numbers it among its kind (node names, pool indices, listener ports)."""
    name = re.sub(r"^opensearch\[[^\]]*\]", "opensearch[]", name)
    return re.sub(r"[-#\d]+(?=$|\]|-)", "", name)


class ThreadNames:
    """Full Java thread names of each JVM, from jcmd (cached; asked again for threads it did not name)."""

    def __init__(self) -> None:
        self.jcmd = shutil.which("jcmd")
        self.names: dict[int, dict[int, str]] = {}
        # Threads a dump did not name (the JVM's first thread, native ones): never asked about again,
        # or jcmd would run every 5 s for the whole sample and skew what it measures.
        self.unnamed: dict[int, set[int]] = {}
        self.asked: dict[int, float] = {}

    def name(self, pid: int, tid: int) -> str | None:
        known = self.names.get(pid, {})
        if tid in known or tid in self.unnamed.get(pid, ()) or not self.jcmd:
            return known.get(tid)
        if time.monotonic() - self.asked.get(pid, -_JCMD_EVERY_S) >= _JCMD_EVERY_S:
            self.asked[pid] = time.monotonic()
            alive = {int(task.name) for task in Path(f"/proc/{pid}/task").glob("*")}
            try:
                dump = subprocess.run(
                    [self.jcmd, str(pid), "Thread.print"], capture_output=True, text=True, timeout=20
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                dump = ""
            known = self.names[pid] = {**known, **java_thread_names(dump)}
            self.unnamed.setdefault(pid, set()).update(alive - known.keys())
        return known.get(tid)


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


def snapshot(names: ThreadNames | None = None) -> dict[str, float]:
    """CPU seconds so far of each kind of JVM thread."""
    totals: dict[str, float] = {}
    for pid in Path("/proc").glob("[0-9]*"):
        kind = _kind(pid)
        if kind is None:
            continue
        for task in (pid / "task").glob("*"):
            try:
                cpu = cpu_seconds(task / "stat")
                name = (names.name(int(pid.name), int(task.name)) if names else None) or (task / "comm").read_text()
            except OSError:
                continue  # the thread ended meanwhile
            name = thread_group(name.strip())
            key = f"{kind}:{name}"
            totals[key] = totals.get(key, 0.0) + cpu
    return totals


def sample(out: Path, seconds: float) -> None:
    end = time.time() + seconds
    names = ThreadNames()
    with out.open("w") as fh:
        while time.time() < end:
            fh.write(json.dumps({"t": time.time(), "s": snapshot(names)}) + "\n")
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
