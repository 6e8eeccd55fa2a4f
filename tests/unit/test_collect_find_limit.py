"""A collect job against a PACS that cuts its C-FIND answers at a limit of matches, or gives no instance
count: a real pynetdicom PACS in this process matching StudyDate and StudyTime ranges as dcmqrscp and
Orthanc do, the job's record and the index's count kept in memory.

Before: a PACS answering its first N matches then Success had the line "found" with N studies (the
rest never asked for, nothing said); one without NumberOfStudyRelatedInstances had a study diana-star
already held retrieved again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from diana.config import CollectConfig
from diana.producers.pacs_pull.job import CollectJob
from diana.producers.pacs_pull.ledger import JobState
from diana.producers.pacs_pull.report import report_rows
from diana.producers.pacs_pull.requests import CollectRequest
from diana.producers.pacs_pull.scu import PacsClient


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
    studies: list[_Study], limit: int, end_cut: int = 0x0000, image_level: bool = True
) -> Iterator[tuple[int, list[str], list[Dataset]]]:
    """A PACS answering at most ``limit`` matches to a STUDY-level C-FIND, then ``end_cut`` (0x0000: a
    silent cap; 0xFE00: Orthanc at its LimitFindResults); an IMAGE-level C-FIND (``image_level``) with
    one answer per instance, needing a SeriesInstanceUID key as dcmqrscp does; no instance count."""
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
                    for n in range(s.instances):
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

    ae = AE("PACS")
    ae.add_supported_context(FIND)
    ae.add_supported_context(MOVE)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, find), (evt.EVT_C_MOVE, move)]
    )
    try:
        yield server.server_address[1], moved, queries
    finally:
        server.shutdown()


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
