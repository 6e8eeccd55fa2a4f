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

# The real vendor dose reports: read-only workplace data beside the checkout (never copied into it).
DOSE_ACCEPTANCE_DIR = Path(os.environ.get("DIANA_DOSE_ACCEPTANCE_DIR", REPO.parent / "shared" / "acceptance" / "dose"))


def dose_acceptance_dir() -> Path:
    """The acceptance folder; a test that needs it fails (never skips) when it is not there."""
    import pytest

    if not (DOSE_ACCEPTANCE_DIR / "expected.json").is_file():
        pytest.fail(
            f"no dose acceptance files at {DOSE_ACCEPTANCE_DIR}: put ../shared/acceptance/dose beside the "
            f"checkout or set DIANA_DOSE_ACCEPTANCE_DIR",
            pytrace=False,
        )
    return DOSE_ACCEPTANCE_DIR


def port(number: int) -> int:
    """A test port, shifted by DIANA_TEST_PORT_OFFSET."""
    return number + PORT_OFFSET
