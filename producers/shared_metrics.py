"""One metrics endpoint for several receiver processes (prometheus_client's multiprocess mode).

Kept apart from everything that defines metrics: it must run before prometheus_client is imported
in the process, since its multiprocess mode is chosen at import, from PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["shared_metrics"]

_PREFIX = "diana-receiver-metrics-"


@contextmanager
def shared_metrics(port: int, host: str) -> Iterator[Callable[[], None]]:
    """Every worker's metrics on one endpoint on ``port`` (0: none), served by the parent.

    Each worker (forked later) writes its values to files in a temporary folder; the parent reads
    them all for every scrape. Yields the function that starts the endpoint: call it once the
    workers are forked (its server thread should not be running while the parent forks). The
    folder goes at the end.
    """
    _remove_folders_of_dead_receivers()
    folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder

    def serve() -> None:
        if port:
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            start_http_server(port, addr=host, registry=registry)

    try:
        yield serve
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_folders_of_dead_receivers() -> None:
    """Folders left by receivers that were killed (SIGKILL skips the clean-up above): each folder is
    named after the parent's pid, and a folder whose process is gone has no reader and no writer."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(_PREFIX):
            continue
        pid = name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
