"""The association a C-MOVE opens toward its destination: Nagle off (issue 17: ~40 ms per object with it on),
and its C-STORE responses go to the sending thread only (issue 17: the C-MOVE stall)."""

from __future__ import annotations

import queue
import socket
import threading

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from diana.access.qr.retrieve import sub_association_handlers
from diana.access.qr.sub_association import SenderResponseQueue
from tests.support.paths import port


def test_sub_association_socket_has_tcp_nodelay() -> None:
    destination = AE(ae_title="DEST")
    destination.add_supported_context(Verification)
    address = ("127.0.0.1", port(11290))
    server = destination.start_server(address, block=False)
    try:
        mover = AE(ae_title="DIANA")
        mover.add_requested_context(Verification)
        assoc = mover.associate(*address, ae_title="DEST", evt_handlers=sub_association_handlers())
        assert assoc.is_established
        try:
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert isinstance(assoc.dimse.msg_queue, SenderResponseQueue) and assoc.dimse.msg_queue.reactor is assoc
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.shutdown()


def _taken_by_another_thread(pending: SenderResponseQueue) -> object:
    got: list[object] = []
    sender = threading.Thread(target=lambda: got.append(pending.get(timeout=5)))
    sender.start()
    sender.join(10)
    return got[0]


def test_sub_association_reactor_thread_takes_requests_only() -> None:
    """Issue 17, the C-MOVE stall: the association's own (reactor) thread must never take a response off
    the DIMSE queue, nor pynetdicom's (None, None) wake-up on abort: the thread that sent the request
    waits for them. It still takes the requests a peer may send unasked."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0x0000
    request = C_STORE()
    request.MessageID = 2
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 2
    pending = SenderResponseQueue(threading.current_thread())  # this test's thread plays the reactor

    pending.put((1, response))
    with pytest.raises(queue.Empty):
        pending.get(block=False)
    assert _taken_by_another_thread(pending) == (1, response)

    pending.put((None, None))
    with pytest.raises(queue.Empty):
        pending.get(block=False)
    assert _taken_by_another_thread(pending) == (None, None)

    pending.put((3, request))
    assert pending.get(block=False) == (3, request)
    with pytest.raises(queue.Empty):
        pending.get(block=False)
