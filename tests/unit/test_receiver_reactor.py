"""The receiver's two threads per association wait until something wakes them (producers/reactor.py):
the DUL thread for its socket, what its association hands it to send, or its kill; the association
thread for a DIMSE message or another primitive from the DUL.

Without the wake-ups, a C-STORE response queued while the DUL thread sat in its ``select``, or an
A-RELEASE handed to an association thread in its wait, waited for the rest of that wait; the waits
here are made long (30 s) so that only a wake-up can end them within the test's join.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_RELEASE, P_DATA
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from diana.producers import reactor


@pytest.fixture
def acceptor_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AssociationSocket, socket.socket]]:
    reactor.install()
    monkeypatch.setattr(reactor, "_IDLE_WAIT_S", 30.0)
    ours, peer = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    transport = AssociationSocket(assoc, client_socket=ours)
    assoc.set_socket(transport)
    reactor.fast_reactor(assoc.dul)
    assert assoc.dul.event_queue.get_nowait() == "Evt5"  # the connection's, which the DUL's first turn takes
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


def test_a_queued_event_is_not_waited_for(acceptor_socket: tuple[AssociationSocket, socket.socket]) -> None:
    transport, _ = acceptor_socket
    transport.assoc.dul.event_queue.put("Evt3")
    waiting, answers = _ready_in_thread(transport)
    waiting.join(10)
    assert answers == [False]


class _TurningAcceptor(Association):
    """An acceptor whose thread runs ``turns`` turns' sleep of pynetdicom's reactor (``time.sleep(0.001)``
    in association.py, which install() makes a _ReactorClock), taking any DIMSE message as the reactor
    does, and records how long each sleep lasted."""

    def __init__(self) -> None:
        super().__init__(AE(), "acceptor")
        self.turns = 1
        self.slept: list[float] = []

    def run(self) -> None:
        for _ in range(self.turns):
            started = time.monotonic()
            reactor._association.time.sleep(reactor._REACTOR_TURN_S)
            self.slept.append(time.monotonic() - started)
            self.dimse.get_msg(block=False)


@pytest.fixture
def turning_acceptor(monkeypatch: pytest.MonkeyPatch) -> _TurningAcceptor:
    reactor.install()
    monkeypatch.setattr(reactor, "_IDLE_WAIT_S", 30.0)
    assoc = _TurningAcceptor()
    reactor.fast_reactor(assoc.dul)
    return assoc


def test_an_idle_association_thread_waits(turning_acceptor: _TurningAcceptor) -> None:
    turning_acceptor.start()
    turning_acceptor.join(0.3)
    assert turning_acceptor.is_alive(), "the association's turn ended with nothing to wake it"
    turning_acceptor.dimse.msg_queue.put((1, object()))
    turning_acceptor.join(10)
    assert not turning_acceptor.is_alive(), "a DIMSE message did not wake the association thread"


def test_a_release_wakes_the_association_thread(turning_acceptor: _TurningAcceptor) -> None:
    turning_acceptor.start()
    turning_acceptor.join(0.2)
    assert turning_acceptor.is_alive()
    turning_acceptor.dul.to_user_queue.put(A_RELEASE())
    turning_acceptor.join(10)
    assert not turning_acceptor.is_alive(), "an A-RELEASE from the DUL did not wake the association thread"


def test_a_primitive_handed_over_between_turns_ends_the_next_wait(turning_acceptor: _TurningAcceptor) -> None:
    # It arrived while the thread was looking elsewhere (here: before it started): no wait for it.
    turning_acceptor.dul.to_user_queue.put(A_RELEASE())
    turning_acceptor.start()
    turning_acceptor.join(10)
    assert not turning_acceptor.is_alive()
    assert turning_acceptor.slept[0] < 5


def test_a_primitive_left_in_the_queue_does_not_keep_the_thread_turning(turning_acceptor: _TurningAcceptor) -> None:
    # The association only peeks at an A-ABORT's or an answered A-RELEASE's place in the queue; once
    # a turn has seen it, the next turn waits again instead of spinning.
    turning_acceptor.dul.to_user_queue.put(A_RELEASE())
    turning_acceptor.turns = 2
    turning_acceptor.start()
    turning_acceptor.join(0.3)
    assert turning_acceptor.is_alive(), "a primitive already seen ended the wait again"
    assert len(turning_acceptor.slept) == 1 and turning_acceptor.slept[0] < 5
    turning_acceptor.dimse.msg_queue.put((1, object()))
    turning_acceptor.join(10)
    assert not turning_acceptor.is_alive()


def test_a_whole_association_never_waits_for_a_wake_that_does_not_come(monkeypatch: pytest.MonkeyPatch) -> None:
    # Over real loopback sockets: associate, five C-ECHOs, release. With the idle bound at 30 s, a step
    # that nothing woke would take 30 s; each one woken takes milliseconds.
    reactor.install()
    monkeypatch.setattr(reactor, "_IDLE_WAIT_S", 30.0)
    acceptor = AE(ae_title="ACCEPTOR")
    acceptor.add_supported_context(Verification)
    opened: list[Association] = []

    def on_open(event: evt.Event) -> None:
        reactor.fast_reactor(event.assoc.dul)
        opened.append(event.assoc)

    server = acceptor.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        requestor = AE(ae_title="REQUESTOR")
        requestor.add_requested_context(Verification)
        started = time.monotonic()
        assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="ACCEPTOR")
        assert assoc.is_established
        assert [assoc.send_c_echo().Status for _ in range(5)] == [0] * 5
        assoc.release()
        assert assoc.is_released
        opened[0].join(10)
        assert not opened[0].is_alive(), "the acceptor's association thread did not end after the release"
        assert time.monotonic() - started < 10
        assert isinstance(opened[0].dul.to_user_queue, reactor._NotifyingQueue)
    finally:
        server.shutdown()
