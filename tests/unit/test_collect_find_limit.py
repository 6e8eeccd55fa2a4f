"""A collect job against a PACS that cuts its C-FIND answers at a limit of matches, or gives no instance
count: a real pynetdicom PACS in this process matching StudyDate and StudyTime ranges as dcmqrscp and
Orthanc do, the job's record and the index's count kept in memory.

Before: a PACS answering its first N matches then Success had the line "found" with N studies (the
rest never asked for, nothing said); one without NumberOfStudyRelatedInstances had a study diana-star
already held retrieved again."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date

import pytest
from pydicom.dataset import Dataset

from diana.config import CollectConfig
from diana.producers.pacs_pull.job import CollectJob
from diana.producers.pacs_pull.ledger import JobState
from diana.producers.pacs_pull.narrowing import split_keys
from diana.producers.pacs_pull.report import report_rows
from diana.producers.pacs_pull.requests import CollectRequest
from diana.producers.pacs_pull.scu import PacsClient, StudyMatch
from tests.support.collect_fakes import serving_pacs


# ---------------------------------------------------------------------------------- the split itself
def test_a_date_range_is_halved_down_to_one_day_and_a_day_is_not_split_by_time():
    keys = {"StudyDate": "20240101-20240131", "ModalitiesInStudy": "CT"}
    assert split_keys(keys) == [
        {"StudyDate": "20240101-20240116", "ModalitiesInStudy": "CT"},
        {"StudyDate": "20240117-20240131", "ModalitiesInStudy": "CT"},
    ]
    # halved again and again, the parts cover the month with neither gap nor overlap, down to single days
    parts = [keys]
    while nxt := [p for k in parts if (sub := split_keys(k)) for p in sub]:
        parts = nxt + [k for k in parts if split_keys(k) is None]
    days = sorted(p["StudyDate"] for p in parts)
    assert days == [f"202401{d:02d}-202401{d:02d}" for d in range(1, 32)]
    # StudyTime is Type 2: a study without one matches no time range, so a day is never asked in parts
    assert split_keys({"PatientID": "P1", "StudyDate": "20240301-20240301"}) is None
    assert split_keys({"StudyDate": "20240301"}) is None


def test_an_open_range_keeps_its_open_end_and_a_line_without_dates_is_not_split():
    today = date(2026, 12, 1)
    assert [p["StudyDate"] for p in split_keys({"StudyDate": "20261101-"}, today)] == [
        "20261101-20261201",
        "20261202-",
    ]
    assert split_keys({"StudyDate": "20261202-"}, today) is None  # after today: asked as it is
    assert [p["StudyDate"] for p in split_keys({"StudyDate": "-20240131"}, today)] == [
        "-18991231",
        "19000101-20240131",
    ]
    assert split_keys({"StudyDate": "-18991231"}, today) is None
    assert split_keys({"AccessionNumber": "A1"}) is None
    assert split_keys({"PatientID": "P1"}) is None
    assert split_keys({"StudyInstanceUID": "1.2.3", "StudyDate": "20240101-20240131"}) is None


# ------------------------------------------------------------------------ a PACS with a limit
@dataclass
class _Study:
    uid: str
    date: str
    time: str | None  # None: the study has no StudyTime
    accession: str = "A1"
    instances: int = 2


def _in_range(value: str | None, asked: str) -> bool:
    """DICOM range matching of a DA or TM value as dcmqrscp does it (a value absent never matches)."""
    if not asked:
        return True
    if value is None:
        return False
    if "-" not in asked:
        return value == asked
    low, _, high = asked.partition("-")
    as_number = float if "." in value + asked or len(value) == 6 else int
    v = as_number(value)
    return (not low or v >= as_number(low)) and (not high or v <= as_number(high))


@contextmanager
def _limited_pacs(
    studies: list[_Study], limit: int, end_cut: int = 0x0000, image_level: bool = True, image_limit: int = 0
) -> Iterator[tuple[int, list[str], list[Dataset]]]:
    """A PACS answering at most ``limit`` matches to a STUDY-level C-FIND, then ``end_cut`` (0x0000: a
    silent cap; 0xFE00: Orthanc at its LimitFindResults); an IMAGE-level C-FIND (``image_level``) with
    one answer per instance, needing a SeriesInstanceUID key as dcmqrscp does, its first ``image_limit``
    (0: all) then Success; no instance count."""
    moved: list[str] = []
    queries: list[Dataset] = []

    def find(event):
        ask = event.identifier
        queries.append(ask)
        if ask.QueryRetrieveLevel == "IMAGE":
            if not image_level or "SeriesInstanceUID" not in ask:
                yield 0xC000, None
                return
            for s in studies:
                if s.uid == ask.StudyInstanceUID:
                    for n in range(min(s.instances, image_limit or s.instances)):
                        ds = Dataset()
                        ds.QueryRetrieveLevel = "IMAGE"
                        ds.StudyInstanceUID, ds.SeriesInstanceUID = s.uid, s.uid + ".1"
                        ds.SOPInstanceUID = f"{s.uid}.1.{n + 1}"
                        yield 0xFF00, ds
            yield 0x0000, None
            return
        matching = [
            s
            for s in studies
            if _in_range(s.date, str(ask.get("StudyDate", "") or ""))
            and _in_range(s.time, str(ask.get("StudyTime", "") or ""))
            and (not ask.get("AccessionNumber") or ask.AccessionNumber == s.accession)
        ]
        for s in matching[:limit]:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID, ds.AccessionNumber, ds.StudyDate = s.uid, s.accession, s.date
            if s.time is not None:
                ds.StudyTime = s.time
            yield 0xFF00, ds
        yield (end_cut if len(matching) > limit else 0x0000), None

    def move(event):
        moved.append(str(event.identifier.StudyInstanceUID))
        yield "127.0.0.1", 1
        yield 0  # success, nothing sent (the index stand-in says what arrived)

    with serving_pacs(find, move) as port:
        yield port, moved, queries


class _Ledger:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def record(self, event: str, **fields) -> dict:
        from datetime import UTC, datetime

        value = {"job_id": "j", "at": datetime.now(UTC), "event": event, **fields}
        self.events.append(value)
        return value


class _Index:
    """Every study moved is indexed whole (2 instances); ``held`` ones are before the job."""

    def __init__(self, held: set[str] | None = None) -> None:
        self.held = held or set()

    def count(self, uid: str) -> int:
        return 2 if uid in self.held else 0

    def wait_for(self, uid: str, target: int, timeout_s: float, stop: threading.Event) -> int:
        return 2


def _run(port: int, request: CollectRequest, index: _Index | None = None, **settings) -> tuple[JobState, _Ledger]:
    config = CollectConfig(
        pacs_host="127.0.0.1", pacs_port=port, retries=0, verify_timeout_s=0.1, pause_s=0.1, timeout_s=5, **settings
    )
    ledger = _Ledger()
    job = CollectJob(
        config, JobState("j"), [request], ledger, PacsClient(config, "DIANA"), index or _Index(), notify=lambda _t: None
    )
    return job.run(), ledger


_MONTH = CollectRequest(2, "march", date_from="20240301", date_to="20240331")


def _corpus() -> list[_Study]:
    """7 studies of March 2024, at most 2 a day: under a limit of 3 (find_limit = 3 takes 3 answers as cut)."""
    days = ("20240301", "20240305", "20240312", "20240312", "20240315", "20240320", "20240331")
    return [_Study(f"1.2.826.0.1.9.{n}", d, f"{8 + n:02d}0000") for n, d in enumerate(days, start=1)]


@pytest.mark.parametrize("end_cut", [0x0000, 0xFE00])
def test_a_line_at_the_pacs_limit_is_asked_in_parts_and_every_study_retrieved_once(end_cut):
    """A silent cap (find_limit said) or Orthanc's 0xFE00 after its first matches (no find_limit)."""
    studies = _corpus()
    with _limited_pacs(studies, limit=3, end_cut=end_cut) as (port, moved, queries):
        state, ledger = _run(port, _MONTH, find_limit=3 if end_cut == 0 else 0)
    assert sorted(moved) == sorted(s.uid for s in studies)  # each once
    assert {u: s.state for u, s in state.studies.items()} == {s.uid: "STUDY_COMPLETE" for s in studies}
    line = state.lines[2]
    assert line.state == "LINE_FOUND" and line.detail.startswith("7 studies by "), line.detail
    assert "the PACS's limit of matches reached" in line.detail
    # asked by dates only, each study recorded once
    assert not any("StudyTime" in q for q in queries)
    found = [e["study_instance_uid"] for e in ledger.events if e["event"] == "STUDY_FOUND"]
    assert sorted(found) == sorted(s.uid for s in studies)
    rows = report_rows(state)
    assert [r["outcome"] for r in rows] == ["retrieved"] * 7 and {r["line"] for r in rows} == {2}


def test_a_line_at_the_limit_that_cannot_be_split_is_find_failed_and_says_so():
    studies = [_Study(f"1.2.826.0.1.8.{n}", "20240312", "080000") for n in range(3)]
    by_accession = CollectRequest(3, "A1", accession_number="A1")
    with _limited_pacs(studies, limit=3) as (port, moved, _q):
        state, ledger = _run(port, by_accession, find_limit=3)
    line = state.lines[3]
    assert (line.state, state.studies, moved) == ("LINE_FAILED", {}, [])
    assert "limit of matches was reached (3 matches, [collect] find_limit = 3)" in line.detail, line.detail
    assert "no study date to split it by: give it DateFrom and DateTo" in line.detail
    # the PACS said Success: no PACS status to show (it was 0x0000 beside "find_failed")
    assert [(r["outcome"], r["pacs_status"]) for r in report_rows(state)] == [("find_failed", "")]
    assert line.pacs_status == "" and "STUDY_FOUND" not in [e["event"] for e in ledger.events]


def test_a_day_still_at_the_limit_is_find_failed_not_split_by_time():
    """Three studies of one day, a limit of 2: the day is not asked in parts."""
    studies = [_Study(f"1.2.826.0.1.7.{n}", "20240312", f"0{n}0000") for n in range(1, 4)]
    with _limited_pacs(studies, limit=2, end_cut=0xFE00) as (port, moved, queries):
        state, _ = _run(port, _MONTH)
    line = state.lines[2]
    assert (line.state, line.pacs_status, moved) == ("LINE_FAILED", "0xFE00", []), line.detail
    assert line.detail.startswith("the PACS's limit of matches was reached: C-FIND failed with 0xFE00; 2 matches")
    assert "still so for StudyDate 20240312-20240312, one day: studies without a StudyTime could not be" in line.detail
    assert "narrow the line otherwise (one modality)" in line.detail
    assert not any("StudyTime" in q for q in queries) and len(queries) <= 12  # log2(31) halvings along one path


@pytest.mark.parametrize("end_cut", [0x0000, 0xFE00])
def test_a_study_without_a_study_time_is_never_lost_when_a_day_is_at_the_limit(end_cut):
    """A day of 3 timed studies and one without a StudyTime (Type 2), listed last so that the cut answer
    does not show it: the day asked by StudyTime ranges found the 3 and had the line found, the fourth
    lost without a word. Now the line fails and says why."""
    studies = [_Study(f"1.2.826.0.1.4.{n}", "20240312", f"0{n}0000") for n in range(1, 4)]
    studies.append(_Study("1.2.826.0.1.4.9", "20240312", None))
    day = CollectRequest(2, "day", date_from="20240312", date_to="20240312")
    with _limited_pacs(studies, limit=2, end_cut=end_cut) as (port, moved, _q):
        state, ledger = _run(port, day, find_limit=2 if end_cut == 0 else 0)
    line = state.lines[2]
    assert (line.state, moved, state.studies) == ("LINE_FAILED", [], {}), line.detail
    assert "studies without a StudyTime could not be listed" in line.detail
    assert "STUDY_FOUND" not in [e["event"] for e in ledger.events]


def test_under_the_limit_one_c_find_as_before():
    studies = _corpus()
    with _limited_pacs(studies, limit=100) as (port, moved, queries):
        state, _ = _run(port, _MONTH, find_limit=100)
    assert len([q for q in queries if q.QueryRetrieveLevel == "STUDY"]) == 1
    assert state.lines[2].detail == "7 studies" and len(moved) == 7


# ------------------------------------------------------------------------ no instance count
def test_a_study_without_a_count_already_held_is_counted_by_image_level_and_not_retrieved():
    study = _Study("1.2.826.0.1.5.1", "20240312", "080000")
    request = CollectRequest(2, "A1", accession_number="A1")
    with _limited_pacs([study], limit=100) as (port, moved, queries):
        state, _ = _run(port, request, _Index(held={study.uid}))
    got = state.studies[study.uid]
    assert (got.state, got.expected_instances, got.attempts, moved) == ("STUDY_SKIPPED", 2, 0, [])
    image = [q for q in queries if q.QueryRetrieveLevel == "IMAGE"]
    assert len(image) == 1 and image[0].StudyInstanceUID == study.uid and image[0].SeriesInstanceUID == ""
    assert report_rows(state)[0]["outcome"] == "already_present"


def test_an_instance_count_cut_silently_at_find_limit_is_no_count():
    """A study of 10 instances, diana-star holding 4 of them, a PACS answering its first 4 then Success:
    the count was 4 and the study skipped as already present with 6 instances missing."""
    study = _Study("1.2.826.0.1.5.3", "20240312", "080000", instances=10)

    class HoldsFour(_Index):
        def count(self, uid: str) -> int:
            return 4

    request = CollectRequest(2, "A1", accession_number="A1")
    with _limited_pacs([study], limit=100, image_limit=4) as (port, moved, _q):
        state, _ = _run(port, request, HoldsFour(), find_limit=4)
    got = state.studies[study.uid]
    # no count: retrieved (the stand-in PACS sends nothing, so not complete), not skipped
    assert (moved, got.attempts, got.expected_instances) == ([study.uid], 1, None), got.detail
    assert got.state != "STUDY_SKIPPED"
    # under the limit, the count stands
    with _limited_pacs([study], limit=100) as (port, moved, _q):
        state, _ = _run(port, request, HoldsFour(), find_limit=11)
    assert (state.studies[study.uid].expected_instances, moved) == (10, [study.uid])


def test_the_count_turned_off_or_failing_retrieves_as_before():
    study = _Study("1.2.826.0.1.5.2", "20240312", "080000")
    request = CollectRequest(2, "A1", accession_number="A1")
    with _limited_pacs([study], limit=100) as (port, moved, queries):
        state, _ = _run(port, request, _Index(held={study.uid}), count_instances=False)
    assert moved == [study.uid] and not [q for q in queries if q.QueryRetrieveLevel == "IMAGE"]
    with _limited_pacs([study], limit=100, image_level=False) as (port, moved, _q):
        state, _ = _run(port, request, _Index(held={study.uid}))
    got = state.studies[study.uid]
    assert moved == [study.uid] and (got.attempts, got.expected_instances) == (1, None)


def test_find_limit_is_read_and_checked(tmp_path):
    from diana.config import ConfigError, load_config

    path = tmp_path / "diana.toml"
    path.write_text("[collect]\nfind_limit = 1000\ncount_instances = false\n")
    collect = load_config(path, environ={}).collect
    assert (collect.find_limit, collect.count_instances) == (1000, False)
    assert load_config(path, environ={"DIANA_COLLECT_FIND_LIMIT": "500"}).collect.find_limit == 500
    path.write_text("[collect]\nfind_limit = -1\n")
    with pytest.raises(ConfigError, match="find_limit = -1: use 0 or more"):
        load_config(path, environ={})


@contextmanager
def _slow_image_pacs(every_s: float, answers: int) -> Iterator[int]:
    """A PACS answering a study's IMAGE-level C-FIND one instance every ``every_s`` seconds."""
    uid = "1.2.826.0.1.5.9"

    def find(event):
        ask = event.identifier
        if ask.QueryRetrieveLevel == "IMAGE":
            for n in range(answers):
                time.sleep(every_s)
                ds = Dataset()
                ds.QueryRetrieveLevel = "IMAGE"
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, uid + ".1", f"{uid}.1.{n + 1}"
                yield 0xFF00, ds
            yield 0x0000, None
            return
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID, ds.AccessionNumber = uid, "A1"
        yield 0xFF00, ds
        yield 0x0000, None

    def move(event):
        yield "127.0.0.1", 1
        yield 0

    with serving_pacs(find, move) as port:
        yield port


def test_a_stop_during_the_instance_count_ends_the_job_at_once():
    """The count took no stop: Ctrl-C waited for it up to timeout_s (twice that, as its deadline was
    only looked at when an answer came)."""
    with _slow_image_pacs(every_s=0.25, answers=80) as port:
        config = CollectConfig(pacs_host="127.0.0.1", pacs_port=port, retries=0, pause_s=0.1, timeout_s=10)
        stop = threading.Event()
        ledger = _Ledger()
        job = CollectJob(
            config,
            JobState("j"),
            [CollectRequest(2, "A1", accession_number="A1")],
            ledger,
            PacsClient(config, "DIANA"),
            _Index(),
            notify=lambda _t: None,
            stop=stop,
        )
        runner = threading.Thread(target=job.run)
        runner.start()
        time.sleep(1.0)
        stopped = time.monotonic()
        stop.set()
        runner.join(15)
        took = time.monotonic() - stopped
    assert not runner.is_alive() and took < 2.0, took
    assert "MOVE_STARTED" not in [e["event"] for e in ledger.events]


def test_the_instance_count_ends_at_its_deadline_however_slowly_the_pacs_answers():
    """Each answer within timeout_s, the whole longer: aborted at timeout_s, not at the next answer."""
    with _slow_image_pacs(every_s=1.5, answers=5) as port:
        config = CollectConfig(pacs_host="127.0.0.1", pacs_port=port, timeout_s=2)
        started = time.monotonic()
        count = PacsClient(config, "DIANA").count_instances("1.2.826.0.1.5.9")
        took = time.monotonic() - started
    assert count is None and took < 2.8, took


def test_a_pacs_refusing_the_count_is_said_once_at_info_without_uids():
    """Said for each study before, or not at all: now once per job, with what it means."""
    from structlog.testing import capture_logs

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    client = PacsClient(CollectConfig(pacs_host="127.0.0.1", pacs_port=free, timeout_s=2), "DIANA")
    with capture_logs() as logs:
        assert client.count_instances("1.2.826.0.1.5.7") is None
        assert client.count_instances("1.2.826.0.1.5.8") is None
    said = [e for e in logs if e["event"].startswith("collect.instance_count")]
    assert [(e["event"], e["log_level"]) for e in said] == [("collect.instance_count_unavailable", "info")], said
    assert "1.2.826.0.1.5" not in repr(said) and "retrieved even when already held" in said[0]["effect"]


# ------------------------------------------------------------------- a part that fails on its own
class _ScriptedFinds:
    """A PACS stand-in whose C-FIND for a month is cut and whose halves answer a study each; the
    second half first answers as ``trouble`` says (an exception, ``times`` times)."""

    where, move_destination = "PACS at test", "DIANA"

    def __init__(self, trouble: Exception, times: int) -> None:
        self.trouble, self.times = trouble, times
        self.asked: list[str] = []

    def find_studies(self, keys: dict[str, str]) -> list[StudyMatch]:
        from diana.producers.pacs_pull.scu import FindLimitReached

        dates = keys["StudyDate"]
        self.asked.append(dates)
        if dates == "20240301-20240331":
            raise FindLimitReached(0xFE00, "cut", 1, [StudyMatch("1.2.826.0.1.3.1", "A1", 2)])
        if dates == "20240317-20240331" and self.times:
            self.times -= 1
            raise self.trouble
        return [StudyMatch("1.2.826.0.1.3.1" if dates < "20240317" else "1.2.826.0.1.3.2", "A1", 2)]

    def count_instances(self, uid: str, stop: threading.Event | None = None) -> int | None:
        return None

    def move_study(self, uid, stop=None, on_established=lambda: None):
        from diana.producers.pacs_pull.scu import MoveResult

        on_established()
        return MoveResult(0, 2, 0, 0)


def _scripted_run(pacs: _ScriptedFinds) -> tuple[JobState, _Ledger]:
    ledger = _Ledger()
    config = CollectConfig(retries=2, backoff_s=0.01, verify_timeout_s=0.1, pause_s=0.01)
    job = CollectJob(config, JobState("j"), [_MONTH], ledger, pacs, _Index(), notify=lambda _t: None)  # type: ignore[arg-type]
    return job.run(), ledger


def test_a_part_the_pacs_did_not_answer_is_asked_again_alone():
    """A PACS that did not answer one part had the whole line asked again from its first C-FIND."""
    from diana.producers.pacs_pull.scu import PacsUnavailable

    pacs = _ScriptedFinds(PacsUnavailable("PACS at test does not answer"), times=2)
    state, ledger = _scripted_run(pacs)
    assert pacs.asked == ["20240301-20240331", "20240301-20240316"] + ["20240317-20240331"] * 3
    assert state.lines[2].state == "LINE_FOUND" and len(state.studies) == 2
    assert [e["event"] for e in ledger.events].count("JOB_PAUSED") == 2


def test_a_part_answered_out_of_resources_is_asked_again_then_fails_the_line_naming_it():
    """0xA700 with no match for one part failed the line at once."""
    from diana.producers.pacs_pull.scu import FindFailed

    pacs = _ScriptedFinds(FindFailed(0xA700, "C-FIND failed with 0xA700"), times=1)
    state, _ = _scripted_run(pacs)
    assert state.lines[2].state == "LINE_FOUND" and len(state.studies) == 2
    # always busy: at most `retries` (2) pauses, then the line fails saying which part
    pacs = _ScriptedFinds(FindFailed(0xA700, "C-FIND failed with 0xA700"), times=99)
    state, _ = _scripted_run(pacs)
    line = state.lines[2]
    assert pacs.asked.count("20240317-20240331") == 3 and (line.state, line.pacs_status) == ("LINE_FAILED", "0xA700")
    assert line.detail.startswith("asking StudyDate 20240317-20240331, a part of the line"), line.detail
    assert state.studies == {}
