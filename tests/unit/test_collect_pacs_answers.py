"""A collect job against a PACS that answers badly: a real pynetdicom PACS in this process (C-FIND and
C-MOVE handlers saying what such PACS say), the job's record and the index's count kept in memory.

Each case once ended wrongly: a count of 0 or -1 made studies "retrieved" or "already present" with
nothing received; a PACS ignoring a key had studies of other accessions retrieved; a PACS aborting
one study's retrieve had the job ask for it for ever; a C-MOVE never answered held the job past
Ctrl-C."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from diana.config import CollectConfig
from diana.producers.pacs_pull.job import CollectJob
from diana.producers.pacs_pull.ledger import JobState
from diana.producers.pacs_pull.requests import CollectRequest
from diana.producers.pacs_pull.scu import PacsClient
from tests.support.collect_fakes import NothingIndexed, OneStudyPacs, RecordingLedger, one_line_job, serving_pacs


def _study(uid: str, accession: str, count: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID, ds.AccessionNumber, ds.NumberOfStudyRelatedInstances = uid, accession, count
    return ds


@contextmanager
def _pacs(
    found: list[Dataset], on_move: Callable, final_find_status: int = 0x0000, contexts: tuple = (FIND, MOVE)
) -> Iterator[tuple[int, list[str]]]:
    moved: list[str] = []

    def find(event):
        for ds in found:
            yield 0xFF00, ds
        if final_find_status:
            yield final_find_status, None

    def move(event):
        moved.append(str(event.identifier.StudyInstanceUID))
        yield from on_move(event)

    with serving_pacs(find, move, contexts) as port:
        yield port, moved


def _job(port: int, stop: threading.Event | None = None, **settings) -> tuple[CollectJob, RecordingLedger]:
    config = CollectConfig(
        pacs_host="127.0.0.1",
        pacs_port=port,
        retries=1,
        backoff_s=0.01,
        verify_timeout_s=0.1,
        pause_s=0.1,
        timeout_s=5,
        **settings,
    )
    ledger = RecordingLedger()
    request = CollectRequest(2, "A1", accession_number="A1")
    job = CollectJob(
        config,
        JobState("j"),
        [request],
        ledger,
        PacsClient(config, "DIANA"),
        NothingIndexed(),
        notify=lambda _t: None,
        stop=stop,
    )
    return job, ledger


def _nothing_sent(event):
    yield "127.0.0.1", 1  # never reached: no sub-operation
    yield 0  # success, with nothing sent


def _destination_unknown(event):
    yield None, None  # 0xA801: nothing sent


def test_a_count_of_0_or_less_is_no_count_and_nothing_received_is_no_study():
    for count in ("0", "-1"):
        with _pacs([_study("1.2.3.4", "A1", count)], _nothing_sent) as (port, moved):
            job, _ = _job(port)
            state = job.run()
        study = state.studies["1.2.3.4"]
        assert (study.state, study.expected_instances, moved) == ("STUDY_FAILED", None, ["1.2.3.4"] * 2), count


def test_a_match_that_contradicts_the_request_is_not_retrieved():
    found = [_study("1.2.3.4", "A1", "2"), _study("9.9.9", "OTHER", "3")]  # a PACS that ignored the accession
    with _pacs(found, _nothing_sent) as (port, moved):
        job, _ = _job(port)
        state = job.run()
    assert set(state.studies) == {"1.2.3.4"} and set(moved) == {"1.2.3.4"}


def test_a_pacs_that_aborts_a_studys_retrieve_uses_up_its_retries_and_the_job_ends():
    def abort(event):
        event.assoc.abort()
        yield 1, None

    with _pacs([_study("1.2.3.4", "A1", "5")], abort) as (port, moved):
        job, ledger = _job(port)
        state = job.run()
    assert state.studies["1.2.3.4"].state == "STUDY_FAILED" and state.studies["1.2.3.4"].pacs_status == "aborted"
    assert len(moved) == 2 and ledger.events[-1] == "JOB_DONE"


def test_a_retrieve_never_answered_is_aborted_when_the_job_is_stopped():
    release = threading.Event()

    def hang(event):
        yield "127.0.0.1", 1
        release.wait(30)  # the PACS takes the C-MOVE and never answers it
        yield 0, None

    stop = threading.Event()
    with _pacs([_study("1.2.3.4", "A1", "5")], hang) as (port, moved):
        job, ledger = _job(port, stop)
        threading.Timer(1.0, stop.set).start()  # what SIGTERM and Ctrl-C do (stop_on_signals)
        started = time.monotonic()
        job.run()
        took = time.monotonic() - started
        release.set()
    assert moved == ["1.2.3.4"] and took < 10, took
    assert "JOB_DONE" not in ledger.events and "STUDY_FAILED" not in ledger.events  # resumable as it was


def test_the_first_error_stops_the_job_before_other_retrieves_start():
    """With two retrieves at once, the second failing (the index gone) while the first takes its time:
    the error is seen at once and no third retrieve starts (the futures were awaited in order before)."""
    from diana.producers.pacs_pull.scu import MoveResult, StudyMatch

    started: list[str] = []
    slow_one = threading.Event()

    class Pacs:
        def find_studies(self, keys):
            return [StudyMatch(uid, "A1", 5) for uid in ("1.1", "1.2", "1.3", "1.4", "1.5")]

        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()  # the PACS took the association
            started.append(uid)
            if uid == "1.2":
                raise RuntimeError("the index is gone")
            (stop or slow_one).wait(5)  # study 1.1 takes its time; stop aborts it, as a real C-MOVE (test above)
            return MoveResult(0, 5, 0, 0)

    config = CollectConfig(concurrency=2, retries=0, verify_timeout_s=0.1)
    job = one_line_job(config, RecordingLedger(), Pacs(), NothingIndexed())
    started_at = time.monotonic()
    try:
        job.run()
    except RuntimeError as exc:
        assert str(exc) == "the index is gone"
    else:
        raise AssertionError("the error was not raised")
    finally:
        slow_one.set()
    assert time.monotonic() - started_at < 4 and sorted(started)[:2] == ["1.1", "1.2"] and len(started) == 2, started


def test_a_pacs_that_sends_everything_then_aborts_has_the_study_complete():
    def send_then_abort(event):
        event.assoc.abort()
        yield 1, None

    class AllIndexed(NothingIndexed):
        def wait_for(self, uid, target, timeout_s, stop):
            return 5

    with _pacs([_study("1.2.3.4", "A1", "5")], send_then_abort) as (port, moved):
        config = CollectConfig(
            pacs_host="127.0.0.1", pacs_port=port, retries=1, backoff_s=0.01, pause_s=0.1, timeout_s=5
        )
        job = one_line_job(config, RecordingLedger(), PacsClient(config, "DIANA"), AllIndexed())
        state = job.run()
    assert state.studies["1.2.3.4"].state == "STUDY_COMPLETE" and moved == ["1.2.3.4"]


def test_a_stop_leaves_the_studies_still_queued_unstarted():
    """SIGTERM with 200 studies queued behind 2 running: before, every queued one still asked the index
    for its count (minutes on a real index) before the job ended."""
    from diana.producers.pacs_pull.scu import MoveResult, StudyMatch

    counted: list[str] = []

    class Pacs:
        def find_studies(self, keys):
            return [StudyMatch(f"1.{n}", "A1", 5) for n in range(1, 201)]

        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()  # the PACS took the association
            stop.wait(5)  # aborted by stop, as a real C-MOVE
            return MoveResult(0, 5, 0, 0)

    class SlowIndex(NothingIndexed):
        def count(self, uid: str) -> int:
            counted.append(uid)
            time.sleep(0.05)
            return 0

    stop = threading.Event()
    job = one_line_job(
        CollectConfig(concurrency=2, retries=0, verify_timeout_s=0.1), RecordingLedger(), Pacs(), SlowIndex(), stop=stop
    )
    # Mid-way between two of retrieve_all's half-second looks at the stop: queued studies started in
    # between (the test passed only when the stop fell just before one).
    threading.Timer(0.75, stop.set).start()
    started = time.monotonic()
    job.run()
    assert time.monotonic() - started < 3 and len(counted) <= 4, (time.monotonic() - started, len(counted))


def test_matches_before_a_find_failure_are_counted_and_the_line_says_to_narrow_it():
    """A PACS at its limit of matches ends the C-FIND with a failure: the line stays find_failed (the
    list is incomplete), but it said nothing of the matches that came nor what to do."""
    found = [_study("1.2.3.4", "A1", "2"), _study("1.2.3.5", "A1", "2")]
    for status in (0xA700, 0xC000, 0xFE00):
        with _pacs(found, _nothing_sent, final_find_status=status) as (port, moved):
            job, _ = _job(port)
            state = job.run()
        line = state.lines[2]
        assert (line.state, line.pacs_status, state.studies, moved) == ("LINE_FAILED", f"0x{status:04X}", {}, [])
        assert "2 matches came before it" in line.detail, line.detail
        assert "narrow the line's query (a shorter date range, one modality)" in line.detail, line.detail


def test_a_retrieve_moving_more_than_the_find_count_waits_for_all_it_moved():
    """The C-FIND said 5, the C-MOVE sent 8 (the study grew, or the count was stale): the study was
    recorded retrieved with 5 indexed while 3 were still in the pipeline."""
    from diana.producers.pacs_pull.scu import MoveResult, StudyMatch

    waited: list[int] = []

    class Pacs:
        def find_studies(self, keys):
            return [StudyMatch("1.1", "A1", 5)]

        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()  # the PACS took the association
            return MoveResult(0x0000, 8, 0, 0)

    class Lagging(NothingIndexed):
        def wait_for(self, uid, target, timeout_s, stop):
            waited.append(target)
            return 5 if len(waited) == 1 else 8  # 3 more still in the pipeline at first

    job = one_line_job(
        CollectConfig(retries=1, backoff_s=0.01, verify_timeout_s=0.1), RecordingLedger(), Pacs(), Lagging()
    )
    study = job.run().studies["1.1"]
    assert (study.state, study.expected_instances, study.indexed_instances) == ("STUDY_COMPLETE", 8, 8)
    assert waited == [8, 8]


def test_a_pacs_without_study_root_move_or_find_stops_the_job_with_what_it_needs():
    """A PACS that accepts the association but not the Study Root C-MOVE (C-GET only, Patient Root
    only) or C-FIND: pynetdicom's ValueError came out of the job, a traceback on the command line."""
    import pytest

    from diana.producers.pacs_pull.scu import PacsSetupError

    for contexts, missing, event in (
        ((FIND,), "Study Root Query/Retrieve Information Model - MOVE", "LINE_FOUND"),
        ((MOVE,), "Study Root Query/Retrieve Information Model - FIND", "JOB_STARTED"),
    ):
        with _pacs([_study("1.2.3.4", "A1", "5")], _nothing_sent, contexts=contexts) as (port, moved):
            job, ledger = _job(port)
            with pytest.raises(PacsSetupError) as raised:
                job.run()
        assert missing in str(raised.value) and "needs Study Root C-FIND and C-MOVE" in str(raised.value)
        assert event in ledger.events and "STUDY_FAILED" not in ledger.events and moved == [], ledger.events


def test_the_command_line_says_what_the_pacs_lacks_and_exits_1(tmp_path, monkeypatch, capsys):
    from diana.producers.pacs_pull.scu import PacsClient
    from tests.unit.test_collect_unit import _collect_cli, _Index

    csv_file = tmp_path / "a.csv"
    csv_file.write_text("AccessionNumber\nA1\n")
    with _pacs([_study("1.2.3.4", "A1", "5")], _nothing_sent, contexts=(FIND,)) as (port, moved):
        conf = f'pacs_host = "127.0.0.1"\npacs_port = {port}\ntimeout_s = 5\n'
        assert _collect_cli(tmp_path, monkeypatch, PacsClient, _Index(), [str(csv_file)], conf) == 1
    err = capsys.readouterr().err
    assert "does not accept Study Root Query/Retrieve Information Model - MOVE" in err and "Traceback" not in err, err
    assert "run the same command again to resume job collect-" in err


def test_a_refused_association_is_no_retrieve_and_takes_no_place_in_the_hour():
    """A PACS at its association limit refusing three times, then taking the retrieve: each refusal
    was recorded as a retrieve (MOVE_STARTED) and took one of studies_per_hour's places."""
    from diana.producers.pacs_pull.scu import MoveResult, PacsUnavailable, StudyMatch

    calls: list[str] = []

    class Pacs:
        where = "PACS at test"

        def find_studies(self, keys):
            return [StudyMatch("1.1", "A1", 3)]

        def move_study(self, uid, stop=None, on_established=lambda: None):
            calls.append(uid)
            if len(calls) <= 3:
                raise PacsUnavailable("rejected the association")  # before any association: no call back
            on_established()
            return MoveResult(0, 3, 0, 0)

    class ArrivesWhenSent(NothingIndexed):
        def wait_for(self, uid, target, timeout_s, stop):
            return 3

    ledger = RecordingLedger()
    job = one_line_job(
        CollectConfig(retries=1, backoff_s=0.01, verify_timeout_s=0.1, pause_s=0.01, studies_per_hour=100),
        ledger,
        Pacs(),
        ArrivesWhenSent(),
    )
    study = job.run().studies["1.1"]
    assert (study.state, study.attempts, len(calls)) == ("STUDY_COMPLETE", 1, 4)
    assert ledger.events.count("MOVE_STARTED") == 1 and ledger.events.count("JOB_PAUSED") == 3
    assert len(job.gate._starts) == 1


def test_a_pacs_that_does_not_answer_a_retrieve_records_no_retrieve():
    """The real client against a port nobody listens on: the job pauses, records no MOVE_STARTED and
    gives the hour's place back."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the job runs: connection refused
    stop = threading.Event()
    job, ledger = _job(port, stop, studies_per_hour=10)
    job.job.apply({"event": "STUDY_FOUND", "study_instance_uid": "1.2.3.4", "line": 2, "expected_instances": 5})
    threading.Timer(1.0, stop.set).start()
    job.retrieve_all()
    assert "JOB_PAUSED" in ledger.events and "MOVE_STARTED" not in ledger.events, ledger.events
    assert job.job.studies["1.2.3.4"].attempts == 0 and len(job.gate._starts) == 0


def test_a_move_destination_the_pacs_does_not_know_stops_the_job_and_fails_no_study():
    """0xA801 (move destination unknown) is the same for every study: each used up its retries and the
    whole cohort ended failed, final, for a setting to fix on the PACS."""
    import pytest

    from diana.producers.pacs_pull.scu import MoveDestinationUnknown

    found = [_study(f"1.2.3.{n}", "A1", "5") for n in range(5)]
    with _pacs(found, _destination_unknown) as (port, moved):
        job, ledger = _job(port)
        with pytest.raises(MoveDestinationUnknown) as raised:
            job.run()
    assert "'DIANA'" in str(raised.value) and "0xA801" in str(raised.value)
    assert len(moved) <= 2 and "STUDY_FAILED" not in ledger.events and "JOB_DONE" not in ledger.events
    # run again once fixed: the study's retrieve ended having sent nothing, so nothing to wait for
    study = job.job.studies[moved[0]]
    assert (study.state, study.pacs_status, study.arriving) == ("MOVE_ENDED", "0xA801", False)
    from diana.producers.pacs_pull.scu import MoveResult

    class Fixed:
        def find_studies(self, keys):
            raise AssertionError("the line was resolved before")

        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()
            return MoveResult(0, 5, 0, 0)

    class Arrives(NothingIndexed):
        def wait_for(self, uid, target, timeout_s, stop):
            return 5

    again = CollectJob(job.settings, job.job, job.requests, ledger, Fixed(), Arrives(), notify=lambda _t: None)  # type: ignore[arg-type]
    state = again.run()
    assert {s.state for s in state.studies.values()} == {"STUDY_COMPLETE"} and ledger.events[-1] == "JOB_DONE"


def test_the_command_line_names_the_move_destination_and_how_to_fix_it(tmp_path, monkeypatch, capsys):
    from diana.producers.pacs_pull.scu import PacsClient
    from tests.unit.test_collect_unit import _collect_cli, _Index

    csv_file = tmp_path / "a.csv"
    csv_file.write_text("AccessionNumber\nA1\n")
    with _pacs([_study("1.2.3.4", "A1", "5")], _destination_unknown) as (port, moved):
        conf = f'pacs_host = "127.0.0.1"\npacs_port = {port}\ntimeout_s = 5\n[receiver]\nport = 11112\n'
        assert _collect_cli(tmp_path, monkeypatch, PacsClient, _Index(), [str(csv_file)], conf) == 1
        err = capsys.readouterr().err
        assert "move destination is 'DIANA' ([receiver] ae_title)" in err, err
        assert "with our receiver's host and port (this host's address, port 11112)" in err
        assert "no study was marked failed" in err and "Traceback" not in err
        conf = f'move_destination = "DIANA-PULL"\npacs_host = "127.0.0.1"\npacs_port = {port}\ntimeout_s = 5\n'
        assert _collect_cli(tmp_path, monkeypatch, PacsClient, _Index(), [str(csv_file)], conf) == 1
        assert "move destination is 'DIANA-PULL' ([collect] move_destination)" in capsys.readouterr().err


def _scripted_job(answers: list[int], retries: int) -> tuple[CollectJob, RecordingLedger, list[str]]:
    """A job of one study (3 instances) whose C-MOVEs end with ``answers`` in turn (the last one
    again after); 0x0000 sends all 3, any other status none."""
    from diana.producers.pacs_pull.scu import MoveResult

    moves: list[str] = []

    class Pacs(OneStudyPacs):
        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()
            status = answers[min(len(moves), len(answers) - 1)]
            moves.append(uid)
            # out of resources before any sub-operation (no counts); otherwise all 3 sent, or all failed
            if status >> 8 == 0xA7:
                return MoveResult(status, 0, 0, 0)
            return MoveResult(status, 3 if status == 0 else 0, 0 if status == 0 else 3, 0)

    class Index(NothingIndexed):
        def wait_for(self, uid, target, timeout_s, stop):
            return 3 if answers[min(len(moves), len(answers)) - 1] == 0 else 0

    ledger = RecordingLedger()
    job = one_line_job(
        CollectConfig(retries=retries, backoff_s=0.01, verify_timeout_s=0.1, pause_s=0.01), ledger, Pacs(), Index()
    )
    return job, ledger, moves


def test_a_pacs_out_of_resources_pauses_the_job_without_using_up_the_studys_tries():
    """0xA702 (out of resources) is the PACS busy, not the study: it used up the study's tries, and in
    a busy hour studies ended failed, for good, for the PACS's load."""
    job, ledger, moves = _scripted_job([0xA702, 0xC000, 0x0000], retries=1)
    study = job.run().studies["1.1"]
    assert (study.state, len(moves), ledger.events.count("JOB_PAUSED")) == ("STUDY_COMPLETE", 3, 1)


def test_a_pacs_always_out_of_resources_for_a_study_pauses_at_most_retries_times():
    job, ledger, moves = _scripted_job([0xA701], retries=2)
    study = job.run().studies["1.1"]
    # two pauses, then the three tries of a study (1 + retries)
    assert (study.state, study.pacs_status, len(moves)) == ("STUDY_FAILED", "0xA701", 5)
    assert ledger.events.count("JOB_PAUSED") == 2 and ledger.events[-1] == "JOB_DONE"


@contextmanager
def _receiver() -> Iterator[tuple[int, list[str]]]:
    """Our receiver as a Verification SCP in this process: its port, and the C-ECHOs it answered."""
    from pynetdicom.sop_class import Verification

    echoes: list[str] = []

    def echo(event):
        echoes.append(event.assoc.requestor.ae_title)
        return 0x0000

    ae = AE("DIANA")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, echo)])
    try:
        yield server.server_address[1], echoes
    finally:
        server.shutdown()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when used: connection refused


def test_a_receiver_that_does_not_answer_pauses_the_job_before_the_pacs_fails_the_study():
    """The PACS was asked to send to our receiver while it was down: each study used up its tries
    and ended failed, for our fault."""
    from diana.config import ReceiverConfig
    from diana.producers.pacs_pull.scu import ReceiverProbe

    port = _closed_port()
    said: list[str] = []
    stop = threading.Event()
    with _pacs([_study("1.2.3.4", "A1", "5")], _nothing_sent) as (pacs_port, moved):
        job, ledger = _job(pacs_port, stop, studies_per_hour=10)
        job.notify = said.append
        job.receiver = ReceiverProbe(ReceiverConfig(host="0.0.0.0", port=port), "DIANA-COLLECT", every_s=0.1)
        threading.Timer(1.0, stop.set).start()
        job.run()
    assert moved == [] and "MOVE_STARTED" not in ledger.events and len(job.gate._starts) == 0
    assert "JOB_PAUSED" in ledger.events and "STUDY_FAILED" not in ledger.events
    assert f"our receiver 'DIANA' at 127.0.0.1:{port}" in said[0] and "does not answer" in said[0], said
    assert "start it" in said[0]


def test_our_receiver_is_echoed_at_most_once_per_pause():
    from diana.config import ReceiverConfig
    from diana.producers.pacs_pull.scu import ReceiverProbe

    with _receiver() as (port, echoes):
        probe = ReceiverProbe(ReceiverConfig(ae_title="DIANA", host="127.0.0.1", port=port), "DIANA-COLLECT", 60)
        started = time.monotonic()
        assert [probe.problem() for _ in range(50)] == [None] * 50
        took = time.monotonic() - started
    assert echoes == ["DIANA-COLLECT"] and took < 1, (echoes, took)


def test_a_retrieve_refused_for_want_of_resources_is_no_retrieve_in_the_record():
    """0xA702 was recorded MOVE_STARTED, then MOVE_ENDED: the report's `retrieves` counted it, a restart
    counted it in the hour's starts, and a study found complete after it was "retrieved by an earlier
    retrieve" (retrieved) instead of already present."""
    from diana.producers.pacs_pull.report import report_rows

    job, ledger, moves = _scripted_job([0xA702, 0xC000, 0x0000], retries=1)
    state = job.run()
    study = state.studies["1.1"]
    assert (study.state, len(moves), study.attempts) == ("STUDY_COMPLETE", 3, 2)  # 2 retrieves, 1 refusal
    assert len(study.move_starts) == 2 and ledger.events.count("MOVE_REFUSED") == 1
    row = report_rows(state)[0]
    assert row["retrieves"] == 2


def _at(event: str, **fields) -> dict:
    return {"job_id": "j", "at": datetime.now(UTC), "event": event, **fields}


def test_a_refusal_folds_back_to_the_state_before_it():
    found = _at("STUDY_FOUND", line=2, study_instance_uid="1.1", expected_instances=3)
    started = _at("MOVE_STARTED", line=2, study_instance_uid="1.1", attempt=1)
    refused = _at("MOVE_REFUSED", line=2, study_instance_uid="1.1", attempt=1, pacs_status="0xA702", detail="busy")
    # as versions before MOVE_REFUSED recorded it
    old = _at(
        "MOVE_ENDED",
        line=2,
        study_instance_uid="1.1",
        attempt=1,
        pacs_status="0xA701",
        completed=0,
        failed=0,
        warning=0,
        detail="the PACS is out of resources (1 of at most 3 pauses): no try",
    )
    for refusal in (refused, old):
        study = JobState.fold("j", [found, started, refusal]).studies["1.1"]
        assert (study.state, study.attempts, study.move_starts, study.arriving) == ("STUDY_FOUND", 0, [], False)
        # --retry-failed of a failed study refused again: still failed (done), its status and detail kept
        failed = _at("STUDY_FAILED", line=2, study_instance_uid="1.1", pacs_status="0xC000", detail="short")
        study = JobState.fold("j", [found, started, failed, started, refusal]).studies["1.1"]
        assert (study.state, study.attempts, study.pacs_status, study.detail) == ("STUDY_FAILED", 1, "0xC000", "short")
        assert study.done


def test_a_study_refused_before_a_restart_and_found_complete_is_already_present():
    """Only refusals before: it was recorded STUDY_COMPLETE "retrieved by an earlier retrieve"."""
    events = [
        _at("JOB_STARTED", input='[[2,"A1"]]'),
        _at("STUDY_FOUND", line=2, study_instance_uid="1.1", expected_instances=3),
        _at("LINE_FOUND", line=2, input="A1", pacs_status="0x0000"),
        _at("MOVE_STARTED", line=2, study_instance_uid="1.1", attempt=1),
        _at("MOVE_REFUSED", line=2, study_instance_uid="1.1", attempt=1, pacs_status="0xA702"),
    ]

    class Pacs(OneStudyPacs):
        def move_study(self, uid, stop=None, on_established=lambda: None):
            raise AssertionError("not retrieved: it is complete in diana-star")

    class Complete(NothingIndexed):
        def count(self, uid):
            return 3

    ledger = RecordingLedger()
    job = one_line_job(CollectConfig(), ledger, Pacs(), Complete(), job=JobState.fold("j", events))
    study = job.run().studies["1.1"]
    assert (study.state, study.detail, study.attempts) == ("STUDY_SKIPPED", "already complete in diana-star", 0)


def test_out_of_resources_after_sub_operations_were_sent_is_a_retrieve_not_a_refusal():
    """0xA702 after 2 of 3 instances were sent was recorded MOVE_REFUSED: folded as if nothing had been
    sent (no retrieve, not arriving), so a restart did not wait for those 2 before retrieving again."""
    from diana.producers.pacs_pull.scu import MoveResult

    moves: list[MoveResult] = []
    script = [MoveResult(0xA702, 2, 0, 0), MoveResult(0x0000, 3, 0, 0)]

    class Pacs(OneStudyPacs):
        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()
            moves.append(script[len(moves)])
            return moves[-1]

    class Index(NothingIndexed):
        def wait_for(self, uid, target, timeout_s, stop):
            return 2 if len(moves) == 1 else 3

    ledger = RecordingLedger()
    job = one_line_job(
        CollectConfig(retries=1, backoff_s=0.01, verify_timeout_s=0.1, pause_s=0.01), ledger, Pacs(), Index()
    )
    state = job.run()
    assert "MOVE_REFUSED" not in ledger.events and ledger.events.count("MOVE_ENDED") == 2
    assert ledger.events.count("JOB_PAUSED") == 1  # the PACS busy: a pause, not one of the study's tries
    study = state.studies["1.1"]
    assert (study.state, study.attempts, len(study.move_starts)) == ("STUDY_COMPLETE", 2, 2)


def test_a_refusal_with_sub_operations_sent_folds_as_a_retrieve():
    """Old records (MOVE_ENDED 0xA7xx "...: no try") and new alike: one that counted sub-operations is a
    retrieve whose instances may be arriving, not a refusal to take back."""
    found = _at("STUDY_FOUND", line=2, study_instance_uid="1.1", expected_instances=3)
    started = _at("MOVE_STARTED", line=2, study_instance_uid="1.1", attempt=1)
    busy = _at(
        "MOVE_ENDED",
        line=2,
        study_instance_uid="1.1",
        attempt=1,
        pacs_status="0xA702",
        completed=2,
        failed=0,
        warning=0,
        detail="the PACS is out of resources (1 of at most 3 pauses): no try",
    )
    study = JobState.fold("j", [found, started, busy]).studies["1.1"]
    assert (study.state, study.attempts, len(study.move_starts), study.arriving) == ("MOVE_ENDED", 1, 1, True)


def test_a_refusal_after_a_crashed_retrieve_still_waits_for_what_that_one_sent():
    """MOVE_STARTED (the job killed mid-retrieve), MOVE_STARTED, MOVE_REFUSED folded to arriving False:
    a restart retrieved again without waiting for what the first retrieve may have sent."""
    found = _at("STUDY_FOUND", line=2, study_instance_uid="1.1", expected_instances=3)
    crashed = _at("MOVE_STARTED", line=2, study_instance_uid="1.1", attempt=1)
    started = _at("MOVE_STARTED", line=2, study_instance_uid="1.1", attempt=2)
    refused = _at("MOVE_REFUSED", line=2, study_instance_uid="1.1", attempt=2, pacs_status="0xA701", detail="x")
    study = JobState.fold("j", [found, crashed, started, refused]).studies["1.1"]
    assert (study.state, study.attempts, len(study.move_starts), study.arriving) == ("STUDY_FOUND", 1, 1, True)
