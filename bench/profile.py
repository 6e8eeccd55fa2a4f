"""Sample a running process with py-spy and say where its time went (top frames).

Used by ``python -m bench.ingest`` around the receiver's one-association run. py-spy comes with the
project's ``profile`` extra (``pip install -e '.[profile]'``); without it the benchmark says so and
reports no profile rather than failing the whole run.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Profiler", "summarise_folded"]

# py-spy's raw ("folded") format: "frame;frame;frame count", each frame "function (file:line)".
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """``handle_store (producers/scp.py:72)`` → ``handle_store (producers/scp.py)``; short file paths."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/wt-", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/wt-":
                path = path.split("/", 1)[1] if "/" in path else path
    return f"{match['function']} ({path})"


def summarise_folded(text: str, top: int = 12) -> dict:
    """Top frames by own samples (where the CPU was) and by inclusive samples (what called it)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        # The first element is the process or thread label when py-spy adds one: not a frame.
        frames = [f for f in frames if not f.startswith(("process ", "thread ", "Thread "))] or frames
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return {"samples": 0, "own": [], "inclusive": []}

    def rows(counter: Counter[str]) -> list[dict]:
        return [{"frame": f, "percent": round(100 * n / total, 1)} for f, n in counter.most_common(top)]

    return {"samples": total, "own": rows(own), "inclusive": rows(inclusive)}


@dataclass
class Profiler:
    """``py-spy record`` of one process (and its children) between ``start`` and ``stop``."""

    pid: int
    output: Path
    rate: int = 200
    proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return _py_spy() is not None

    def start(self) -> None:
        binary = _py_spy()
        if binary is None:
            return
        self.proc = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(self.pid),
                "--subprocesses",
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--output",
                str(self.output),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        if not self.output.exists():
            return None
        return summarise_folded(self.output.read_text())


def _py_spy() -> str | None:
    import sys

    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")
