"""C-MOVE sub-associations under load, and a destination that dies mid-move (issue 17, the C-MOVE stall).

The stall: under load, pynetdicom's association reactor thread took a C-STORE response meant for the
thread sending the move's objects (diana/outbound_association.py); the move then waited until
dcmtk storescp closed the idle association after its socket timeout (60 s), and every later
sub-operation failed. It needs the reactor thread starved of the GIL for a round trip: here the Q/R
SCP runs in this process (``QueryRetrieveServer``, what ``diana serve`` runs) beside threads that keep
the interpreter busy, as the receiver's other associations and its Kafka publisher do under load.
The peers are real: dcmtk ``movescu`` asks, dcmtk ``storescp`` receives, from the real index and archive.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diana.access.qr.server import QueryRetrieveServer
from tests.support.dicomgen import GeneratedStudy, SeriesSpec, make_study
from tests.support.helpers import DCMTK_ENV, storescu, wait_until_caught_up
from tests.support.paths import port

STORESCP_PORT = port(11192)  # the "STORESCP" move destination of the test config
IN_PROCESS_QR_PORT = port(11188)
SERIES_SIZE = 100
MOVES = 5  # 1 of 5 stalled before the fix, under this load; bench.move_stall is the heavier reproduction
BUSY_THREADS = 4
# storescp closes an association idle this long; a stalled move shows up after it (its default is 60 s).
DESTINATION_IDLE_S = 20


@pytest.fixture(scope="module")
def series(pipeline, tmp_path_factory) -> GeneratedStudy:
    study = make_study(
        tmp_path_factory.mktemp("stall"), [SeriesSpec("CT", "STALL", SERIES_SIZE)], patient_id="QR-STALL", rows=32
    )
    result = storescu(pipeline.cfg, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg)
    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[pipeline.cfg.opensearch.url])
    client.indices.refresh(index="diana-instances")
    count = client.count(index="diana-instances", body={"query": {"term": {"study_instance_uid": study.study_uid}}})
    assert count["count"] == SERIES_SIZE, count
    return study


def _start_storescp(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["storescp", "-ts", str(DESTINATION_IDLE_S), "-aet", "STORESCP", "-od", str(out), str(STORESCP_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    deadline = time.monotonic() + 15
    while subprocess.run(
        ["echoscu", "-aec", "STORESCP", "127.0.0.1", str(STORESCP_PORT)], capture_output=True, env=DCMTK_ENV
    ).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.2)
    return proc


@pytest.fixture
def destination(tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    out = tmp_path / "received"
    out.mkdir()
    proc = _start_storescp(out)
    yield proc, out
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def _movescu(ae_title: str, qr_port: int, study_uid: str, timeout: float) -> subprocess.CompletedProcess:
    command = ["movescu", "-d", "-S", "-aec", ae_title, "-aem", "STORESCP"]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(qr_port)]
    return subprocess.run(command, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)


def final_counts(output: str) -> dict[str, int]:
    """The sub-operation counts of the last C-MOVE response movescu printed (-d)."""
    counts = {}
    for line in output.splitlines():
        for name in ("Remaining", "Completed", "Failed", "Warning"):
            if f"{name} Suboperations" in line and ":" in line:
                value = line.rsplit(":", 1)[1].strip()
                if value.isdigit():
                    counts[name] = int(value)
    return counts


@pytest.fixture
def busy_in_process_qr(pipeline) -> Iterator[QueryRetrieveServer]:
    """``diana serve``'s Q/R SCP in this process, with threads that keep the interpreter busy."""
    cfg = dataclasses.replace(
        pipeline.cfg, query_retrieve=dataclasses.replace(pipeline.cfg.query_retrieve, port=IN_PROCESS_QR_PORT)
    )
    server = QueryRetrieveServer(cfg)
    server.start()
    stop = threading.Event()

    def keep_busy() -> None:
        n = 0
        while not stop.is_set():
            n += 1  # pure bytecode: holds the GIL until the interpreter's switch interval takes it away

    busy = [threading.Thread(target=keep_busy, daemon=True) for _ in range(BUSY_THREADS)]
    for thread in busy:
        thread.start()
    try:
        yield server
    finally:
        stop.set()
        for thread in busy:
            thread.join(5)
        server.stop()


def test_moves_under_load_complete_every_sub_operation(pipeline, series, destination, busy_in_process_qr):
    """Before the fix, 1 of 5 moves stalled in this test's first run (66 completed, 34 failed); after it, 0 of 10."""
    _, out = destination
    outcomes = []
    for _ in range(MOVES):
        started = time.monotonic()
        result = _movescu(pipeline.cfg.receiver.ae_title, IN_PROCESS_QR_PORT, series.study_uid, timeout=300)
        output = result.stdout + result.stderr
        outcomes.append((final_counts(output), round(time.monotonic() - started, 1), output[-1500:]))
    stalled = [o for o in outcomes if o[0] != {"Remaining": 0, "Completed": SERIES_SIZE, "Failed": 0, "Warning": 0}]
    assert not stalled, f"{len(stalled)} of {MOVES} moves did not complete every sub-operation: {stalled[0]}"
    assert len(list(out.iterdir())) == SERIES_SIZE  # the same objects each time: storescp keeps one file per UID


@pytest.mark.parametrize("attempt", range(3))  # a race between the closed connection and the next send
def test_destination_killed_mid_move_ends_with_partial_failure_and_holds_up_nobody(
    pipeline, series, destination, attempt: int
) -> None:
    """storescp killed after a few objects: the move ends promptly with 0xB000 and counts that add up,
    the failed UIDs listed; meanwhile the receiver answers other associations."""
    proc, out = destination
    cfg = pipeline.cfg
    command = ["movescu", "-d", "-S", "-aec", cfg.receiver.ae_title, "-aem", "STORESCP"]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={series.study_uid}"]
    command += ["127.0.0.1", str(cfg.receiver.port)]
    started = time.monotonic()
    mover = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.iterdir())) < 10:
            assert mover.poll() is None, "the move ended before the destination was killed"
            assert time.monotonic() < deadline, "the destination received fewer than 10 objects in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        echo = subprocess.run(
            ["echoscu", "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port)],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stdout + echo.stderr
        output, _ = mover.communicate(timeout=60)
        after_kill_s = time.monotonic() - killed_at
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.wait()
    counts = final_counts(output)
    received = len(list(out.iterdir()))
    assert "0xb000" in output.lower(), output[-2000:]
    assert counts["Remaining"] == 0 and counts["Warning"] == 0, counts
    assert counts["Completed"] + counts["Failed"] == SERIES_SIZE, counts
    # storescp may have written an object whose response never left it (killed between the two): it
    # counts as failed, so the move completed no more than it received (one run: 9 completed, 10 received).
    assert 1 <= counts["Completed"] <= received, (counts, received)
    assert counts["Failed"] > 0
    assert "Failed SOP Instance UID List" in output or "FailedSOPInstanceUIDList" in output, output[-2000:]
    # Ended by the closed connection, not by a timeout (DIMSE 120 s, network 60 s).
    assert after_kill_s < 30, f"the move ended {after_kill_s:.1f} s after the destination died"
    assert time.monotonic() - started < 150
