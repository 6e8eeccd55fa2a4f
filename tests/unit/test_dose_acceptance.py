"""The real vendor dose reports of ../shared/acceptance/dose through `diana acceptance`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diana.operations.dose_acceptance import DISPUTED, run_acceptance
from tests.support.paths import REPO, dose_acceptance_dir


@pytest.fixture(scope="module")
def folder() -> Path:
    return dose_acceptance_dir()


def test_every_listed_value_matches(folder: Path):
    checked, mismatches = run_acceptance(folder)
    assert checked >= 14
    undisputed = [str(m) for m in mismatches if (m.file, m.field) not in DISPUTED]
    assert undisputed == []


def test_every_dispute_is_still_a_real_disagreement(folder: Path):
    _, mismatches = run_acceptance(folder)
    assert set(DISPUTED) <= {(m.file, m.field) for m in mismatches}


def test_acceptance_command(folder: Path):
    result = subprocess.run(
        [sys.executable, "-m", "diana.cli", "acceptance", str(folder)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 mismatches" in result.stdout


def test_acceptance_command_without_data_says_how(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "diana.cli", "acceptance", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "no expected.json" in result.stderr
