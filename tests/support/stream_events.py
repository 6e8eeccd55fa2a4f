"""InstanceArrived events written straight to dicom.instances, for the stream workers' tests (no pixel data, no receiver)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Producer
from pydicom.uid import generate_uid

from diana.config import Config
from diana.schemas.codec import default_codec
from diana.schemas.topics import INSTANCES
from tests.support.paths import REPO

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 120.0, what: str = "condition", interval: float = 1.0) -> T:
    """``check()``'s first truthy result, asked every ``interval`` s; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def instance_event(
    study: str,
    series: str,
    number: int,
    patient_id: str,
    sop: str | None = None,
    received_at: datetime | None = None,
) -> dict[str, Any]:
    """A CT instance's event: a new SOP Instance UID unless ``sop``, received now unless ``received_at``."""
    return {
        "sop_instance_uid": sop or generate_uid(),
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 100,
        "sha256": "0" * 64,
        "landing_path": f"00/{'0' * 64}.dcm",
        "received_at": received_at or datetime.now(UTC),
        "source": "C_STORE",
        "modality": "CT",
        "instance_number": number,
        "patient_id": patient_id,
    }


def send_events(cfg: Config, events: list[dict]) -> None:
    """Publish ``events`` to dicom.instances keyed by study, as the receiver does; wait until all are acknowledged."""
    codec = default_codec()
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    for event in events:
        producer.produce(
            INSTANCES.name, key=event["study_instance_uid"].encode(), value=codec.encode(INSTANCES.value_schema, event)
        )
    assert producer.flush(30) == 0


class AggregatesWorker:
    """``diana aggregate`` as a process of its own, with the test config and ``settings`` (DIANA_* overrides),
    its output in ``log``."""

    def __init__(self, config_file: Path, log: Path, settings: dict[str, str]) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
        self.env.update({"DIANA_CONFIG": str(config_file), **settings})
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "diana.cli", "aggregate"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

    def lines(self, event: str) -> list[str]:
        """The log lines naming ``event``."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if event in line]

    def count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (SIGKILL with ``kill``), then wait; SIGKILL after 30 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
