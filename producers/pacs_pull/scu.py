"""The PACS as seen by a collect job: C-FIND at study level (Study Root), C-MOVE of one study.

Each call opens its own association (a retrieve may run for minutes; concurrent retrieves each need
their own), so the number of retrieves running is the number of associations the PACS sees.
A PACS that cannot be reached or refuses the association raises ``PacsUnavailable``: the job pauses
on it instead of marking studies failed. One that cannot serve a collect job as configured (no Study
Root C-FIND or C-MOVE; our move destination unknown) raises ``PacsSetupError``: the job stops.
``ReceiverProbe`` C-ECHOes our own receiver before retrieves sent to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from diana.config import CollectConfig, ReceiverConfig
from diana.outbound_association import outbound_association_handlers

__all__ = [
    "PacsClient",
    "PacsUnavailable",
    "MoveAborted",
    "PacsSetupError",
    "MoveDestinationUnknown",
    "MOVE_DESTINATION_UNKNOWN",
    "FindFailed",
    "FindLimitReached",
    "StudyMatch",
    "MoveResult",
    "ReceiverProbe",
    "status_text",
]

log = structlog.get_logger("diana.collect")

_PENDING = (0xFF00, 0xFF01)


class PacsUnavailable(RuntimeError):
    """The PACS did not answer, refused the association, or dropped it: worth waiting for, not a study's fault."""


class MoveAborted(PacsUnavailable):
    """The PACS dropped the association in the middle of a study's C-MOVE: the association was made,
    so the PACS is there; counted against the study's retries (a PACS that aborts on one study would
    otherwise be asked for it for ever)."""


class PacsSetupError(RuntimeError):
    """The PACS cannot serve a collect job as it is configured (it does not accept Study Root C-FIND
    or C-MOVE): no study's fault, and waiting does not help, so the job stops and says what to fix."""


# C-MOVE: Refused, Move Destination unknown (PS3.4 C.4.2.1.5); some PACS answer so too when they
# cannot connect to the destination's host and port.
MOVE_DESTINATION_UNKNOWN = 0xA801


class MoveDestinationUnknown(PacsSetupError):
    """The PACS answered a C-MOVE with 0xA801: it does not know our move destination (or cannot reach
    it). Every study would fail the same way: a setup to fix, not a study's failure."""

    def __init__(self, destination: str, where: str):
        super().__init__(f"PACS {where} does not know the move destination {destination!r} (C-MOVE status 0xA801)")
        self.destination = destination
        self.where = where


class FindFailed(RuntimeError):
    """The PACS answered a C-FIND with a failure status (kept in ``status``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class FindLimitReached(FindFailed):
    """The PACS's answer to a C-FIND may be cut at its limit of matches: as many matches as
    ``[collect] find_limit`` (then Success: a PACS that caps silently), or some matches and then
    0xFE00 (Orthanc at its ``LimitFindResults``) or 0xA7xx. ``matches`` are those that came."""

    def __init__(self, status: int, message: str, answers: int, matches: list[StudyMatch]):
        super().__init__(status, message)
        self.answers = answers
        self.matches = matches


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    accession_number: str
    expected_instances: int | None  # NumberOfStudyRelatedInstances, when the PACS says


@dataclass(frozen=True)
class MoveResult:
    status: int
    completed: int
    failed: int
    warning: int

    @property
    def success(self) -> bool:
        return self.status == 0x0000 and self.failed == 0


def status_text(status: int) -> str:
    return f"0x{status:04X}"


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _count(value: object) -> int | None:
    """NumberOfStudyRelatedInstances as a count to wait for: 0 or less says nothing (a PACS that does
    not keep it; a study of no instances is nothing to retrieve), and once read as "all of 0 are
    here" it marked studies retrieved, or already present, with nothing received."""
    count = _int(value)
    return count if count is not None and count > 0 else None


def _contradiction(keys: dict[str, str], answer: Dataset) -> str | None:
    """The matching key ``answer`` contradicts (a PACS that ignores a key answers studies not asked
    for: another patient's, or the whole archive's); None when it matches or the PACS left it out."""
    for name in ("StudyInstanceUID", "AccessionNumber", "PatientID"):
        asked, got = keys.get(name, ""), str(answer.get(name, "") or "").strip()
        if asked and not any(c in asked for c in "*?") and got and got != asked.strip():
            return name
    dates, got = keys.get("StudyDate", ""), str(answer.get("StudyDate", "") or "").strip()
    if dates and len(got) == 8 and got.isdigit():
        low, _, high = dates.partition("-")
        if (low and got < low) or (high and got > high):
            return "StudyDate"
    modalities = {m for m in keys.get("ModalitiesInStudy", "").split("\\") if m}
    raw = answer.get("ModalitiesInStudy") or []
    got_modalities = {str(m).strip() for m in ([raw] if isinstance(raw, str) else raw)} - {""}
    if modalities and got_modalities and not modalities & got_modalities:
        return "ModalitiesInStudy"
    return None


def _find_failure(code: int, comment: str, answers: int) -> str:
    """A C-FIND's failure status as a line of the report. Matches that came before it are not
    retrieved (the list is incomplete, and a partial list retrieved silently looks whole), but they
    are counted: a PACS out of resources (0xA700) or cancelling (0xFE00) at its own limit of matches
    answers a narrower query."""
    text = f"C-FIND failed with {status_text(code)}" + (f": {comment}" if comment else "")
    if answers:
        text += f"; {answers} matches came before it (an incomplete answer: none retrieved)"
    if answers or code >> 8 == 0xA7 or code == 0xFE00:
        text += "; narrow the line's query (a shorter date range, one modality)"
    return text


@contextmanager
def _aborted_on(stop: threading.Event | None, assoc: Association, deadline: float | None = None) -> Iterator[list[str]]:
    """Abort ``assoc`` as soon as ``stop`` is set or ``deadline`` (``time.monotonic()``) has passed,
    while the block runs; the list yielded then names why ("stop" or "deadline")."""
    why: list[str] = []
    if stop is None and deadline is None:
        yield why
        return
    done = threading.Event()

    def next_look() -> float:
        return 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))

    def watch() -> None:
        while not done.wait(next_look()):
            if stop is not None and stop.is_set():
                why.append("stop")
            elif deadline is not None and time.monotonic() >= deadline:
                why.append("deadline")
            else:
                continue
            assoc.abort()
            # A local abort does not wake a thread waiting for the next answer (pynetdicom queues
            # this end-of-messages item for a peer's abort only): queued here, so it returns now.
            assoc.dimse.msg_queue.put((None, None))
            return

    watcher = threading.Thread(target=watch, name="collect-stop-watch", daemon=True)
    watcher.start()
    try:
        yield why
    finally:
        done.set()
        watcher.join()


class PacsClient:
    def __init__(self, settings: CollectConfig, move_destination: str):
        self.settings = settings
        self.move_destination = move_destination
        self.where = f"{settings.pacs_ae_title} at {settings.pacs_host}:{settings.pacs_port}"
        self._count_refused = False  # an instance count's association or C-FIND refused: said once

    def _ae(self, context: UID) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        # connection_timeout too: an address that drops packets would otherwise block for the OS's
        # connect retries (about two minutes).
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = self.settings.timeout_s
        # A retrieve's answers come one per sub-operation (from some PACS only the final one, after all
        # of them): its own, longer, timeout between answers.
        moving = context == StudyRootQueryRetrieveInformationModelMove
        ae.dimse_timeout = self.settings.move_timeout_s if moving else self.settings.timeout_s
        ae.add_requested_context(context)
        if context == StudyRootQueryRetrieveInformationModelMove:
            # Some PACS (dcmqrscp) log an error for a retrieve association that does not also offer C-FIND.
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        return ae

    def _not_accepted(self, context: UID) -> str:
        return (
            f"PACS {self.where} does not accept {context.name} ({context}) from us: diana collect needs "
            f"Study Root C-FIND and C-MOVE (a PACS that allows only C-GET or Patient Root cannot be used yet)"
        )

    @contextmanager
    def _association(self, context: UID) -> Iterator[Association]:
        s = self.settings
        # The responses to the sending thread only: pynetdicom's reactor could take a C-FIND or C-MOVE
        # response off the queue (diana/outbound_association.py); Nagle off for the two-write requests.
        assoc = self._ae(context).associate(
            s.pacs_host, s.pacs_port, ae_title=s.pacs_ae_title, evt_handlers=outbound_association_handlers()
        )
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.accepted_contexts:
                # The PACS answered, accepting none of what we asked for (pynetdicom then aborts):
                # waiting for it would not help.
                raise PacsSetupError(self._not_accepted(context))
            if assoc.is_rejected:
                raise PacsUnavailable(
                    f"PACS {self.where} rejected the association: does it know our AE title {s.ae_title!r} "
                    f"([collect] ae_title) and its own as {s.pacs_ae_title!r} ([collect] pacs_ae_title)?"
                )
            raise PacsUnavailable(f"PACS {self.where} does not answer (connection refused, aborted or timed out)")
        try:
            # Otherwise pynetdicom's send_c_find/send_c_move raise a ValueError: a traceback, not a message.
            if not any(c.abstract_syntax == context for c in assoc.accepted_contexts):
                raise PacsSetupError(self._not_accepted(context))
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def find_studies(self, keys: dict[str, str]) -> list[StudyMatch]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        for name in ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate", "ModalitiesInStudy"):
            setattr(query, name, keys.get(name, ""))
        query.NumberOfStudyRelatedInstances = ""
        matches: dict[str, StudyMatch] = {}
        answers = 0
        with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if "Status" not in status:
                    raise PacsUnavailable(f"PACS {self.where} dropped the association during a C-FIND")
                code = int(status.Status)
                if code in _PENDING and identifier is not None:
                    answers += 1
                    uid = str(identifier.get("StudyInstanceUID", "") or "")
                    contradicted = _contradiction(keys, identifier)
                    if contradicted:
                        log.warning("collect.match_dropped", pacs=self.where, contradicts=contradicted)
                    elif uid:
                        matches[uid] = StudyMatch(
                            uid,
                            str(identifier.get("AccessionNumber", "") or ""),
                            _count(identifier.get("NumberOfStudyRelatedInstances")),
                        )
                elif code not in _PENDING and code != 0x0000:
                    text = _find_failure(code, str(status.get("ErrorComment", "") or ""), answers)
                    if answers and (code == 0xFE00 or code >> 8 == 0xA7):
                        # Matches, then "cancelled" or "out of resources": a PACS at its limit (Orthanc
                        # ends a C-FIND cut at its LimitFindResults with 0xFE00).
                        raise FindLimitReached(code, text, answers, list(matches.values()))
                    raise FindFailed(code, text)
        limit = self.settings.find_limit
        # A study asked for by its UID is one match at most: never cut.
        if limit and answers >= limit and not keys.get("StudyInstanceUID"):
            raise FindLimitReached(
                0x0000,
                f"the PACS answered {answers} matches, its limit of matches ([collect] find_limit = {limit}): "
                "the list may be cut",
                answers,
                list(matches.values()),
            )
        return list(matches.values())

    def count_instances(self, study_instance_uid: str, stop: threading.Event | None = None) -> int | None:
        """The study's instances on the PACS by an IMAGE-level C-FIND (Study Root), for a PACS whose
        STUDY-level answer has no NumberOfStudyRelatedInstances (dcmqrscp). SeriesInstanceUID is sent
        empty (universal matching): dcmqrscp's hierarchical search refuses an IMAGE-level query without
        a key for each level above it. None when the count cannot be had: the C-FIND failed, was cut (a
        PACS's limit of answers: a failure status, or ``find_limit`` answers or more), or took longer
        than ``timeout_s`` in all (its association then aborted, however slowly the PACS answers), or
        ``stop`` was set meanwhile; the job then goes on as without a count."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_instance_uid
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        deadline = time.monotonic() + self.settings.timeout_s
        found: set[str] = set()
        answers = 0
        try:
            with (
                self._association(StudyRootQueryRetrieveInformationModelFind) as assoc,
                _aborted_on(stop, assoc, deadline) as aborted,
            ):
                for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                    if "Status" not in status:
                        if aborted == ["deadline"]:
                            log.info(
                                "collect.instance_count_timeout", pacs=self.where, timeout_s=self.settings.timeout_s
                            )
                        return None
                    code = int(status.Status)
                    if code in _PENDING and identifier is not None:
                        study = str(identifier.get("StudyInstanceUID", "") or "").strip()
                        if study and study != study_instance_uid:
                            # a PACS that ignores the key would have the whole archive counted
                            log.warning(
                                "collect.instance_count_dropped", pacs=self.where, contradicts="StudyInstanceUID"
                            )
                            assoc.abort()  # not released: the PACS would go on answering first
                            return None
                        answers += 1
                        sop = str(identifier.get("SOPInstanceUID", "") or "").strip()
                        if sop:
                            found.add(sop)
                    elif code != 0x0000:
                        log.info("collect.instance_count_failed", pacs=self.where, status=status_text(code))
                        return None
        except (PacsUnavailable, PacsSetupError, RuntimeError) as exc:
            if stop is None or not stop.is_set():
                self._count_unavailable(exc)
            return None
        limit = self.settings.find_limit
        if limit and answers >= limit:
            # A PACS capping silently at its limit ends with Success: a cut count would have a study held
            # in part skipped as already present.
            log.info("collect.instance_count_cut", pacs=self.where, answers=answers, find_limit=limit)
            return None
        return len(found) or None

    def _count_unavailable(self, exc: Exception) -> None:
        """Said once per job (at info): a PACS refusing the count's association (or its C-FIND) refuses it
        for every study, and each is then retrieved even when diana-star holds it."""
        if self._count_refused:
            return
        self._count_refused = True
        log.info(
            "collect.instance_count_unavailable",
            pacs=self.where,
            error=type(exc).__name__,
            reason=str(exc) if isinstance(exc, PacsSetupError) else None,
            effect="studies without an instance count in the C-FIND are retrieved even when already held",
        )

    def move_study(
        self,
        study_instance_uid: str,
        stop: threading.Event | None = None,
        on_established: Callable[[], None] = lambda: None,
    ) -> MoveResult:
        """The study's C-MOVE to its end; ``stop`` set meanwhile aborts the association (a PACS may
        take as long as it likes between answers, and the job is not held by it). ``on_established``
        is called once the PACS took the association, before the C-MOVE is sent: from there on it is
        a retrieve (an association refused raises PacsUnavailable before)."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        stopped = PacsUnavailable("the retrieve was stopped")
        if stop is not None and stop.is_set():  # stopped while it waited (the gate, our receiver's echo)
            raise stopped
        with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
            if stop is not None and stop.is_set():
                raise stopped
            # Before the abort watcher: it could abort the association while this is recorded (a
            # slow broker), and pynetdicom would then refuse to send with a bare RuntimeError.
            on_established()
            with _aborted_on(stop, assoc):
                try:
                    final, counts = self._move_answers(assoc, query, stop, stopped)
                except PacsUnavailable:
                    raise
                except RuntimeError:
                    # pynetdicom refuses to send on an association aborted before the C-MOVE (by the
                    # PACS right after accepting it, or by the stop's watcher)
                    if assoc.is_established:
                        raise
                    if stop is not None and stop.is_set():
                        raise stopped from None
                    raise MoveAborted(f"PACS {self.where} dropped the association before the C-MOVE") from None
        if final is None:
            raise PacsUnavailable(f"PACS {self.where} gave no answer to a C-MOVE")
        return MoveResult(int(final.Status), **counts)

    def _move_answers(
        self, assoc: Association, query: Dataset, stop: threading.Event | None, stopped: PacsUnavailable
    ) -> tuple[Dataset | None, dict[str, int]]:
        """The C-MOVE's final answer (None: none came) and its sub-operation counts."""
        final: Dataset | None = None
        counts = {"completed": 0, "failed": 0, "warning": 0}
        for status, _identifier in assoc.send_c_move(
            query, self.move_destination, StudyRootQueryRetrieveInformationModelMove
        ):
            if "Status" not in status:
                if stop is not None and stop.is_set():
                    raise stopped
                raise MoveAborted(
                    f"PACS {self.where} dropped the association during a C-MOVE, or gave no answer for "
                    f"{self.settings.move_timeout_s:.0f} s ([collect] move_timeout_s)"
                )
            final = status
            for key, tag in (
                ("completed", "NumberOfCompletedSuboperations"),
                ("failed", "NumberOfFailedSuboperations"),
                ("warning", "NumberOfWarningSuboperations"),
            ):
                value = _int(status.get(tag))
                if value is not None:
                    counts[key] = value
        return final, counts


class ReceiverProbe:
    """Our own receiver, C-ECHOed before a retrieve has the PACS send to it: a PACS sending to a
    receiver that does not run fails the study (or answers 0xA801), for our fault. At most one C-ECHO
    every ``every_s`` (its answer is kept meanwhile): not one per study."""

    # A receiver that runs answers at once; one that does not is refused at once, or not routed.
    TIMEOUT_S = 10.0

    def __init__(self, receiver: ReceiverConfig, calling_ae: str, every_s: float):
        self.ae_title = receiver.ae_title
        # Bound to every address (the default): it answers on this host's loopback.
        self.host = "127.0.0.1" if receiver.host in ("", "0.0.0.0", "::") else receiver.host
        self.port = receiver.port
        self.calling_ae = calling_ae
        self.every_s = every_s
        self._lock = threading.Lock()
        self._checked: float | None = None
        self._problem: str | None = None
        self.echoes = 0  # how many were sent (the tests count them)

    def problem(self) -> str | None:
        """Why our receiver cannot take a retrieve now, or None when it answers."""
        with self._lock:  # workers asking at once share one C-ECHO
            if self._checked is None or time.monotonic() - self._checked >= self.every_s:
                self._problem = self._echo()
                self._checked = time.monotonic()
            return self._problem

    def _echo(self) -> str | None:
        self.echoes += 1
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = self.TIMEOUT_S
        ae.add_requested_context(Verification)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if assoc.is_established:
            try:
                answered = "Status" in assoc.send_c_echo()
            finally:
                assoc.release()
            if answered:
                return None
        elif assoc.is_rejected:
            return None  # it runs, and refuses us ([receiver] allowed_calling_aes): the PACS calls as itself
        return (
            f"our receiver {self.ae_title!r} at {self.host}:{self.port} ([receiver] ae_title, host, port) does "
            f"not answer a C-ECHO; start it (diana run, or diana receive), or the PACS fails the studies sent to it"
        )
