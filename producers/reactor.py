"""pynetdicom's reactors, waiting on what they act on instead of polling every millisecond.

pynetdicom 3.0's DUL thread polls: each turn of its loop checks the socket with a zero-timeout
``select`` and, when nothing happened, sleeps ``_run_loop_delay`` (1 ms). Its association thread
(``association.py`` ``_run_reactor``) sleeps 1 ms at the top of every turn before it looks for a
complete DIMSE message. Both turn a thousand times a second while nothing arrives: four idle
associations held a third of a core (bench.reactor_wait), and an association is idle between
its PDUs and while its sender waits for the answer.

For the associations given ``fast_reactor`` (every one peers open to us), each thread waits instead,
and is woken by everything it acts on:
- the DUL thread waits in ``select`` on its socket (data, or the peer closing it) and on an eventfd
  written when its association hands it something to send (``_WakingQueue``);
- the association thread waits on its DIMSE message queue, notified also when the DUL hands it any
  other primitive (A-ASSOCIATE, A-RELEASE, A-ABORT, A-P-ABORT: ``_NotifyingQueue``). Its module's
  ``time`` is replaced by ``_ReactorClock``, whose ``sleep`` does that wait in place of the reactor's
  1 ms turn.
A wait still ends after ``_IDLE_WAIT_S`` (20 ms) when nothing signals it. What nothing signals is seen
up to that much later: the ARTIM and idle timers, a DUL thread that ended, our own close of a
connection the peer left open after a release or an abort, and another thread's kill, abort, or pause of the association's
reactor (``release()`` or a ``send_*`` from outside the association's thread; nothing of ours does
that). Waking a poll loop early changes nothing but its latency. Process-wide changes to pynetdicom,
made by the receiver at start, never on import.
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

# The longest a turn of the DUL loop waits for incoming data on an acceptor without fast_reactor:
# pynetdicom's own loop delay, since nothing would wake it to send.
_WAIT_S = 0.001
# The longest either thread of a fast reactor waits when nothing signals it (module docstring).
_IDLE_WAIT_S = 0.02
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


class _NotifyingQueue(queue.Queue):
    """The DUL's ``to_user_queue`` (the primitives it hands its association but DIMSE messages), whose
    ``put`` also wakes the association thread waiting on its DIMSE message queue (``_ReactorClock``).

    ``puts`` counts them; the waiting thread compares it with the count when its last wait ended, so a
    primitive that arrived while it was looking elsewhere ends the next wait at once. Primitives the
    association leaves in the queue (it only peeks at most) never keep it from waiting."""

    def __init__(self, wakes: queue.Queue) -> None:
        super().__init__()
        self._wakes = wakes
        self.puts = 0
        self.seen = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self._wakes.not_empty:
            self.puts += 1
            self._wakes.not_empty.notify_all()


def _ready(self: AssociationSocket) -> bool:
    """``AssociationSocket.ready`` that waits for data instead of returning at once: on the associations
    given ``fast_reactor`` up to ``_IDLE_WAIT_S`` (woken to send), on an acceptor without it up to
    ``_WAIT_S``; pynetdicom's own on the other ones we open (a C-MOVE's toward its destination,
    routing, a collect job's C-FIND and C-MOVE)."""
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
    wait_s = _WAIT_S
    if waking is not None:
        # A put between the loop's look at the queue and this select left the eventfd readable.
        watched.append(waking.wake_fd)
        # An event the DUL thread queued itself is handled this turn, after this check: no wait then.
        wait_s = 0.0 if self._assoc.dul.event_queue.qsize() else _IDLE_WAIT_S
    try:
        readable, _, _ = select.select(watched, [], [], wait_s)
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom's own does
        return False
    if waking is not None and waking.wake_fd in readable:
        waking.drain_wake()
    return sock in readable


class _ReactorClock:
    """``time`` for pynetdicom's association module: the reactor's 1 ms ``sleep`` in an acceptor's
    thread (an Association is a Thread) ends when a DIMSE message or another primitive arrives for it;
    with ``fast_reactor`` it lasts up to ``_IDLE_WAIT_S`` otherwise, without it up to the 1 ms."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        current = threading.current_thread()
        acceptor = current if isinstance(current, Association) and current.is_acceptor else None
        dimse = getattr(acceptor, "dimse", None)
        # Only the reactor's own 1 ms turn: pynetdicom's other waits (for a pause, a release)
        # would spin while a message sits in the queue.
        if acceptor is None or dimse is None or seconds != _REACTOR_TURN_S:
            time.sleep(seconds)
            return
        pending = dimse.msg_queue
        primitives = acceptor.dul.to_user_queue
        if not isinstance(primitives, _NotifyingQueue):
            with pending.not_empty:  # Queue.put notifies it
                if not pending._qsize():  # qsize() would take the lock held here
                    pending.not_empty.wait(seconds)
            return
        with pending.not_empty:  # notified by both queues' puts
            if not pending._qsize() and primitives.puts == primitives.seen:
                pending.not_empty.wait(_IDLE_WAIT_S)
            primitives.seen = primitives.puts


_installed = False


def install() -> None:
    global _installed
    AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
    _association.time = _ReactorClock()  # type: ignore[assignment]
    _installed = True


def fast_reactor(dul: DULServiceProvider) -> None:
    """No sleep between the turns of this association's DUL loop, ``ready`` waiting instead (woken by
    what the association hands the DUL to send), and an acceptor's association thread woken by
    every primitive the DUL hands it; only once ``install`` ran (without it the loop would spin on a
    zero-timeout check). Called on ``EVT_CONN_OPEN``, while the association's queues are still empty:
    for an association we accept, before its threads start; for one we request, in its DUL thread,
    which has just taken the A-ASSOCIATE request off ``to_provider_queue``.

    On an association we open (``fast_requestor``) it is measured, not used: bench.move_floor
    sends a series to storescp with and without it, and the results were mixed (faster in 7 of 11
    rounds, slower in 3, among them the least loaded; docs/PERFORMANCE.md, the C-MOVE floor), so
    C-MOVE sub-associations keep pynetdicom's loop."""
    if _installed:
        dul._run_loop_delay = 0.0
        assert dul.to_provider_queue.empty(), "fast_reactor must run before the association starts"
        dul.to_provider_queue = _WakingQueue()
        if dul.assoc.is_acceptor:
            # Only an acceptor's thread runs the reactor that waits on it; a requestor's user thread
            # may already be waiting on the stock queue for the A-ASSOCIATE answer.
            assert dul.to_user_queue.empty(), "fast_reactor must run before the association starts"
            dul.to_user_queue = _NotifyingQueue(dul.assoc.dimse.msg_queue)


def fast_requestor(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler giving an association we open ``fast_reactor`` (with
    diana/outbound_association.py's handlers, which it needs); used by bench.move_floor and
    bench.move_stall ``--fast-reactor``."""
    fast_reactor(event.assoc.dul)
