"""Where the tests find the checkout and keep their state."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"

# Shifts every port the integration tests use, so that two suites can run side by side; each offset
# has its own state folder too (the stack fixture resets the stack it finds there).
PORT_OFFSET = int(os.environ.get("DIANA_TEST_PORT_OFFSET", "0"))
TEST_HOME = REPO / "var" / ("test" if PORT_OFFSET == 0 else f"test-{PORT_OFFSET}")


def port(number: int) -> int:
    """A test port, shifted by DIANA_TEST_PORT_OFFSET."""
    return number + PORT_OFFSET
