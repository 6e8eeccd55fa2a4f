"""Who used the machine's cores during a benchmark phase: given processes, this one, and the whole machine.

Reads /proc only (Linux): a process's user + system CPU seconds (all its threads) from
/proc/<pid>/stat, the machine's busy and total time from the first line of /proc/stat. On a shared
machine this tells whether a phase had the cores to itself, and whether they were saturated.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PhaseCpu", "busy_share", "machine_ticks", "own_cpu_s", "process_cpu_s"]

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (every thread), 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot; idle and iowait are not busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is already in user.
    total = sum(values[:8])
    return total - values[3] - values[4], total


def busy_share(start: tuple[int, int], end: tuple[int, int]) -> float:
    """The machine's busy fraction of all its CPUs between two ``machine_ticks()`` readings."""
    return (end[0] - start[0]) / max(1, end[1] - start[1])


def own_cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class PhaseCpu:
    """CPU seconds of named processes, of this process (the harness) and of the machine over one phase.

    ``start()`` at the phase's start, ``stop()`` at its end; ``report()`` gives seconds and cores
    (CPU seconds per second of the phase) for each, the machine's busy fraction of all its CPUs,
    and what the rest of the machine (everything not named, other users' work) took.
    """

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _stop: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        busy, total = machine_ticks()
        sample = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        sample.update({"_harness": own_cpu_s(), "_busy": busy / _TICK, "_total": total / _TICK})
        sample["_wall"] = time.monotonic()
        return sample

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> None:
        self._stop = self._sample()

    def report(self) -> dict[str, object]:
        d = {key: self._stop[key] - self._start[key] for key in self._start}
        wall = d["_wall"]
        named = {name: round(d[name], 1) for name in self.pids}
        accounted = sum(d[name] for name in self.pids) + d["_harness"]
        cpus = os.cpu_count() or 1
        busy_s = d["_busy"]
        return {
            "wall_s": round(wall, 1),
            "cpu_s": named,
            "cores": {name: round(d[name] / wall, 2) for name in self.pids},
            "harness_cpu_s": round(d["_harness"], 1),
            "machine_cpus": cpus,
            "machine_busy_fraction": round(busy_s / d["_total"], 3) if d["_total"] else None,
            "machine_busy_cores": round(busy_s / wall, 2),
            # Busy time of the machine not spent by the named processes or the harness: the rest of
            # the machine (other users' work, the kernel's own threads).
            "others_cores": round(max(0.0, busy_s - accounted) / wall, 2),
        }
