"""`diana run`: the local stack and every pipeline process on one host, stopped together.

Each pipeline process is a `diana` subcommand in its own process group, so that Ctrl-C reaches
this supervisor only; it then stops them in order and waits for each (SIGKILL after 30 s).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import structlog

from diana.config import Config

__all__ = ["PIPELINE", "run_pipeline", "wait_for_receiver"]

log = structlog.get_logger("diana")

# name -> the `diana` subcommand that runs it
PIPELINE = (
    ("receiver", ["receive"]),
    ("aggregates", ["aggregate"]),
    ("dose", ["dose"]),
    ("archive-sink", ["sink", "archive"]),
    ("opensearch-sink", ["sink", "opensearch"]),
    ("metadata-sink", ["sink", "metadata"]),
)


def wait_for_receiver(cfg: Config, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once the receiver answers a C-ECHO (so it is announced only when it listens)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="DIANA-RUN")
    ae.add_requested_context(Verification)
    quiet = logging.getLogger("pynetdicom")
    level, quiet.level = quiet.level, logging.CRITICAL  # refused connections while it starts are expected
    host = "127.0.0.1" if cfg.receiver.host in ("0.0.0.0", "") else cfg.receiver.host
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            assoc = ae.associate(host, cfg.receiver.port, ae_title=cfg.receiver.ae_title)
            if assoc.is_established:
                assoc.send_c_echo()
                assoc.release()
                return
            time.sleep(0.5)
    finally:
        quiet.setLevel(level)
    raise RuntimeError("the receiver did not answer a C-ECHO; see its log above")


def run_pipeline(
    cfg: Config,
    config_file: str | None,
    stop: threading.Event,
    on_ready: Callable[[], None],
    extra: list[tuple[str, list[str]]] | None = None,
) -> None:
    """Start every pipeline process (and ``extra`` ones), call ``on_ready`` once the receiver answers,
    supervise until ``stop`` is set or a process exits, then stop them all."""
    base = [sys.executable, "-m", "diana.cli"] + (["--config", config_file] if config_file else [])
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, sub in [*PIPELINE, *(extra or [])]:
            procs[name] = subprocess.Popen(base + sub, start_new_session=True)
            log.info("pipeline.started", process=name, pid=procs[name].pid)
        wait_for_receiver(cfg, procs["receiver"])
        on_ready()
        while not stop.is_set():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    log.error("pipeline.exited", process=name, code=proc.returncode)
                    stop.set()
            stop.wait(1.0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("pipeline.kill", process=name)
                proc.kill()
                proc.wait()
        log.info("pipeline.stopped")
