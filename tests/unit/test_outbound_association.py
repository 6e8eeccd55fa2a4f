"""The associations diana-star opens (a C-MOVE's toward its destination, routing's, a collect job's to a PACS):
Nagle off (issue 17: ~40 ms per object with it on), and their DIMSE responses go to the sending thread only
(issue 17: the C-MOVE stall)."""

from __future__ import annotations

import queue
import socket
import threading

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from diana.outbound_association import SenderResponseQueue, outbound_association_handlers
from tests.support.paths import port


def test_sub_association_socket_has_tcp_nodelay() -> None:
    destination = AE(ae_title="DEST")
    destination.add_supported_context(Verification)
    address = ("127.0.0.1", port(11290))
    server = destination.start_server(address, block=False)
    try:
        mover = AE(ae_title="DIANA")
        mover.add_requested_context(Verification)
        assoc = mover.associate(*address, ae_title="DEST", evt_handlers=outbound_association_handlers())
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


def test_pacs_client_associations_take_responses_on_the_sending_thread() -> None:
    """A collect job's C-FIND and C-MOVE associations to a PACS (producers/pacs_pull/scu.py) get the same
    queue: pynetdicom's send_c_find and send_c_move pause the reactor as send_c_store does, with the same race."""
    from pydicom.dataset import Dataset
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from diana.config import CollectConfig
    from diana.producers.pacs_pull.scu import PacsClient

    def on_find(event: evt.Event):  # type: ignore[no-untyped-def]
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3.4"
        match.AccessionNumber = "A1"
        match.NumberOfStudyRelatedInstances = "7"
        yield 0xFF00, match

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(FIND)
    address = ("127.0.0.1", port(11291))
    server = pacs.start_server(address, block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        client = PacsClient(CollectConfig(pacs_host=address[0], pacs_port=address[1], timeout_s=10), "DIANA")
        with client._association(FIND) as assoc:
            assert isinstance(assoc.dimse.msg_queue, SenderResponseQueue) and assoc.dimse.msg_queue.reactor is assoc
            assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        matches = client.find_studies({})
        assert [(m.study_instance_uid, m.accession_number, m.expected_instances) for m in matches] == [
            ("1.2.3.4", "A1", 7)
        ]
    finally:
        server.shutdown()
