"""The associations diana-star opens as requestor: a C-MOVE's toward its destination, routing's, and a
collect job's C-FIND and C-MOVE to a PACS (producers/pacs_pull/scu.py).

Three things pynetdicom leaves to the caller, set when the connection opens (``EVT_CONN_OPEN``):

- Nagle off: with it on, each C-STORE's last small PDU waited for the peer's delayed ACK, ~40 ms
  per object (as on the receiver's own associations, producers/scp.py); a C-FIND-RQ is two writes
  (command, identifier), and the second waited the same way.
- The network timeout on the socket (pynetdicom clears it after connecting): a peer that stops
  reading must not block a send for ever (a hung C-MOVE destination held the move thread for good).
- The DIMSE responses go to the thread that sent the request, never to the association's own
  reactor thread (issue 17, the C-MOVE stall). pynetdicom 3.0's ``send_c_store``, ``send_c_find``,
  ``send_c_move`` (and ``release``) all pause the association's reactor the same way
  (``_reactor_checkpoint.clear()``, then wait for ``_is_paused``), send, and take the response from
  the DIMSE message queue. The pause handshake is racy: the reactor sets ``_is_paused`` before it
  waits on the checkpoint and leaves it set after being released, so when the sender pauses it again
  soon after letting it go (the previous send's ``set()`` still in flight to a reactor thread waiting
  for the GIL), ``_is_paused`` is stale, the sender goes ahead, and the reactor then wakes and takes
  the response off the queue itself (pynetdicom logs "Received unexpected C-STORE service message"
  and drops it). The sender then waits for a response that already came: until the destination
  closes the idle association (dcmtk storescp after its 60 s socket timeout), or the DIMSE timeout;
  every later sub-operation of the move fails. It needs the reactor thread to be starved of the GIL
  for a round trip, so it came under load (2 of 5 bench runs at load 30-60) and not on a quiet
  machine. A C-FIND or C-MOVE on a fresh association (one per call in scu.py) has a narrower window
  of the same kind: the free-running reactor let through the checkpoint (it was never cleared) but
  not yet past ``_is_paused = False`` when the sender clears it; the reactor's next
  ``get_msg(block=False)`` then takes the first response if it has already come. For a C-MOVE with
  no DIMSE timeout (a retrieve may take hours) that would be a collect job waiting forever. Here the
  message queue hands the reactor thread only requests (what a peer may send it unasked);
  responses and the (None, None) that pynetdicom puts on abort stay for the sender, which is what
  waits for them.
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Any

from pynetdicom import evt

__all__ = ["SenderResponseQueue", "outbound_association_handlers"]


def _is_request(item: Any) -> bool:
    _, msg = item
    # A DIMSE response carries a Status; a request never does. (None, None) is pynetdicom's wake-up on abort.
    return msg is not None and getattr(msg, "Status", None) is None


class SenderResponseQueue(queue.Queue):
    """An association's DIMSE message queue from which its own thread (the reactor, ``reactor``) takes
    only requests, without blocking; every other ``get`` is the stock one (the sender's, blocking)."""

    def __init__(self, reactor: threading.Thread):
        super().__init__()
        self.reactor = reactor

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block or threading.current_thread() is not self.reactor:
            return super().get(block, timeout)
        with self.not_empty:  # the queue's own mutex: the look and the take are one step
            if not self._qsize() or not _is_request(self.queue[0]):
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


def _on_connection_open(event: evt.Event) -> None:
    assoc = event.assoc
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock is not None:
        # pynetdicom gives the socket the network timeout, then clears it after connecting
        # (settimeout(None)): a send to a peer that stopped reading (full buffers) then blocks the
        # association's DUL thread for good, and the abort after the DIMSE timeout waits for that
        # thread forever (issue 17, a hung C-MOVE destination). With it, the send fails after the
        # network timeout and pynetdicom ends the association as closed.
        sock.settimeout(assoc.network_timeout)
    stock = assoc.dimse.msg_queue
    if not isinstance(stock, SenderResponseQueue):
        replacement = SenderResponseQueue(assoc)
        with stock.mutex:  # empty before the association is negotiated; moved over all the same
            replacement.queue.extend(stock.queue)
            assoc.dimse.msg_queue = replacement


def outbound_association_handlers() -> list[Any]:  # pynetdicom's evt_handlers list (its own type is invariant)
    """``evt_handlers`` for an association diana-star opens (C-MOVE sub-association, routing, PACS C-FIND/C-MOVE)."""
    return [(evt.EVT_CONN_OPEN, _on_connection_open)]
