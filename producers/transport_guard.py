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
  ``pdu_read_timeout_s`` from its first byte, and ends an association whose average rate falls
  under ``min_bytes_per_s`` once it is older than ``min_rate_after_s``.
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
    # An association younger than this is not judged by its average rate (negotiation, first C-STORE).
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
    peer = getattr(getattr(sock.assoc, "requestor", None), "address", None)
    log.warning("association.aborted", reason=reason, peer=peer, **detail)
    if sock.socket is not None:
        try:
            sock.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return _Refused(reason)


def _guarded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv with a length cap, a per-PDU deadline and a minimum average rate."""
    settings = _settings
    if nr_bytes > settings.pdu_cap:
        raise _end(self, "PDU longer than the maximum", "pdu_too_large", announced=nr_bytes, cap=settings.pdu_cap)
    sock = self.socket
    assert sock is not None
    now = time.monotonic()
    started = self.__dict__.setdefault("_diana_started", now)
    received = self.__dict__.get("_diana_bytes", 0)
    buffer = bytearray()
    deadline: float | None = None
    while len(buffer) < nr_bytes:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _end(self, "PDU not received in time", "slow_peer", got=len(buffer), expected=nr_bytes)
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(_CHUNK, nr_bytes - len(buffer)))
        except TimeoutError:
            raise _end(self, "PDU not received in time", "slow_peer", got=len(buffer), expected=nr_bytes) from None
        finally:
            sock.settimeout(None)
        if not chunk:
            break
        buffer.extend(chunk)
        if deadline is None:
            deadline = time.monotonic() + settings.pdu_read_timeout_s
    received += len(buffer)
    self.__dict__["_diana_bytes"] = received
    age = time.monotonic() - started
    if age > settings.min_rate_after_s and received / age < settings.min_bytes_per_s:
        raise _end(self, "association slower than min_bytes_per_s", "slow_peer", bytes=received, seconds=round(age))
    return buffer


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
