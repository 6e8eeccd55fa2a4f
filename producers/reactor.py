"""pynetdicom's reactors, waiting on their input instead of sleeping.

pynetdicom 3.0's DUL thread polls: each turn of its loop checks the socket with a zero-timeout
``select`` and, when nothing happened, sleeps ``_run_loop_delay`` (1 ms). A PDU that arrives during
the sleep waits for it; a 0.5 MB instance sent in 16 KiB PDUs (storescu's default) can meet that
sleep dozens of times. Here the check itself waits, up to the same 1 ms, and returns the moment
data arrives, while the reactor's own sleep is made zero for the receiver's associations
(``fast_reactor``). An idle association turns its loop as often as before (once per millisecond);
data is read without delay; something to send waits at most 1 ms, as before.

The association thread (``association.py`` ``_run_reactor``) sleeps 1 ms at the top of every turn
before it looks for a complete DIMSE message: each C-STORE waited up to 1 ms there. Its module's
``time`` is replaced by ``_ReactorClock``, whose ``sleep`` in an association's own thread returns
as soon as that association's message queue holds something (never later than asked). Waking a
poll loop early changes nothing but its latency. Process-wide changes to pynetdicom, made by the
receiver at start, never on import.
"""

from __future__ import annotations

import os
import queue
import select
import ssl
import threading
import time
import weakref
from typing import Any

from pynetdicom import association as _association
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

__all__ = ["install", "fast_reactor", "fast_requestor"]

# The longest a turn of the DUL loop waits for incoming data: pynetdicom's own loop delay.
_WAIT_S = 0.001
# The sleep at the top of each turn of Association._run_reactor (pynetdicom 3.0).
_REACTOR_TURN_S = 0.001


_stock_ready = AssociationSocket.ready.fget  # type: ignore[attr-defined]


class _WakingQueue(queue.Queue):
    """The DUL's ``to_provider_queue`` (what the association thread hands it to send) that also makes
    an eventfd readable on every ``put``, so the DUL thread's ``select`` returns for it."""

    def __init__(self) -> None:
        super().__init__()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.wake_fd)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        os.eventfd_write(self.wake_fd, 1)

    def drain_wake(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass  # already drained by an earlier turn


def _ready(self: AssociationSocket) -> bool:
    """``AssociationSocket.ready`` that waits up to ``_WAIT_S`` for data instead of returning at once,
    on the associations peers open to us and on those we open that were given ``fast_reactor``;
    pynetdicom's own on the other ones we open (a C-MOVE's toward its destination, routing, a collect
    job's C-FIND and C-MOVE)."""
    outgoing = self._assoc.dul.to_provider_queue
    waking = outgoing if isinstance(outgoing, _WakingQueue) else None
    if not self._assoc.is_acceptor and waking is None:
        return bool(_stock_ready(self))
    sock = self.socket
    if sock is None or self._is_connected is False:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # TLS may hold decrypted bytes that select cannot see
    watched: list[Any] = [sock]
    if waking is not None:
        # A put between the loop's look at the queue and this select left the eventfd readable.
        watched.append(waking.wake_fd)
    try:
        readable, _, _ = select.select(watched, [], [], _WAIT_S)
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom's own does
        return False
    if waking is not None and waking.wake_fd in readable:
        waking.drain_wake()
    return sock in readable


class _ReactorClock:
    """``time`` for pynetdicom's association module: ``sleep`` in an association's thread (an
    Association is a Thread) ends when a DIMSE message arrives for it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        current = threading.current_thread()
        acceptor = isinstance(current, Association) and current.is_acceptor
        dimse = getattr(current, "dimse", None) if acceptor else None
        # Only the reactor's own 1 ms turn: pynetdicom's other waits (for a pause, a release)
        # would spin while a message sits in the queue.
        if dimse is None or seconds != _REACTOR_TURN_S:
            time.sleep(seconds)
            return
        pending = dimse.msg_queue
        with pending.not_empty:  # Queue.put notifies it
            if not pending._qsize():  # qsize() would take the lock held here
                pending.not_empty.wait(seconds)


_installed = False


def install() -> None:
    global _installed
    AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
    _association.time = _ReactorClock()  # type: ignore[assignment]
    _installed = True


def fast_reactor(dul: DULServiceProvider) -> None:
    """No sleep between the turns of this association's DUL loop, ``ready`` waiting instead (and
    woken by what the association hands the DUL to send); only once ``install`` ran (without it the
    loop would spin on a zero-timeout check). Called on ``EVT_CONN_OPEN``, while the association's
    ``to_provider_queue`` is still empty: for an association we accept, before its threads start; for
    one we request, in its DUL thread, which has just taken the A-ASSOCIATE request off that queue.

    On an association we open (``fast_requestor``) it is measured, not used: bench.move_floor
    sends a series to storescp with and without it, and the results were mixed (faster in 7 of 11
    rounds, slower in 3, among them the least loaded; docs/PERFORMANCE.md, the C-MOVE floor), so
    C-MOVE sub-associations keep pynetdicom's loop."""
    if _installed:
        dul._run_loop_delay = 0.0
        assert dul.to_provider_queue.empty(), "fast_reactor must run before the association starts"
        dul.to_provider_queue = _WakingQueue()


def fast_requestor(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler giving an association we open ``fast_reactor`` (with
    diana/outbound_association.py's handlers, which it needs); used by bench.move_floor and
    bench.move_stall ``--fast-reactor``."""
    fast_reactor(event.assoc.dul)
