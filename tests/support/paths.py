"""Where the tests find the checkout and keep their state."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_HOME = REPO / "var" / "test"
DATA = Path(__file__).resolve().parent / "data"

# Shifts every port the integration tests use, so that two checkouts can run their suites side by side.
PORT_OFFSET = int(os.environ.get("DIANA_TEST_PORT_OFFSET", "0"))


def port(number: int) -> int:
    """A test port, shifted by DIANA_TEST_PORT_OFFSET."""
    return number + PORT_OFFSET
