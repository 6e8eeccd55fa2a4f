"""Shared by every test: the client loggers' repeat filters (diana/logs.py) forgotten after each test, so
that no count held back in one test is written, by its timer or at exit, into another's output."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _forget_held_log_lines() -> Iterator[None]:
    yield
    from diana.logs import _CLIENT_REPEATS

    for repeats in _CLIENT_REPEATS:
        repeats.reset()
