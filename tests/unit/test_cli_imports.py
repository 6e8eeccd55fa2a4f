"""The ``diana`` command does not import what it never uses: rich (structlog's optional tracebacks) in any
command; aiohttp (opensearch-py's async client) in ``diana reindex``; tqdm when the progress bar is off.
Each was 0.02-0.1 s of a reindex's start (docs/PERFORMANCE.md, "The
reindex command's imports"). Checked in a fresh interpreter, as a command runs."""

from __future__ import annotations

import subprocess
import sys

_AFTER_AN_UNKNOWN_KIND = """
import sys
from diana.cli import main
code = main(["reindex", "--kinds", "no-such-kind", "--no-progress"])
print(code, "opensearchpy" in sys.modules, *(sys.modules.get(m, "absent") for m in ("aiohttp", "rich")))
"""

_BARS = """
import sys
from diana.cli._common import progress_bar
with progress_bar(True, unit="event") as bar:
    bar.total = 3
    bar.refresh()
    bar.update(3)
print("tqdm" in sys.modules, type(progress_bar(False, total=1, disable=True)).__name__)
"""


def test_reindex_imports_its_client_without_aiohttp_or_rich() -> None:
    ran = subprocess.run([sys.executable, "-c", _AFTER_AN_UNKNOWN_KIND], capture_output=True, text=True, timeout=120)
    code, client_imported, aiohttp, rich = ran.stdout.split()
    assert code == "2", ran.stderr  # the unknown kind is refused after the imports
    assert client_imported == "True"
    assert aiohttp == "None" and rich == "None"


def test_a_progress_bar_turned_off_does_not_import_tqdm() -> None:
    ran = subprocess.run([sys.executable, "-c", _BARS], capture_output=True, text=True, timeout=120)
    assert ran.stdout.split() == ["False", "tqdm"], ran.stderr  # tqdm only for the bar that is on


def test_a_blocked_module_is_still_importable_where_it_is_needed() -> None:
    # The dose worker's process (faust) imports aiohttp: the block is the reindex command's alone.
    ran = subprocess.run(
        [sys.executable, "-c", "import diana.cli, aiohttp, sys; print(type(sys.modules['aiohttp']).__name__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.stdout.split() == ["module"], ran.stderr
