"""Unit: which worker a shared listener's workers leave a new connection to."""

from __future__ import annotations

import socket

import pytest

from diana.producers.workers import _GONE, SharedListener


@pytest.fixture
def listener():
    shared = SharedListener(("127.0.0.1", 0), workers=3)
    yield shared
    shared.close()


def test_the_fewest_open_connections_among_the_other_workers_that_beat(listener, monkeypatch):
    listener.publish(0, 4)
    listener.publish(1, 2)
    listener.publish(2, 3)
    assert listener.fewest_elsewhere(0) == 2
    assert listener.fewest_elsewhere(1) == 3
    # Worker 1 stops beating (stopped, frozen): after ALIVE_S it is left nothing, whatever its count.
    beat = listener.heartbeats[1]
    monkeypatch.setattr("time.monotonic", lambda: beat + SharedListener.ALIVE_S + 0.1)
    listener.heartbeats[0] = listener.heartbeats[2] = beat + SharedListener.ALIVE_S
    assert listener.fewest_elsewhere(0) == 3


def test_a_worker_not_started_or_gone_is_never_the_fewest(listener):
    listener.publish(0, 5)
    assert listener.fewest_elsewhere(0) == _GONE  # 1 and 2 have not published yet
    listener.publish(2, _GONE)
    assert listener.fewest_elsewhere(0) == _GONE


def test_a_taken_port_is_named_in_the_error(listener):
    port = listener.socket.getsockname()[1]
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
        SharedListener(("127.0.0.1", port), workers=1)


def test_the_listening_socket_does_not_block_an_accept_with_nothing_waiting(listener):
    with pytest.raises(BlockingIOError):
        listener.socket.accept()
    client = socket.create_connection(listener.socket.getsockname())
    try:
        accepted, _ = listener.socket.accept()
        accepted.close()
    finally:
        client.close()
