"""The receiver's housekeeping threads (recovery, reconciliation, sweeping), each surviving its own errors.

A background thread that died on an unexpected error (a disk error while sweeping, a header that
pydicom chokes on while republishing) used to stop its work silently for the rest of the
process' life. Here every run is guarded: the error is logged with its traceback, counted, and
the task runs again at its next turn. Metrics show that each task is alive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from prometheus_client import Counter, Gauge

__all__ = ["run_guarded", "start_periodic", "start_until_done"]

log = structlog.get_logger("diana.receiver.background")

ERRORS = Counter("diana_background_errors_total", "Unexpected errors in the receiver's background tasks", ["task"])
LAST_SUCCESS = Gauge(
    "diana_background_last_success_timestamp_seconds", "When each background task last completed a run", ["task"]
)


def run_guarded(name: str, task: Callable[[], object]) -> bool:
    """Run ``task`` once; True if it completed, False (logged, counted) if it raised."""
    try:
        task()
    except Exception:
        ERRORS.labels(name).inc()
        log.exception("background.failed", task=name)
        return False
    LAST_SUCCESS.labels(name).set_to_current_time()
    return True


def start_periodic(
    name: str, interval_s: float, task: Callable[[], object], stopped: threading.Event
) -> threading.Thread:
    """Run ``task`` every ``interval_s`` until ``stopped``; an error waits for the next turn."""

    def loop() -> None:
        while not stopped.wait(interval_s):
            run_guarded(name, task)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def start_until_done(
    name: str, task: Callable[[], object], stopped: threading.Event, max_backoff_s: float = 30.0
) -> threading.Thread:
    """Run ``task`` until one run completes, with a doubling backoff between failed runs."""

    def loop() -> None:
        backoff = 1.0
        while not stopped.is_set():
            if run_guarded(name, task):
                return
            stopped.wait(backoff)
            backoff = min(backoff * 2, max_backoff_s)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
