"""Stand-ins for a collect job's PACS, ledger and index in unit tests: a PACS in this process
(pynetdicom on a free port of 127.0.0.1) answering as each test scripts it, a ledger that keeps the
events' names, an index that holds nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from diana.config import CollectConfig
from diana.producers.pacs_pull.job import CollectJob
from diana.producers.pacs_pull.ledger import JobState
from diana.producers.pacs_pull.requests import CollectRequest
from diana.producers.pacs_pull.scu import StudyMatch


@contextmanager
def serving_pacs(find: Callable, move: Callable, contexts: tuple = (FIND, MOVE)) -> Iterator[int]:
    """A PACS (AE title PACS) whose C-FIND and C-MOVE are the handlers ``find`` and ``move``; its port."""
    ae = AE("PACS")
    for context in contexts:
        ae.add_supported_context(context)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, find), (evt.EVT_C_MOVE, move)]
    )
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


class RecordingLedger:
    """The job ledger: ``events`` are the names recorded, in order."""

    def __init__(self, *_args) -> None:
        self.events: list[str] = []

    def record(self, event: str, **fields) -> dict:
        self.events.append(event)
        return {"job_id": "j", "at": datetime.now(UTC), "event": event, **fields}


class NothingIndexed:
    """The index: no instance of any study, ever."""

    def count(self, uid: str) -> int:
        return 0

    def wait_for(self, uid: str, target: int, timeout_s: float, stop: threading.Event) -> int:
        return 0


class OneStudyPacs:
    """A scripted PACS whose C-FIND finds one study, 1.1 (accession A1, 3 instances); each test writes
    its ``move_study``."""

    where = "PACS at test"
    move_destination = "DIANA"

    def find_studies(self, keys):
        return [StudyMatch("1.1", "A1", 3)]


def one_line_job(settings: CollectConfig, ledger: Any, pacs: Any, counter: Any, **options: Any) -> CollectJob:
    """A collect job of one request line (line 2: accession number A1) with those stand-ins, saying nothing
    on the terminal; ``options``: CollectJob's (``job``, the state folded so far, else a new job "j")."""
    job = options.pop("job", None) or JobState("j")
    return CollectJob(
        settings,
        job,
        [CollectRequest(2, "A1", accession_number="A1")],
        ledger,
        pacs,
        counter,
        notify=lambda _t: None,
        **options,
    )
