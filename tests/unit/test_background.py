"""Unit: a background task that raises is logged, counted and run again; it never ends its thread."""

from __future__ import annotations

import threading

from diana.producers.background import ERRORS, LAST_SUCCESS, run_guarded, start_periodic


def _count(name: str) -> float:
    return ERRORS.labels(name)._value.get()


def test_an_error_is_counted_and_the_next_turn_runs():
    runs: list[int] = []

    def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise OSError("disk went away for a moment")

    stopped = threading.Event()
    before = _count("flaky")
    thread = start_periodic("flaky", 0.05, flaky, stopped)
    while len(runs) < 3:
        stopped.wait(0.05)
    stopped.set()
    thread.join(2)
    assert _count("flaky") == before + 1
    assert LAST_SUCCESS.labels("flaky")._value.get() > 0
    assert not thread.is_alive()


def test_run_guarded_says_whether_the_run_completed():
    assert run_guarded("ok", lambda: None) is True
    assert run_guarded("boom", lambda: 1 / 0) is False
