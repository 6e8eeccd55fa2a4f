"""The association a C-MOVE opens toward its destination has Nagle off (issue 17: ~40 ms per object with it on)."""

from __future__ import annotations

import socket

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from diana.access.qr.retrieve import sub_association_handlers
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
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.shutdown()
