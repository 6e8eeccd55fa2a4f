"""Where the tests find the checkout and keep their state."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_HOME = REPO / "var" / "test"
DATA = Path(__file__).resolve().parent / "data"
