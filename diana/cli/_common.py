"""What every command shares: stopping on signals, starting a metrics endpoint, saying what went wrong."""

from __future__ import annotations

import signal
import sys
import threading

from diana.config import Config
from diana.credentials import redact

__all__ = ["stop_on_signals", "start_metrics", "fail"]


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, for services that stop cleanly between two units of work."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def start_metrics(cfg: Config, port: int) -> None:
    """Serve Prometheus /metrics on ``port`` (0: none)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=cfg.metrics.host)


def fail(command: str, message: str, code: int = 2) -> int:
    """Print ``diana COMMAND: MESSAGE`` on stderr and return the exit status (2: usage, 1: the world)."""
    print(f"diana {command}: {redact(message)}", file=sys.stderr)
    return code
