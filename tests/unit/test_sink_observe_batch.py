"""A sink's batch metrics in a process that never configured logging (an in-process sink run in a test).

Run in a fresh interpreter: this test process may already have configured structlog, which would
hide the failure (asking structlog's unconfigured logger for its level raised AttributeError).
"""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = """
import time
from sinks.consumer import EVENT_AGE, _observe_batch
from confluent_kafka import TIMESTAMP_CREATE_TIME

class Written:
    def __init__(self, offset):
        self._offset = offset
    def timestamp(self):
        return TIMESTAMP_CREATE_TIME, int((time.time() - 2) * 1000)
    def topic(self):
        return "dicom.instances"
    def partition(self):
        return 0
    def offset(self):
        return self._offset

now = time.time()
_observe_batch("archive", [Written(7), Written(8)], now - 1, now - 0.5, now)
print(EVENT_AGE.labels("archive")._sum.get())
"""


def test_observe_batch_without_configured_logging_records_event_ages() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    # Two events, each about 2 s old when written.
    assert 3.5 < float(result.stdout.strip()) < 5.0
