"""The slow-peer rule (producers/transport_guard.py) measures a peer while it sends: from the first byte
of a PDU (or of a DIMSE message spread over P-DATA PDUs) until it is complete. Idle time between
messages, or diana's own waiting, never counts; associations diana requested are not judged.

A fake clock and a fake socket: each chunk the socket gives advances the clock as the test says."""

from __future__ import annotations

import socket

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from diana.producers import transport_guard
from diana.producers.transport_guard import GuardSettings


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _FakeSocket:
    """Gives queued (seconds to wait first, bytes) chunks, at most what is asked for each time."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.chunks: list[tuple[float, bytes]] = []
        self.shut = False

    def queue(self, data: bytes, after_s: float = 0.0, piece: int | None = None) -> None:
        piece = piece or len(data)
        for i in range(0, len(data), piece):
            self.chunks.append((after_s if i == 0 else 0.0, data[i : i + piece]))

    def trickle(self, data: bytes, piece: int, every_s: float) -> None:
        for i in range(0, len(data), piece):
            self.chunks.append((every_s, data[i : i + piece]))

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            return b""
        wait, data = self.chunks[0]
        self.clock.now += wait
        if len(data) > size:
            self.chunks[0] = (0.0, data[size:])
            return data[:size]
        self.chunks.pop(0)
        return data

    timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    def gettimeout(self) -> float | None:
        return self.timeout

    def shutdown(self, _how: int) -> None:
        self.shut = True


def _pdata(payload_size: int, control: int = 0x03, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU of one PDV (control 0x03: a command's last fragment; 0x01 not last; 0x02 data set last)."""
    pdv = bytes([context_id, control]) + b"\x00" * payload_size
    body = len(pdv).to_bytes(4, "big") + pdv
    return b"\x04\x00" + len(body).to_bytes(4, "big") + body


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(transport_guard, "time", fake)
    monkeypatch.setattr(
        transport_guard,
        "_settings",
        GuardSettings(pdu_read_timeout_s=10_000.0, min_bytes_per_s=256.0, min_rate_after_s=120.0),
    )
    return fake


def _transport(mode: str, clock: _Clock) -> tuple[AssociationSocket, _FakeSocket]:
    assoc = Association(AE(), mode)
    ours, peer = socket.socketpair()
    transport = AssociationSocket(assoc, client_socket=ours)
    ours.close()
    peer.close()
    fake = _FakeSocket(clock)
    transport.socket = fake  # type: ignore[assignment]
    return transport, fake


def _read_pdu(transport: AssociationSocket) -> bytearray:
    """As pynetdicom's DUL reads one: the header, then the body."""
    header = transport_guard._guarded_recv(transport, 6)
    length = int.from_bytes(header[2:6], "big")
    return header + (transport_guard._guarded_recv(transport, length) if length else bytearray())


@pytest.mark.parametrize("mode", ["requestor", "acceptor"])
def test_small_responses_over_200_s_do_not_end_the_association(clock: _Clock, mode: str) -> None:
    """A C-MOVE's sub-association sends images and receives ~170-byte C-STORE responses: 200 s old,
    averaging under 1 byte a second over its age, but each response arrives whole at once."""
    transport, fake = _transport(mode, clock)
    for _ in range(10):
        fake.queue(_pdata(158), after_s=20.0)  # a response every 20 s, the rest of the time diana sends
        assert len(_read_pdu(transport)) == 6 + 4 + 2 + 158
    assert clock.now - 1000.0 == 200.0 and not fake.shut


def test_diana_waiting_for_the_broker_between_c_stores_does_not_count_against_the_peer(clock: _Clock) -> None:
    """Kafka down: each C-STORE is answered 0xA700 after ~11 s; the peer's next one comes at once."""
    transport, fake = _transport("acceptor", clock)
    for _ in range(30):  # 330 s
        fake.queue(_pdata(150, control=0x03), after_s=11.0)  # the command
        fake.queue(_pdata(2000, control=0x02))  # the data set, last fragment
        _read_pdu(transport)
        _read_pdu(transport)
    assert not fake.shut


def test_a_peer_trickling_a_large_pdu_below_the_rate_is_ended(clock: _Clock) -> None:
    transport, fake = _transport("acceptor", clock)
    fake.queue(_pdata(200_000, control=0x02)[:6])
    fake.trickle(_pdata(200_000, control=0x02)[6:], piece=100, every_s=1.0)  # 100 B/s
    with pytest.raises(OSError, match="slower than min_bytes_per_s"):
        _read_pdu(transport)
    assert fake.shut
    assert 120 <= clock.now - 1000.0 <= 125  # judged as soon as it had sent for min_rate_after_s


def test_a_peer_trickling_whole_pdus_of_one_unfinished_message_is_ended(clock: _Clock) -> None:
    """Each PDU complete and quick, one a second, the message never ending: it is still sending."""
    transport, fake = _transport("acceptor", clock)
    with pytest.raises(OSError, match="slower than min_bytes_per_s"):
        for _ in range(200):
            fake.queue(_pdata(1, control=0x00), after_s=1.0)  # a data set fragment, not the last
            _read_pdu(transport)
    assert 120 <= clock.now - 1000.0 <= 125


def test_an_association_diana_requested_is_not_judged_by_rate(clock: _Clock) -> None:
    """Only the per-PDU deadline applies there."""
    transport, fake = _transport("requestor", clock)
    fake.queue(_pdata(20_000, control=0x02)[:6])
    fake.trickle(_pdata(20_000, control=0x02)[6:], piece=100, every_s=1.0)
    assert len(_read_pdu(transport)) == 6 + 4 + 2 + 20_000
    assert not fake.shut


def test_a_pdu_must_still_arrive_within_pdu_read_timeout_s(clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_guard, "_settings", GuardSettings(pdu_read_timeout_s=60.0))
    transport, fake = _transport("requestor", clock)
    fake.queue(_pdata(20_000, control=0x02)[:6])
    fake.trickle(_pdata(20_000, control=0x02)[6:], piece=100, every_s=1.0)
    with pytest.raises(OSError, match="not received in time"):
        _read_pdu(transport)


def test_the_sockets_own_timeout_is_kept_after_a_read(clock: _Clock) -> None:
    """A C-MOVE's sub-association carries the network timeout (diana/outbound_association.py): its blocking
    sends need it to end when the destination hangs. The guard set the socket back to blocking (None) after
    each read, and a move to a stopped destination never ended once the guard was installed in its process."""
    transport, fake = _transport("requestor", clock)
    fake.settimeout(30.0)
    fake.queue(_pdata(100, control=0x02))
    assert len(_read_pdu(transport)) == 6 + 4 + 2 + 100
    assert fake.gettimeout() == 30.0
