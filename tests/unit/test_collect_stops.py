"""A collect job stopped at awkward moments, and a receiver address that drops connections (review of
stop 37): no retrieve starts after the stop, a stop is never a traceback, the receiver's C-ECHO is
bounded by its timeout. In-process pynetdicom peers on port 0; the ledger and index are stand-ins."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from diana.config import CollectConfig, ReceiverConfig
from diana.producers.pacs_pull.scu import MoveResult, PacsClient, PacsUnavailable, ReceiverProbe
from tests.support.collect_fakes import NothingIndexed, OneStudyPacs, RecordingLedger, one_line_job


def test_a_stop_during_the_receiver_check_starts_no_retrieve():
    """Ctrl-C, or another worker's 0xA801, while this worker is past the gate and C-ECHOes our
    receiver: it went on to open an association, record MOVE_STARTED and send the C-MOVE."""
    stop = threading.Event()
    moves: list[str] = []

    class StoppedDuringTheEcho:
        def problem(self):
            stop.set()
            return None

    class Pacs(OneStudyPacs):
        def move_study(self, uid, stop=None, on_established=lambda: None):
            moves.append(uid)
            on_established()
            return MoveResult(0, 3, 0, 0)

    ledger = RecordingLedger()
    job = one_line_job(
        CollectConfig(retries=1, pause_s=0.01, studies_per_hour=1),
        ledger,
        Pacs(),
        NothingIndexed(),
        stop=stop,
        receiver=StoppedDuringTheEcho(),
    )
    job.resolve_lines()
    job.retrieve_all()
    assert moves == [] and "MOVE_STARTED" not in ledger.events
    assert job.gate.acquire(threading.Event(), lambda _t: None) is not None  # the hour's place given back


def test_a_stop_while_move_started_is_recorded_is_a_stop_not_a_runtime_error():
    """The stop set while MOVE_STARTED waits for the broker (over the abort watcher's 0.5 s): the
    watcher aborted the association before the send, and pynetdicom's RuntimeError was a traceback."""

    def move(event):  # a PACS slow to answer: the stop's watcher aborts while the C-MOVE waits
        time.sleep(2)
        yield "127.0.0.1", 1
        yield 0

    ae = AE("PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, move)])
    try:
        cfg = CollectConfig(pacs_host="127.0.0.1", pacs_port=server.server_address[1], timeout_s=5)
        stop = threading.Event()

        def slow_record() -> None:
            stop.set()
            time.sleep(0.7)

        with pytest.raises(PacsUnavailable, match="stopped"):
            PacsClient(cfg, "DIANA").move_study("1.2.3", stop, on_established=slow_record)
        with pytest.raises(PacsUnavailable, match="stopped"):  # already stopped: not even associated
            PacsClient(cfg, "DIANA").move_study("1.2.3", stop)
    finally:
        server.shutdown()


def test_the_receiver_check_of_an_address_that_drops_connections_ends_within_its_timeout(monkeypatch):
    """A listener whose accept queue is full drops further SYNs: without a connect timeout the C-ECHO
    waited for the OS's retries (about two minutes), every worker queued behind its lock."""
    monkeypatch.setattr(ReceiverProbe, "TIMEOUT_S", 2.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.2)
    try:
        probe = ReceiverProbe(ReceiverConfig(host="127.0.0.1", port=port), "DIANA-COLLECT", 60)
        answers: list[str | None] = []
        checking = threading.Thread(target=lambda: answers.append(probe.problem()), daemon=True)
        checking.start()
        checking.join(15)
        assert not checking.is_alive(), "the receiver check still blocked"
        assert answers and answers[0] is not None and "does not answer" in answers[0]
    finally:
        for c in fillers:
            c.close()
        listener.close()
