"""Several receiver processes on one port, so that associations use every core.

pynetdicom runs associations as threads of one process: under the GIL a receiver uses one core at
most. With ``[receiver] processes`` = N > 1, ``diana receive`` binds the port once and forks N worker
processes that all accept from that one socket (``SharedListener``). A new connection goes to the
worker with the fewest open connections: each worker publishes its count in memory shared with the
others, and one that holds more than another leaves a waiting connection to it for up to
``DEFER_S`` (then takes it anyway: a worker that is stuck holds nobody up).

SO_REUSEPORT, used before, has Linux pick a worker by a hash of the peer's address and port: 300
trials of 4 connections to 2 workers split 2/2 only 107 times, 3/1 152 times and 4/0 41 times, so 4
associations used both cores about one time in three (docs/PERFORMANCE.md, issue 19).

The parent sweeps the landing store's debris once, before any worker listens (a worker sweeping at
its own start would delete files another worker is receiving), then watches: a worker that dies is
started again after a second (the senders of its open associations got no success and retry; new
connections meanwhile go to the others, or wait in the parent's socket).

Per worker: its own Kafka producer, its own limits (``max_associations``,
``max_associations_per_host``: the whole receiver admits N times them). Metrics: one endpoint on
``metrics_port``, served by the parent, summing every worker's (prometheus_client's multiprocess
mode, ``shared_metrics.py``; the association gauge has one series per worker, labelled ``pid``).
Worker 0 alone runs the outbox tasks (recover: what landed before the receiver started; reconcile;
sweeper). The landing store is shared: a refused publish leaves its object for reconcile
(``LandingStore(shared=True)``), so no worker ever removes an object another one published. A worker
dies with the parent (PR_SET_PDEATHSIG): ``kill -9`` of the receiver ends every worker, as it ends a
single-process receiver.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.transport import AddressInformation

from diana.producers.transport_guard import GuardedServer

__all__ = ["LeastLoadedAccept", "SharedListener", "SharedPortServer", "run_workers"]

log = structlog.get_logger("diana.receiver")


# A worker that has died, or not started yet: no other worker leaves it a connection.
_GONE = 1 << 30


class SharedListener:
    """The one listening socket of every worker, and each worker's open connections and heartbeat.

    Made by the parent before it forks: the workers inherit the socket and the counts (shared memory)."""

    BACKLOG = 64
    # A worker that has not beaten for this long (stopped, frozen) is left no connection.
    ALIVE_S = 1.5

    def __init__(self, address: tuple[str, int], workers: int) -> None:
        # The family and options pynetdicom's own server would use: "::" stays dual-stack, as the
        # single-process receiver binds it.
        family = AddressInformation.from_tuple(address).address_family
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.BACKLOG)
        except OSError as exc:
            self.socket.close()
            raise OSError(exc.errno, f"cannot listen on {address[0] or '*'}:{address[1]}: {exc.strerror}") from None
        # Non-blocking: the workers race for each connection and the losers' accept must return.
        self.socket.setblocking(False)
        self.open_connections = multiprocessing.RawArray("i", [_GONE] * workers)
        self.heartbeats = multiprocessing.RawArray("d", workers)  # time.monotonic(): one clock for all

    def publish(self, worker: int, open_connections: int) -> None:
        self.open_connections[worker] = open_connections
        self.heartbeats[worker] = time.monotonic()

    def fewest_elsewhere(self, worker: int) -> int:
        """The fewest open connections of another worker that is alive and serving."""
        now = time.monotonic()
        alive = (
            n for i, n in enumerate(self.open_connections) if i != worker and now - self.heartbeats[i] < self.ALIVE_S
        )
        return min(alive, default=_GONE)

    def close(self) -> None:
        self.socket.close()


# This process's worker index and the listener it shares, set in each forked worker (one per process).
_share: tuple[SharedListener, int] | None = None


class LeastLoadedAccept:
    """Mixed into a pynetdicom ThreadedAssociationServer of a worker: it accepts from the shared
    listener, and leaves a connection to a worker with fewer open connections (for ``DEFER_S`` at most;
    a worker that has not published for ``SharedListener.ALIVE_S`` is left none).

    Open connections: the connections accepted whose association has not started yet (TLS handshake,
    its thread being started), counted from the accept on so that a burst is not all taken by the
    worker that woke first, and the associations whose connection has not closed. The server is the
    one to do TLS, in the connection's thread (``handshakes_in_connection_thread``): this accept does not.
    """

    DEFER_S = 0.25
    handshakes_in_connection_thread = False
    socket: Any
    ssl_context: Any
    active_associations: list

    def server_bind(self) -> None:
        if _share is None:
            raise RuntimeError("a shared-port server runs only in a worker of run_workers")
        if self.ssl_context is not None and not self.handshakes_in_connection_thread:
            raise ValueError(f"{type(self).__name__} accepts without TLS: its server must do the handshake")
        self._listener, self._worker = _share
        self._count_lock = threading.Lock()
        self._gone = False  # closed: the others leave it nothing, whatever ends after
        self._starting: dict[Any, int] = {}  # accepted socket → its fd, until its association starts
        self._closed: weakref.WeakSet = weakref.WeakSet()
        self.socket.close()  # the socket socketserver made: the shared one is used instead
        self.socket = self._listener.socket.dup()
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._publish()

    def server_activate(self) -> None:
        """Listening since the parent bound it."""

    def server_close(self) -> None:
        # Never shutdown(): on a listening socket shared by every worker it would stop them all.
        with self._count_lock:
            self._gone = True
            self._listener.publish(self._worker, _GONE)
        self.socket.close()
        # socketserver's ThreadingMixIn.server_close would join the connection threads (handshakes
        # under way), but after pynetdicom's, which shuts the socket down: joined here instead.
        threads = getattr(self, "_threads", None)
        if threads:
            threads.join()

    def _publish(self) -> int:
        # Counted and written under one lock: a count taken earlier is never written over a later one.
        with self._count_lock:
            mine = len(self._starting)
            # An association whose connection closed counts no more, though its thread may still be ending.
            mine += sum(1 for association in self.active_associations if association not in self._closed)
            self._listener.publish(self._worker, _GONE if self._gone else mine)
        return mine

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        # The others see this worker's count fall as each connection closes, not at the next poll:
        # a stale count would have them take a burst of new connections that is this one's to take.
        self.bind(evt.EVT_CONN_OPEN, self._on_open)  # type: ignore[attr-defined]
        self.bind(evt.EVT_CONN_CLOSE, self._on_close)  # type: ignore[attr-defined]
        super().serve_forever(poll_interval)  # type: ignore[misc]

    def _on_open(self, event: evt.Event) -> None:
        # Its association counts from now on (its thread starts next): the connection no more.
        transport = event.assoc.dul.socket
        fd = transport.socket.fileno() if transport and transport.socket else -1  # TLS-wrapped: the same fd
        with self._count_lock:
            for accepted in [s for s, n in self._starting.items() if n == fd]:
                del self._starting[accepted]

    def _on_close(self, event: evt.Event) -> None:
        self._closed.add(event.assoc)
        self._publish()

    def get_request(self) -> tuple[Any, Any]:
        deadline = time.monotonic() + self.DEFER_S
        while self._publish() > self._listener.fewest_elsewhere(self._worker) and time.monotonic() < deadline:
            time.sleep(0.002)
            if not select.select([self.socket], [], [], 0)[0]:
                raise BlockingIOError("the connection went to another worker")  # socketserver: nothing to do
        client, address = self.socket.accept()  # BlockingIOError: another worker was quicker
        with self._count_lock:
            self._starting[client] = client.fileno()
        self._publish()
        return client, address

    def _started(self, request: Any) -> None:
        """The connection's thread is done: its association runs, or it was refused or failed."""
        with self._count_lock:
            self._starting.pop(request, None)
        self._publish()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._started(request)

    def shutdown_request(self, request: Any) -> None:
        self._started(request)  # refused (verify_request) or failed before its thread
        super().shutdown_request(request)  # type: ignore[misc]

    def service_actions(self) -> None:
        super().service_actions()  # type: ignore[misc]
        self._publish()  # the heartbeat, at each turn of serve_forever (poll_interval at most)


class SharedPortServer(LeastLoadedAccept, GuardedServer):
    """The guarded server of a receiver worker, on the port all workers share."""

    handshakes_in_connection_thread = True  # GuardedServer.process_request_thread


_PR_SET_PDEATHSIG = 1


def _worker_main(worker: Callable[[int], None], index: int, parent: int, listener: SharedListener) -> None:
    global _share
    # Die with the parent, whatever kills it: no orphan keeps the port and answers success.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # the parent's handler is not ours; the receiver sets its own
    _share = (listener, index)
    worker(index)


def run_workers(
    count: int,
    worker: Callable[[int], None],
    address: tuple[str, int],
    restart_delay_s: float = 1.0,
    after_start: Callable[[], None] | None = None,
) -> None:
    """Listen on ``address``; fork ``count`` processes running ``worker(index)``, whose server is a
    ``LeastLoadedAccept`` one; restart any that dies; stop all on SIGINT/SIGTERM.

    Forked, not spawned: the parent has loaded the configuration and started no thread or client
    yet, so each worker starts from the same state without re-reading anything. The parent keeps the
    socket open: while a worker restarts, its share of new connections waits for the others.
    """
    context = multiprocessing.get_context("fork")
    stopping = threading.Event()
    listener = SharedListener(address, count)
    parent = os.getpid()

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker_main, args=(worker, index, parent, listener), name=f"diana-receive-{index}", daemon=False
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
                listener.publish(index, _GONE)
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
    listener.close()
    log.info("receiver.workers_stopped", workers=count)
