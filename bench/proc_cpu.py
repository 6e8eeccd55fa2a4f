"""CPU seconds of a process or thread so far, from its /proc stat file."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat: Path) -> float:
    """User + system time of /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat (OSError: it ended)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS
