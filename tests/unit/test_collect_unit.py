"""`diana collect` without services: input lines, time windows and the hourly limit, the job's fold and report."""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from diana.producers.pacs_pull.ledger import JobState
from diana.producers.pacs_pull.report import report_rows, summary_line, write_report
from diana.producers.pacs_pull.requests import RequestError, criteria_request, parse_csv
from diana.producers.pacs_pull.throttle import StartGate, TimeWindows
from tests.support.collect_fakes import RecordingLedger
from tests.support.umask import umask


def test_accession_csv_with_bad_lines_keeps_their_numbers(tmp_path: Path):
    path = tmp_path / "a.csv"
    path.write_text("AccessionNumber\nA1\n\nA*2\nTHIS-ONE-IS-FAR-TOO-LONG\nA3,extra\nA4\n")
    got = parse_csv(path)
    assert [(r.line, r.accession_number, bool(r.error)) for r in got] == [
        (2, "A1", False),
        (4, "", True),
        (5, "", True),
        (6, "", True),
        (7, "A4", False),
    ]
    assert "at most 16 characters" in got[2].error
    assert got[0].find_keys() == {"AccessionNumber": "A1"}


def test_patient_csv_with_dates_and_modality(tmp_path: Path):
    path = tmp_path / "p.csv"
    path.write_text(
        "PatientID,DateFrom,DateTo,Modality\nP1,2024-01-01,20240131,CT/mr\nP2,2024-02-30,,\nP3,2024-03-02,2024-03-01,\n"
    )
    ok, bad_date, reversed_dates = parse_csv(path)
    assert ok.find_keys() == {"PatientID": "P1", "StudyDate": "20240101-20240131", "ModalitiesInStudy": "CT\\MR"}
    assert "not a date" in bad_date.error
    assert "after" in reversed_dates.error


def test_cohort_find_output_and_headerless_lists(tmp_path: Path):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(
        "study_instance_uid,study_date,modalities\n1.2.3.4,2024-03-15,CT\n1..3,2024-03-15,CT\n1.02.3,2024-03-15,CT\n"
    )
    uid, bad, leading_zero = parse_csv(cohort)
    assert uid.find_keys() == {"StudyInstanceUID": "1.2.3.4"}
    assert leading_zero.find_keys() == {"StudyInstanceUID": "1.02.3"}  # not conformant, but it exists in the wild
    assert "not a UID" in bad.error
    plain = tmp_path / "plain.txt"
    plain.write_text("ACC1\nACC2\n")
    assert [(r.line, r.accession_number) for r in parse_csv(plain)] == [(1, "ACC1"), (2, "ACC2")]
    only_dates = tmp_path / "dates.csv"
    only_dates.write_text("DateFrom,DateTo\n2024-01-01,2024-01-02\n")
    with pytest.raises(RequestError, match="no AccessionNumber, PatientID or StudyInstanceUID"):
        parse_csv(only_dates)


def test_criteria_job():
    request = criteria_request("2024-03-01", "2024-03-31", ("ct",))
    assert request.find_keys() == {"StudyDate": "20240301-20240331", "ModalitiesInStudy": "CT"}
    with pytest.raises(RequestError, match="needs --date-from"):
        criteria_request()


def test_time_windows_across_midnight():
    windows = TimeWindows("22:00-06:00, 12:00-13:00")
    at = lambda h, m=0: datetime(2026, 11, 28, h, m)  # noqa: E731
    assert [windows.is_open(at(h)) for h in (23, 0, 5, 6, 11, 12, 13, 21)] == [
        True,
        True,
        True,
        False,
        False,
        True,
        False,
        False,
    ]
    assert TimeWindows("").is_open(at(9))
    for bad in ("22:00", "25:00-01:00", "10:00-10:00"):
        with pytest.raises(ValueError, match="HH:MM-HH:MM"):
            TimeWindows(bad)


def test_hourly_limit_counts_starts_before_a_restart():
    said: list[str] = []
    stop = threading.Event()
    gate = StartGate(TimeWindows(""), per_hour=2, earlier_starts=[time.time() - 10, time.time() - 4000])
    assert gate.acquire(stop, said.append)  # one start in the last hour (the other is older): one place left
    threading.Timer(0.3, stop.set).start()
    assert not gate.acquire(stop, said.append)  # the hour is full: waits, says so, gives up on stop
    assert said and "2 studies started in the last hour" in said[0]


def test_a_place_given_back_is_free_again():
    """A retrieve whose association the PACS refused gives its place in the hour back (it took one)."""
    stop = threading.Event()
    gate = StartGate(TimeWindows(""), per_hour=1)
    place = gate.acquire(stop, print)
    assert place is not None
    gate.give_back(place)
    threading.Timer(2.0, stop.set).start()  # a guard: the place not given back would wait an hour
    started = time.monotonic()
    assert gate.acquire(stop, print) is not None and time.monotonic() - started < 1


def _event(kind: str, **fields) -> dict:
    return {"job_id": "j", "at": datetime.now(UTC), "event": kind, **fields}


def test_fold_and_report():
    events = [
        _event("JOB_STARTED", input="[]"),
        _event("LINE_UNPARSABLE", line=2, input="A*", detail="bad"),
        _event("STUDY_FOUND", line=3, study_instance_uid="1.2", accession_number="A3", expected_instances=3),
        _event("LINE_FOUND", line=3, input="A3", pacs_status="0x0000"),
        _event("LINE_NOT_FOUND", line=4, input="A4", pacs_status="0x0000"),
        _event("MOVE_STARTED", line=3, study_instance_uid="1.2", attempt=1),
        _event("MOVE_ENDED", line=3, study_instance_uid="1.2", pacs_status="0xB000", completed=2, failed=1),
        # the same line found again after a restart does not undo the progress
        _event("STUDY_FOUND", line=3, study_instance_uid="1.2", accession_number="A3", expected_instances=3),
        _event("STUDY_PARTIAL", line=3, study_instance_uid="1.2", indexed_instances=2, pacs_status="0xB000"),
    ]
    job = JobState.fold("j", events)
    assert job.studies["1.2"].state == "STUDY_PARTIAL" and job.studies["1.2"].attempts == 1
    rows = report_rows(job)
    assert [(r["line"], r["outcome"]) for r in rows] == [(2, "unparsable"), (3, "partial"), (4, "not_found")]
    assert rows[1]["pacs_status"] == "0xB000" and rows[1]["indexed_instances"] == 2
    out = io.StringIO()
    assert write_report(job, out) == 3
    assert out.getvalue().splitlines()[0].startswith("line,input,outcome,study_instance_uid")
    assert summary_line(job) == "job j (not finished): 1 not_found, 1 partial, 1 unparsable"


def test_a_study_found_by_two_lines_is_reported_on_both_and_counted_once():
    """Line 3 (a patient ID) finds the study line 2 (its accession) found: retrieved once, and line 3's
    row said "pending" for a finished job before."""
    events = [
        _event("JOB_STARTED", input="[]"),
        _event("STUDY_FOUND", line=2, study_instance_uid="1.2.3", accession_number="A1", expected_instances=3),
        _event("LINE_FOUND", line=2, input="A1", pacs_status="0x0000"),
        _event("STUDY_FOUND", line=3, study_instance_uid="1.2.3", accession_number="A1", expected_instances=3),
        _event("LINE_FOUND", line=3, input="P1", pacs_status="0x0000"),
        _event("STUDY_COMPLETE", line=2, study_instance_uid="1.2.3", indexed_instances=3),
        _event("JOB_DONE", detail="{}"),
    ]
    job = JobState.fold("j", events)
    rows = report_rows(job)
    assert [(r["line"], r["outcome"], r["study_instance_uid"]) for r in rows] == [
        (2, "retrieved", "1.2.3"),
        (3, "retrieved", "1.2.3"),
    ]
    assert summary_line(job) == "job j (done): 1 retrieved"


# ---------------------------------------------------------------------------- the command line


class _Index:
    """The index's count of each study: ``have`` (uid -> count), else ``default``."""

    def __init__(self, default: int = 0, have: dict[str, int] | None = None) -> None:
        self.default, self.have, self.client = default, have or {}, None

    def count(self, uid: str) -> int:
        return self.have.get(uid, self.default)

    def wait_for(self, uid, target, timeout_s, stop) -> int:
        return self.count(uid)


def _collect_cli(
    tmp_path: Path, monkeypatch, pacs, index: _Index, argv: list[str], conf: str = "", events: list | None = None
) -> int:
    """`diana collect run ...` in this process: Kafka, OpenSearch and the PACS stood in for (``pacs``
    a class built as PacsClient is; ``events`` the job's record so far)."""
    import diana.clients as clients
    import diana.producers.pacs_pull.completeness as completeness
    import diana.producers.pacs_pull.ledger as ledger
    import diana.producers.pacs_pull.scu as scu
    import diana.schemas.topics as topics
    from diana.cli import main

    monkeypatch.setattr(clients, "kafka_admin", lambda *a: None)
    monkeypatch.setattr(clients, "opensearch_client", lambda *a: None)
    monkeypatch.setattr(topics, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(ledger, "load_events", lambda *a, **k: list(events or []))
    monkeypatch.setattr(ledger, "JobLedger", RecordingLedger)
    monkeypatch.setattr(scu, "PacsClient", pacs)
    # Our receiver answers (no C-ECHO to a port another job may use).
    monkeypatch.setattr(scu, "ReceiverProbe", lambda *a: type("Up", (), {"problem": lambda self: None})())
    monkeypatch.setattr(completeness, "IndexedCounter", lambda *a: index)
    config = tmp_path / "diana.toml"
    config.write_text("[collect]\nretries = 0\nverify_timeout_s = 0.05\npause_s = 0.05\n" + conf)
    return main(["--config", str(config), "collect", "run", *argv, "--no-progress"])


def _pacs(found: dict[str, list], moved: dict[str, tuple[int, int]]):
    """A PACS whose C-FIND answers ``found`` (accession -> matches) and whose C-MOVE of a study ends
    with ``moved[uid]`` (status, instances sent of 3)."""
    from diana.producers.pacs_pull.scu import MoveResult

    class Pacs:
        def __init__(self, *_args) -> None:
            self.move_destination, self.where = "DIANA", "PACS at test"

        def find_studies(self, keys):
            return found.get(keys.get("AccessionNumber", ""), [])

        def move_study(self, uid, stop=None, on_established=lambda: None):
            on_established()  # the PACS took the association
            status, sent = moved[uid]
            return MoveResult(status, sent, 3 - sent, 0)

    return Pacs


def test_collect_run_exits_3_when_something_did_not_come(tmp_path: Path, monkeypatch, capsys):
    """It exited 0 with studies failed: a script or scheduler could not tell. not_found is no failure."""
    from diana.producers.pacs_pull.scu import StudyMatch

    csv_file = tmp_path / "a.csv"
    csv_file.write_text("AccessionNumber\nA1\nA2\nA*\n")
    found = {"A1": [StudyMatch("1.1", "A1", 3)]}
    assert _collect_cli(tmp_path, monkeypatch, _pacs(found, {"1.1": (0xC000, 0)}), _Index(), [str(csv_file)]) == 3
    out, err = capsys.readouterr()
    assert "1 failed" in out and "1 not_found" in out
    assert "not everything came (1 failed, 1 unparsable)" in err and "diana collect status collect-" in err

    csv_file.write_text("AccessionNumber\nA1\nA2\n")  # A2: not found, which is an answer
    assert _collect_cli(tmp_path, monkeypatch, _pacs(found, {"1.1": (0, 3)}), _Index(3), [str(csv_file)]) == 0
    assert "not everything came" not in capsys.readouterr().err


def test_collect_run_exports_what_came_and_still_exits_3(tmp_path: Path, monkeypatch, capsys):
    import diana.cli.access as access
    from diana.producers.pacs_pull.scu import StudyMatch

    exported: list[list[str]] = []
    monkeypatch.setattr(access, "_cohort_export", lambda cfg, args, client, prefix, uids: exported.append(uids) or 0)
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("AccessionNumber\nA1\nA2\n")
    pacs = _pacs(
        {"A1": [StudyMatch("1.1", "A1", 3)], "A2": [StudyMatch("1.2", "A2", 3)]}, {"1.1": (0, 3), "1.2": (0xC000, 0)}
    )
    code = _collect_cli(
        tmp_path, monkeypatch, pacs, _Index(0, {"1.1": 3}), [str(csv_file), "--export", str(tmp_path / "o")]
    )
    assert code == 3 and exported == [["1.1"]]
    assert "not everything came (1 failed)" in capsys.readouterr().err


def test_collect_run_refuses_criteria_given_with_an_input_file(tmp_path: Path, capsys):
    """--date-from/--date-to/--modality with a file were dropped without a word: every study of each
    patient, of any date and modality, was pulled."""
    from diana.cli import main

    csv_file = tmp_path / "p.csv"
    csv_file.write_text("PatientID\nP1\n")
    for extra in (["--date-from", "2024-01-01", "--date-to", "2024-01-31"], ["--modality", "CT"]):
        with pytest.raises(SystemExit) as exited:
            main(["collect", "run", str(csv_file), *extra])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "without INPUT only" in err and "DateFrom, DateTo, Modality columns" in err
    from diana.cli import build_parser
    from diana.cli.collect import _requests

    with pytest.raises(RequestError, match="without INPUT only"):  # the command's own reading of its input
        _requests(build_parser().parse_args(["collect", "run", str(csv_file), "--modality", "CT"]))


def test_a_study_retrieved_again_after_it_failed_is_not_done_and_the_job_not_finished():
    events = [
        _event("JOB_STARTED", input="[]"),
        _event("STUDY_FOUND", line=2, study_instance_uid="1.2", expected_instances=3),
        _event("LINE_FOUND", line=2, input="A1", pacs_status="0x0000"),
        _event("LINE_FAILED", line=3, input="A2", pacs_status="0xC000"),
        _event("MOVE_STARTED", line=2, study_instance_uid="1.2", attempt=1),
        _event("MOVE_ENDED", line=2, study_instance_uid="1.2", pacs_status="0xC000", completed=0, failed=3),
        _event("STUDY_FAILED", line=2, study_instance_uid="1.2", indexed_instances=0),
        _event("JOB_DONE", detail="{}"),
    ]
    job = JobState.fold("j", events)
    assert job.finished and job.studies["1.2"].done
    job = JobState.fold(
        "j",
        events
        + [_event("JOB_STARTED", input="[]"), _event("MOVE_STARTED", line=2, study_instance_uid="1.2", attempt=2)],
    )
    study = job.studies["1.2"]
    assert not job.finished and not study.done and study.arriving and study.attempts == 2


def test_collect_run_retry_failed_tries_failed_studies_and_lines_again(tmp_path: Path, monkeypatch, capsys):
    """Failed, partial and find_failed were final: after fixing the cause, only a new --job name (a
    new job, every study looked up again) tried them again."""
    from diana.producers.pacs_pull.job import criteria_of
    from diana.producers.pacs_pull.scu import StudyMatch

    csv_file = tmp_path / "a.csv"
    csv_file.write_text("AccessionNumber\nA1\nA2\nA3\n")
    earlier = [
        _event("JOB_STARTED", input=criteria_of(parse_csv(csv_file))),
        _event("STUDY_FOUND", line=2, study_instance_uid="1.1", expected_instances=3),
        _event("LINE_FOUND", line=2, input="A1", pacs_status="0x0000"),
        _event("STUDY_FOUND", line=3, study_instance_uid="1.2", expected_instances=3),
        _event("LINE_FOUND", line=3, input="A2", pacs_status="0x0000"),
        _event("LINE_FAILED", line=4, input="A3", pacs_status="0xA700", detail="C-FIND failed"),
        _event("MOVE_STARTED", line=2, study_instance_uid="1.1", attempt=1),
        _event("MOVE_ENDED", line=2, study_instance_uid="1.1", pacs_status="0xC000", completed=0, failed=3),
        _event("STUDY_FAILED", line=2, study_instance_uid="1.1", indexed_instances=0),
        _event("MOVE_STARTED", line=3, study_instance_uid="1.2", attempt=1),
        _event("MOVE_ENDED", line=3, study_instance_uid="1.2", pacs_status="0xB000", completed=2, failed=1),
        _event("STUDY_PARTIAL", line=3, study_instance_uid="1.2", indexed_instances=2),
        _event("JOB_DONE", detail="{}"),
    ]
    found = {"A1": [StudyMatch("1.1", "A1", 3)], "A2": [StudyMatch("1.2", "A2", 3)], "A3": [StudyMatch("1.3", "A3", 3)]}
    moves = {"1.1": (0, 3), "1.2": (0, 3), "1.3": (0, 3)}
    index = _Index(3, {"1.1": 0, "1.2": 2, "1.3": 0})
    # without the flag: final, nothing asked of the PACS
    assert _collect_cli(tmp_path, monkeypatch, _pacs({}, {}), index, [str(csv_file)], events=earlier) == 3
    out, err = capsys.readouterr()
    assert "1 failed, 1 find_failed, 1 partial" in out and "--retry-failed tries them again" in err

    class Arrives(_Index):
        def wait_for(self, uid, target, timeout_s, stop):
            return 3

    code = _collect_cli(
        tmp_path,
        monkeypatch,
        _pacs(found, moves),
        Arrives(0, {"1.2": 2}),
        [str(csv_file), "--retry-failed"],
        events=earlier,
    )
    out = capsys.readouterr().out
    assert code == 0 and "(done): 3 retrieved" in out, out


def test_the_report_files_are_readable_by_their_owner_only(tmp_path: Path, monkeypatch):
    """The report lists accession numbers: before, `--report FILE` (of `collect run` and of `collect
    status`) was opened with open(..., "w"), 0644 with the usual umask, also over an older 0644 file."""
    import stat

    from diana.cli import main
    from diana.producers.pacs_pull import ledger
    from diana.producers.pacs_pull.scu import StudyMatch

    with umask(0o022):
        csv_file = tmp_path / "a.csv"
        csv_file.write_text("AccessionNumber\nA1\n")
        run_report = tmp_path / "run.csv"
        found = {"A1": [StudyMatch("1.1", "A1", 3)]}
        _collect_cli(
            tmp_path,
            monkeypatch,
            _pacs(found, {"1.1": (0, 3)}),
            _Index(3),
            [str(csv_file), "--report", str(run_report)],
        )
        assert "A1" in run_report.read_text()
        assert stat.S_IMODE(run_report.stat().st_mode) == 0o600
        status_report = tmp_path / "status.csv"
        status_report.write_text("an older report\n")
        status_report.chmod(0o644)
        monkeypatch.setattr(ledger, "load_events", lambda *a, **k: [_event("JOB_STARTED", input="[]")])
        assert (
            main(["--config", str(tmp_path / "diana.toml"), "collect", "status", "j", "--report", str(status_report)])
            == 0
        )
        assert stat.S_IMODE(status_report.stat().st_mode) == 0o600
        assert status_report.read_text().startswith("line,input,outcome")


def test_a_hand_made_csv_keeps_a_value_starting_with_a_quote(tmp_path: Path):
    """Only `cohort find`'s own CSV has its formula quotes taken off: a hand-made list is read as written."""
    path = tmp_path / "a.csv"
    path.write_text("AccessionNumber,PatientID\n'-17,''P1\n")
    [request] = parse_csv(path)
    assert (request.accession_number, request.patient_id) == ("'-17", "''P1")


def test_report_cells_a_spreadsheet_would_run_are_quoted():
    events = [
        _event("JOB_STARTED", input="[]"),
        _event("LINE_UNPARSABLE", line=2, input="=HYPERLINK(1)", detail="-bad"),
        _event("STUDY_FOUND", line=3, study_instance_uid="1.2", accession_number="@A3", expected_instances=1),
        _event("LINE_FOUND", line=3, input="+A3", pacs_status="0x0000"),
    ]
    out = io.StringIO()
    write_report(JobState.fold("j", events), out)
    import csv

    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["line"], r["input"], r["detail"]) for r in rows][0] == ("2", "'=HYPERLINK(1)", "'-bad")
    assert (rows[1]["input"], rows[1]["accession_number"]) == ("'+A3", "'@A3")
