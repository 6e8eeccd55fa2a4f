"""Several receiver processes on one port, so that associations use every core.

pynetdicom runs associations as threads of one process: under the GIL a receiver uses one core at
most. With ``[receiver] processes`` = N > 1, ``diana receive`` forks N worker processes that each
bind the same address with SO_REUSEPORT; Linux hands every new connection to one of them. The
parent sweeps the landing store's debris once, before any worker listens (a worker sweeping at its
own start would delete files another worker is receiving), then watches: a worker that dies is
started again after a second (the senders of its open associations got no success and retry).

Per worker: its own Kafka producer, its own limits (``max_associations``,
``max_associations_per_host``: the whole receiver admits N times them). Metrics: one endpoint on
``metrics_port``, served by the parent, summing every worker's (prometheus_client's multiprocess
mode, ``shared_metrics.py``; the association gauge has one series per worker, labelled ``pid``). Worker 0 alone runs the outbox tasks (recover: what landed before the
receiver started; reconcile; sweeper). The landing store is shared: a refused publish leaves its
object for reconcile (``LandingStore(shared=True)``), so no worker ever removes an object another
one published. A worker dies with the parent (PR_SET_PDEATHSIG): ``kill -9`` of the receiver
ends every worker, as it ends a single-process receiver.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import structlog

from diana.producers.transport_guard import GuardedServer

__all__ = ["SharedPortServer", "run_workers"]

log = structlog.get_logger("diana.receiver")


class SharedPortServer(GuardedServer):
    """The guarded server, bound with SO_REUSEPORT so that several processes listen on one port."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


_PR_SET_PDEATHSIG = 1


def _worker_main(worker: Callable[[int], None], index: int, parent: int) -> None:
    # Die with the parent, whatever kills it: no orphan keeps the port and answers success.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # the parent's handler is not ours; the receiver sets its own
    worker(index)


def run_workers(
    count: int,
    worker: Callable[[int], None],
    restart_delay_s: float = 1.0,
    after_start: Callable[[], None] | None = None,
) -> None:
    """Fork ``count`` processes running ``worker(index)``; restart any that dies; stop all on SIGINT/SIGTERM.

    Forked, not spawned: the parent has loaded the configuration and started no thread or client
    yet, so each worker starts from the same state without re-reading anything.
    """
    context = multiprocessing.get_context("fork")
    stopping = threading.Event()

    parent = os.getpid()

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker_main, args=(worker, index, parent), name=f"diana-receive-{index}", daemon=False
        )
        process.start()
        log.info("receiver.worker_started", worker=index, pid=process.pid)
        return process

    def stop(*_: object) -> None:
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    workers = [start(i) for i in range(count)]
    if after_start is not None:
        after_start()  # e.g. the metrics endpoint, whose thread is better not running at fork time
    while not stopping.wait(0.5):
        for index, process in enumerate(workers):
            if process.exitcode is not None:
                log.error("receiver.worker_died", worker=index, exitcode=process.exitcode)
                time.sleep(restart_delay_s)
                if not stopping.is_set():
                    workers[index] = start(index)
    for process in workers:
        if process.pid is not None and process.exitcode is None:
            process.terminate()  # SIGTERM: the worker stops serving and flushes its producer
    for process in workers:
        process.join(30)
        if process.exitcode is None:
            process.kill()
    log.info("receiver.workers_stopped", workers=count)
