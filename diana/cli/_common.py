"""What every command shares: stopping on signals, starting a metrics endpoint, saying what went wrong."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from diana.config import Config
from diana.credentials import redact

__all__ = ["stop_on_signals", "start_metrics", "fail", "progress_bar"]


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


class _NoBar:
    """What a command does with a tqdm bar (update, total, refresh), doing nothing."""

    total: int | None = None

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def refresh(self) -> None:
        pass


def progress_bar(disabled: bool, **options: Any) -> Any:
    """A tqdm bar with ``options``; with ``disabled`` (--no-progress) a stand-in, without importing tqdm:
    20 ms of a command's start, most of it tqdm looking its own version up in the installed packages."""
    if disabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(**options)
