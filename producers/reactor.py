"""pynetdicom's DUL reactor, waiting on its socket instead of sleeping.

pynetdicom 3.0's DUL thread polls: each turn of its loop checks the socket with a zero-timeout
``select`` and, when nothing happened, sleeps ``_run_loop_delay`` (1 ms). A PDU that arrives during
the sleep waits for it; a 0.5 MB instance sent in 16 KiB PDUs (storescu's default) can meet that
sleep dozens of times. Here the check itself waits, up to the same 1 ms, and returns the moment
data arrives, while the reactor's own sleep is made zero for the receiver's associations
(``fast_reactor``). An idle association turns its loop as often as before (once per millisecond);
data is read without delay; something to send waits at most 1 ms, as before. A process-wide change
to pynetdicom, made by the receiver at start, never on import.
"""

from __future__ import annotations

import select
import ssl

from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

__all__ = ["install", "fast_reactor"]

# The longest a turn of the DUL loop waits for incoming data: pynetdicom's own loop delay.
_WAIT_S = 0.001


def _ready(self: AssociationSocket) -> bool:
    """``AssociationSocket.ready`` that waits up to ``_WAIT_S`` for data instead of returning at once."""
    sock = self.socket
    if sock is None or self._is_connected is False:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # TLS may hold decrypted bytes that select cannot see
    try:
        readable, _, _ = select.select([sock], [], [], _WAIT_S)
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom's own does
        return False
    return bool(readable)


_installed = False


def install() -> None:
    global _installed
    AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
    _installed = True


def fast_reactor(dul: DULServiceProvider) -> None:
    """No sleep between the turns of this association's DUL loop, ``ready`` waiting instead; only
    once ``install`` ran (without it the loop would spin on a zero-timeout check)."""
    if _installed:
        dul._run_loop_delay = 0.0
