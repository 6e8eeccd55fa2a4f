"""Hostile and slow peers cannot stop the receiver: limits on connections and PDUs, read from pynetdicom 3.0.

What pynetdicom does on its own (transport.py, dul.py), and what is done here instead:
- It wraps an accepted socket in TLS inside ``get_request``, on the single accept thread, with a
  blocking socket: one peer that connects and never sends a ClientHello blocks every new
  association. ``GuardedServer`` accepts without TLS and runs the handshake in the connection's
  own thread, under ``tls_handshake_timeout_s``.
- Every connection becomes an association thread before anything is negotiated, and each counts
  against ``maximum_associations``: 50 idle connections from one address lock everyone out.
  ``GuardedServer.verify_request`` closes a connection at once when its address already holds
  ``max_associations_per_host`` (handshakes included).
- ``DULServiceProvider._read_pdu_data`` reads the 6-byte PDU header and then as many bytes as the
  length says, 4 KiB at a time from a blocking socket: a peer announcing 4 GB makes it buffer
  whatever it sends, and a peer that stops mid-PDU holds the thread for ever. ``_guarded_recv``
  refuses a read longer than the PDU cap before reading anything, gives each PDU
  ``pdu_read_timeout_s`` from its first byte, and ends an association whose rate *while sending*
  falls under ``min_bytes_per_s`` once it has spent more than ``min_rate_after_s`` sending.

"While sending" is the time a PDU is partly received (its first byte arrived, its last not yet) and,
for P-DATA, the time a DIMSE message is partly received (a fragment arrived that was not the last
of its command or data set: the next PDU is the same message). Time between messages is not the
peer's: idle gaps between C-STOREs, or diana itself waiting (the broker down: each C-STORE takes
``publish_timeout_s`` to be answered) never count against it; an idle peer is the network timeout's
business. The rule applies only to associations a peer requested: on associations diana requests
(C-MOVE/C-GET sub-operations of access/qr, sent from this process) diana is the sender, and what
it receives are small responses.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from diana.producers import metrics

__all__ = ["GuardSettings", "GuardedServer", "install"]

log = structlog.get_logger("diana.receiver.guard")

# A-ASSOCIATE-RQ/AC PDUs are not bounded by the negotiated maximum; real ones are a few kB.
_MIN_PDU_CAP = 64 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class GuardSettings:
    max_pdu_bytes: int = 1048576
    tls_handshake_timeout_s: float = 10.0
    max_associations_per_host: int = 8
    pdu_read_timeout_s: float = 60.0
    min_bytes_per_s: float = 256.0
    # A peer is judged by its rate once it has spent this long sending (time between messages not counted).
    min_rate_after_s: float = 120.0

    @property
    def pdu_cap(self) -> int:
        """Longest PDU a peer may announce. max_pdu_bytes 0 (pynetdicom: unlimited) still gets 64 MiB."""
        return max(self.max_pdu_bytes or 64 * 1024 * 1024, _MIN_PDU_CAP)


_settings = GuardSettings()


class _Refused(OSError):
    """Raised into pynetdicom's DUL, which treats it as a closed connection (Evt17) and aborts."""


def _end(sock: AssociationSocket, reason: str, metric: str, **detail: Any) -> _Refused:
    metrics.REJECTED_ASSOCIATIONS.labels(metric).inc()
    try:
        peer = sock.assoc.requestor.address
    except (AttributeError, ValueError):  # not known yet
        peer = None
    log.warning("association.aborted", reason=reason, peer=peer, **detail)
    if sock.socket is not None:
        try:
            sock.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return _Refused(reason)


class _Pace:
    """One association's receiving: when the current PDU (or DIMSE message) started arriving, and the
    time and bytes of the spans already complete."""

    __slots__ = ("span_start", "span_bytes", "busy_s", "busy_bytes", "body_left", "pdu_type", "mid_message")

    def __init__(self) -> None:
        self.span_start: float | None = None  # first byte of the PDU (or message) being received
        self.span_bytes = 0
        self.busy_s = 0.0  # complete spans
        self.busy_bytes = 0
        self.body_left = 0  # after a PDU header: the body the next read is for
        self.pdu_type = 0
        self.mid_message = False  # the last P-DATA fragment was not the last of its message

    def arrived(self, now: float, size: int) -> None:
        if self.span_start is None:
            self.span_start = now
        self.span_bytes += size

    def rate(self, now: float) -> tuple[float, int]:
        """Seconds spent receiving and bytes received then, the current span included."""
        running = now - self.span_start if self.span_start is not None else 0.0
        return self.busy_s + running, self.busy_bytes + self.span_bytes

    def close_span(self, now: float) -> None:
        if self.span_start is not None:
            self.busy_s += now - self.span_start
            self.busy_bytes += self.span_bytes
        self.span_start = None
        self.span_bytes = 0


def _last_fragment_ends_message(body: bytes | bytearray) -> bool:
    """A P-DATA-TF body's PDVs: True when its last one ends a command or a data set (PS3.8 E.2)."""
    offset, ended = 0, True
    while offset + 6 <= len(body):
        length = int.from_bytes(body[offset : offset + 4], "big")
        if length < 2:
            return True  # malformed: pynetdicom's decode says so
        ended = bool(body[offset + 5] & 0x02)
        offset += 4 + length
    return ended


def _judged(sock: AssociationSocket) -> bool:
    """The slow-peer rule is for associations a peer requested, not for those diana requested."""
    assoc = getattr(sock, "assoc", None)
    return not getattr(assoc, "is_requestor", False)


def _guarded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv with a length cap, a per-PDU deadline and a minimum rate while sending.

    pynetdicom reads each PDU as two calls: its 6-byte header, then its body.
    """
    settings = _settings
    if nr_bytes > settings.pdu_cap:
        raise _end(self, "PDU longer than the maximum", "pdu_too_large", announced=nr_bytes, cap=settings.pdu_cap)
    sock = self.socket
    assert sock is not None
    pace: _Pace = self.__dict__.get("_diana_pace") or self.__dict__.setdefault("_diana_pace", _Pace())
    judged = _judged(self)
    is_body = pace.body_left > 0 and nr_bytes == pace.body_left
    buffer = bytearray()
    deadline: float | None = None
    # The socket's own timeout stays: an association diana requested (a C-MOVE's sub-association) has the
    # network timeout on it (diana/outbound_association.py), which its blocking sends need to end when the
    # destination hangs. Set back to None after each read, a send to a stopped peer blocked for ever.
    own_timeout = sock.gettimeout()
    while len(buffer) < nr_bytes:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _end(self, "PDU not received in time", "slow_peer", got=len(buffer), expected=nr_bytes)
            sock.settimeout(remaining if own_timeout is None else min(remaining, own_timeout))
        try:
            chunk = sock.recv(min(_CHUNK, nr_bytes - len(buffer)))
        except TimeoutError:
            if deadline is None:  # the socket's own timeout, before any of the PDU: pynetdicom's as before
                raise
            raise _end(self, "PDU not received in time", "slow_peer", got=len(buffer), expected=nr_bytes) from None
        finally:
            sock.settimeout(own_timeout)
        if not chunk:
            break
        now = time.monotonic()
        buffer.extend(chunk)
        pace.arrived(now, len(chunk))
        if deadline is None:
            deadline = now + settings.pdu_read_timeout_s
        if judged:
            _check_rate(self, pace, now, settings)
    now = time.monotonic()
    if len(buffer) < nr_bytes:  # closed: pynetdicom ends the association
        pace.close_span(now)
        pace.body_left = 0
        return buffer
    if is_body:
        pace.body_left = 0
        if pace.pdu_type == 0x04:
            pace.mid_message = not _last_fragment_ends_message(buffer)
        if not pace.mid_message:
            pace.close_span(now)
    elif nr_bytes == 6:
        pace.pdu_type = buffer[0]
        pace.body_left = int.from_bytes(buffer[2:6], "big")
        if pace.body_left == 0 and not pace.mid_message:
            pace.close_span(now)
    else:  # not the two reads of pynetdicom's DUL: its own span
        pace.close_span(now)
    return buffer


def _check_rate(sock: AssociationSocket, pace: _Pace, now: float, settings: GuardSettings) -> None:
    seconds, received = pace.rate(now)
    if seconds > settings.min_rate_after_s and received / seconds < settings.min_bytes_per_s:
        raise _end(sock, "association slower than min_bytes_per_s", "slow_peer", bytes=received, seconds=round(seconds))


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with TLS off the accept loop and a per-address limit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshaking: dict[str, int] = {}
        self._lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()  # no TLS here: the handshake runs in the connection's thread
        return client, address

    def _open_from(self, host: str) -> int:
        established = sum(1 for a in self.active_associations if a.requestor.address == host)
        return established + self._handshaking.get(host, 0)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0]
        with self._lock:
            if self._open_from(host) >= _settings.max_associations_per_host:
                metrics.REJECTED_ASSOCIATIONS.labels("per_host_limit").inc()
                log.warning("connection.refused", reason="max_associations_per_host reached", peer=host)
                return False
            self._handshaking[host] = self._handshaking.get(host, 0) + 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = client_address[0]
        try:
            if self.ssl_context is not None:
                request.settimeout(_settings.tls_handshake_timeout_s)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            self.finish_request(request, client_address)  # starts the association's own thread
        except Exception as exc:
            metrics.REJECTED_ASSOCIATIONS.labels("tls" if self.ssl_context is not None else "connection").inc()
            log.warning("connection.failed", peer=host, reason=f"{type(exc).__name__}: {exc}"[:300])
            self.shutdown_request(request)
        finally:
            with self._lock:
                self._handshaking[host] -= 1
                if not self._handshaking[host]:
                    del self._handshaking[host]


def install(settings: GuardSettings) -> None:
    """Use the guarded PDU reads in this process (the receiver's AE is the only one here)."""
    global _settings
    _settings = settings
    AssociationSocket.recv = _guarded_recv  # type: ignore[method-assign]
