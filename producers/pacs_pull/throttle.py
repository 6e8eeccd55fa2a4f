"""When a retrieve may start: inside the configured time windows, and under the hourly limit.

The number of retrieves at once is bounded by the job's worker threads; this gate bounds when each
may start. Starts already made (also before a restart, from the job's ledger) count towards the
hour, so a restart does not reset the limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from datetime import time as clock

__all__ = ["TimeWindows", "StartGate"]


class TimeWindows:
    """``"22:00-06:00,12:00-13:00"`` (local time; a window may pass midnight); empty: always open."""

    def __init__(self, spec: str):
        self.spec = spec.strip()
        self.windows: list[tuple[clock, clock]] = []
        for part in filter(None, (p.strip() for p in self.spec.split(","))):
            start, sep, end = part.partition("-")
            try:
                window = (clock.fromisoformat(start.strip()), clock.fromisoformat(end.strip()))
            except ValueError:
                window = None
            if not sep or window is None or window[0] == window[1]:
                raise ValueError(f"time window {part!r}: write HH:MM-HH:MM, e.g. 22:00-06:00")
            self.windows.append(window)

    def is_open(self, now: datetime) -> bool:
        if not self.windows:
            return True
        t = now.time()
        return any((a <= t < b) if a < b else (t >= a or t < b) for a, b in self.windows)


class StartGate:
    """Blocks a retrieve until a window is open and fewer than ``per_hour`` started in the last hour.

    A place is taken before the retrieve's association is asked for, and given back when the PACS
    did not make it: only retrieves the PACS took count towards the hour."""

    def __init__(self, windows: TimeWindows, per_hour: int, earlier_starts: Iterable[float] = ()):
        self.windows = windows
        self.per_hour = per_hour
        self._starts: deque[float] = deque(sorted(t for t in earlier_starts if t > time.time() - 3600))
        self._waiting = threading.Lock()  # one waiter at a time, so two cannot take the same last place
        self._lock = threading.Lock()  # the starts; not held while waiting, so a place can be given back

    def _wait_needed(self, now: float) -> tuple[float, str]:
        if not self.windows.is_open(datetime.fromtimestamp(now)):
            return 30.0, f"outside the time windows {self.windows.spec}: waiting for the next one"
        while self._starts and self._starts[0] <= now - 3600:
            self._starts.popleft()
        if self.per_hour and len(self._starts) >= self.per_hour:
            wait = self._starts[0] + 3600 - now
            return wait, f"{self.per_hour} studies started in the last hour: the next may start in {wait:.0f} s"
        return 0.0, ""

    def acquire(self, stop: threading.Event, on_wait: Callable[[str], None]) -> float | None:
        """Wait for the right to start one retrieve: the place taken (for ``give_back``), or None if
        ``stop`` was set meanwhile."""
        told = ""
        with self._waiting:
            while not stop.is_set():
                now = time.time()
                with self._lock:
                    wait, why = self._wait_needed(now)
                    if wait <= 0:
                        self._starts.append(now)
                        return now
                if why.split(":")[0] != told:
                    told = why.split(":")[0]
                    on_wait(why)
                stop.wait(min(wait, 30.0))
        return None

    def give_back(self, place: float) -> None:
        """The place ``acquire`` gave, not used: no retrieve started with it (the PACS refused it)."""
        with self._lock:
            try:
                self._starts.remove(place)
            except ValueError:  # already out of the hour
                pass
