"""The receiver's shared metrics folder: a receiver killed with SIGKILL leaves its folder behind; the
next receiver removes it, and leaves the folders of receivers still running."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from producers.shared_metrics import shared_metrics


def test_folders_of_killed_receivers_go_at_the_next_start(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # Set, then removed: so that the value shared_metrics sets is taken away again after the test.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    (tmp_path / f"diana-receiver-metrics-{dead_pid}-abc").mkdir()
    (tmp_path / f"diana-receiver-metrics-{dead_pid}-abc" / "counter_1.db").write_bytes(b"x")
    running = tmp_path / f"diana-receiver-metrics-{os.getppid()}-def"
    running.mkdir()
    unrelated = tmp_path / "diana-receiver-metrics-x1y2z3"
    unrelated.mkdir()

    with shared_metrics(0, "127.0.0.1"):
        own = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [os.path.basename(own), running.name, unrelated.name]
        )
        assert os.path.basename(own).startswith(f"diana-receiver-metrics-{os.getpid()}-")
    assert not os.path.exists(own)
