"""The receiver's DUL thread is woken by what its association hands it to send (producers/reactor.py).

Without the wake-up, a C-STORE response queued while the DUL thread sat in its ``select`` waited
for the rest of that wait; the waits here are made long (30 s) so that only the wake-up can end
them within the test's join.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from diana.producers import reactor


@pytest.fixture
def acceptor_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AssociationSocket, socket.socket]]:
    reactor.install()
    monkeypatch.setattr(reactor, "_WAIT_S", 30.0)
    ours, peer = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    transport = AssociationSocket(assoc, client_socket=ours)
    assoc.set_socket(transport)
    reactor.fast_reactor(assoc.dul)
    yield transport, peer
    ours.close()
    peer.close()


def _ready_in_thread(transport: AssociationSocket) -> tuple[threading.Thread, list[bool]]:
    answers: list[bool] = []
    waiting = threading.Thread(target=lambda: answers.append(transport.ready), daemon=True)
    waiting.start()
    return waiting, answers


def test_fast_reactor_gives_the_dul_a_waking_queue(acceptor_socket: tuple[AssociationSocket, socket.socket]) -> None:
    transport, _ = acceptor_socket
    assert isinstance(transport.assoc.dul.to_provider_queue, reactor._WakingQueue)


def test_a_primitive_to_send_ends_the_wait_for_input(acceptor_socket: tuple[AssociationSocket, socket.socket]) -> None:
    transport, peer = acceptor_socket
    waiting, answers = _ready_in_thread(transport)
    waiting.join(0.2)
    assert waiting.is_alive(), "ready should be waiting on the socket"
    transport.assoc.dul.to_provider_queue.put(P_DATA())
    waiting.join(10)
    assert not waiting.is_alive(), "a queued primitive did not wake the DUL thread's select"
    assert answers == [False]  # nothing to read: the loop goes on to send
    # The wake-up was consumed: the next wait is for input again, which arrives.
    waiting, answers = _ready_in_thread(transport)
    waiting.join(0.2)
    assert waiting.is_alive()
    peer.sendall(b"\x04")
    waiting.join(10)
    assert answers == [True]


def test_incoming_data_still_ends_the_wait(acceptor_socket: tuple[AssociationSocket, socket.socket]) -> None:
    transport, peer = acceptor_socket
    waiting, answers = _ready_in_thread(transport)
    peer.sendall(b"\x04")
    waiting.join(10)
    assert answers == [True]
