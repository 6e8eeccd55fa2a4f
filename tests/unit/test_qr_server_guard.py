"""`diana serve`'s query/retrieve port (access/qr/server.py) is guarded as the receiver's is
(producers/transport_guard.py), with [receiver]'s limits: connections from one address beyond
max_associations_per_host are closed at once, and a PDU announcing more than the cap ends the association."""

from __future__ import annotations

import socket
import time

import pytest
from pynetdicom.transport import AssociationSocket

from diana.access.qr.server import QueryRetrieveServer
from diana.config import load_config
from diana.producers import transport_guard
from diana.producers.transport_guard import GuardedServer


def _serving(tmp_path, monkeypatch, **settings: str):
    # The guard is process-wide (AssociationSocket.recv and its settings): put back after the test.
    monkeypatch.setattr(AssociationSocket, "recv", AssociationSocket.recv)
    monkeypatch.setattr(transport_guard, "_settings", transport_guard._settings)
    cfg = load_config(
        environ={
            **settings,
            "DIANA_RECEIVER_HOST": "127.0.0.1",
            "DIANA_RECEIVER_MAX_ASSOCIATIONS_PER_HOST": "1",
            "DIANA_RECEIVER_MAX_PDU_BYTES": "65536",
            "DIANA_QUERY_RETRIEVE_PORT": "0",  # any free port
            "DIANA_STORAGE_ARCHIVE_DIR": str(tmp_path / "archive"),
            "DIANA_STORAGE_LANDING_DIR": str(tmp_path / "landing"),
            "DIANA_QUERY_RETRIEVE_ALLOWED_CALLING_AES": "VIEWER",
        }
    )
    server = QueryRetrieveServer(cfg)
    server.start()
    return server


@pytest.fixture
def qr_server(tmp_path, monkeypatch):
    server = _serving(tmp_path, monkeypatch)
    try:
        yield server
    finally:
        server.stop()


def test_the_qr_port_has_a_per_host_limit_of_its_own_when_set(tmp_path, monkeypatch):
    """Behind a proxy on this host every viewer arrives from its address: the Q/R port's limit can be
    raised without raising the receiver's."""
    server = _serving(tmp_path, monkeypatch, DIANA_QUERY_RETRIEVE_MAX_ASSOCIATIONS_PER_HOST="40")
    try:
        assert transport_guard._settings.max_associations_per_host == 40
        assert server.config.receiver.max_associations_per_host == 1
    finally:
        server.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_qr_port_uses_the_receivers_guarded_server_and_limits(qr_server):
    assert isinstance(qr_server.server, GuardedServer)
    assert transport_guard._settings.max_associations_per_host == 1
    port = qr_server.server.server_address[1]
    first = socket.create_connection(("127.0.0.1", port))
    try:
        time.sleep(0.3)  # the first is an association (waiting for its A-ASSOCIATE-RQ)
        second = socket.create_connection(("127.0.0.1", port))
        try:
            assert _closed_within(second, 5), "a second connection from one address was kept"
        finally:
            second.close()
        assert not _closed_within(first, 0.3), "the first connection was closed"
        # A PDU announcing more than the cap (64 KiB here) ends the association before any of it is read.
        first.sendall(bytes([0x01, 0x00]) + (10 * 1024 * 1024).to_bytes(4, "big"))
        assert _closed_within(first, 5)
    finally:
        first.close()
