"""Waiting for the pipeline's receiver in tests and benchmarks."""

from __future__ import annotations

import subprocess
import time

import pytest

from diana.config import Config
from tests.support.paths import TEST_HOME


def wait_for_echo(cfg: Config, timeout: float, procs: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in (procs or {}).items():
            if proc.poll() is not None:
                pytest.fail(f"pipeline process {name} exited with {proc.returncode}; see {TEST_HOME}/logs/{name}.log")
        r = subprocess.run(
            ["echoscu", "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port)],
            capture_output=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        if r.returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"receiver did not answer C-ECHO within {timeout}s")
