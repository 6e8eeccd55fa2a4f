"""One collect job from start (or from where it stopped) to its end.

First each line of the input not yet resolved is looked up on the PACS (C-FIND); then each study
found and not yet finished is retrieved by at most ``concurrency`` workers, each waiting at the
start gate (time windows, studies per hour). A retrieve is recorded as started once the PACS took
its association (before the C-MOVE) and as ended after; it counts as complete once the index holds
the PACS's instance count. A study short of it is retrieved again after a backoff, then reported
partial (or failed, when nothing arrived). What is no study's fault does not use up its tries: a
PACS that does not answer or is out of resources (0xA7xx), or our receiver not answering, pauses
the job; a PACS that cannot serve it as configured (0xA801, no Study Root C-FIND or C-MOVE) stops it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import structlog

from diana.config import CollectConfig
from diana.producers.pacs_pull.completeness import IndexedCounter
from diana.producers.pacs_pull.ledger import (
    RETRIED_LINE,
    RETRIED_STUDY,
    TERMINAL_LINE,
    JobLedger,
    JobState,
    StudyState,
)
from diana.producers.pacs_pull.narrowing import describe, one_day, split_keys
from diana.producers.pacs_pull.requests import CollectRequest
from diana.producers.pacs_pull.scu import (
    MOVE_DESTINATION_UNKNOWN,
    FindFailed,
    FindLimitReached,
    MoveAborted,
    MoveDestinationUnknown,
    MoveResult,
    PacsClient,
    PacsUnavailable,
    ReceiverProbe,
    StudyMatch,
    status_text,
)
from diana.producers.pacs_pull.throttle import StartGate, TimeWindows

__all__ = ["CollectJob", "JobConflict", "job_id_for", "criteria_of"]

log = structlog.get_logger("diana.collect")


class JobConflict(ValueError):
    """A job id given again with a different input."""


class _Stopped(Exception):
    """The job was stopped while a line's C-FINDs ran: the line is left unresolved."""


def criteria_of(requests: list[CollectRequest]) -> str:
    """The job's input as recorded in JOB_STARTED: each line's number and text."""
    return json.dumps([[r.line, r.text] for r in requests], separators=(",", ":"))


def job_id_for(requests: list[CollectRequest]) -> str:
    """The same input gives the same job id, so running the same command again resumes the job."""
    return "collect-" + hashlib.sha256(criteria_of(requests).encode()).hexdigest()[:12]


class CollectJob:
    def __init__(
        self,
        settings: CollectConfig,
        job: JobState,
        requests: list[CollectRequest],
        ledger: JobLedger,
        pacs: PacsClient,
        counter: IndexedCounter,
        *,
        notify: Callable[[str], None] = print,
        on_study_done: Callable[[StudyState], None] = lambda _s: None,
        stop: threading.Event | None = None,
        receiver: ReceiverProbe | None = None,
        retry_failed: bool = False,
    ):
        self.settings = settings
        self.job = job
        self.requests = requests
        self.ledger = ledger
        self.pacs = pacs
        self.counter = counter
        self.notify = notify
        self.on_study_done = on_study_done
        self.stop = stop or threading.Event()
        self.receiver = receiver  # None: the PACS sends elsewhere ([collect] move_destination)
        # Studies ended failed or partial and lines whose C-FIND failed are tried again (--retry-failed).
        self.retry_failed = retry_failed
        self._lock = threading.Lock()
        earlier = [t for s in job.studies.values() for t in s.move_starts]
        self.gate = StartGate(TimeWindows(settings.windows), settings.studies_per_hour, earlier)

    # ------------------------------------------------------------------ the ledger
    def _record(self, event: str, **fields: Any) -> None:
        value = self.ledger.record(event, **fields)
        with self._lock:
            self.job.apply(value)

    def _pause(self, reason: str) -> None:
        """An unavailable PACS: record it, say it, wait; nothing already received is touched."""
        self._record("JOB_PAUSED", detail=reason)
        self.notify(
            f"{reason}; paused, trying again in {self.settings.pause_s:.0f} s (Ctrl-C stops; run again to resume)"
        )
        log.warning("collect_paused", job=self.job.job_id, reason=reason)
        self.stop.wait(self.settings.pause_s)

    # ------------------------------------------------------------------ the steps
    def start(self) -> None:
        criteria = criteria_of(self.requests)
        if self.job.criteria and self.job.criteria != criteria:
            raise JobConflict(
                f"job {self.job.job_id} was started with another input; give another --job name or the same input"
            )
        if not self.job.criteria or self.job.finished:
            self._record("JOB_STARTED", input=criteria)

    def resolve_lines(self) -> None:
        for request in self.requests:
            if self.stop.is_set():
                return
            line = self.job.lines.get(request.line)
            if line is not None and line.state in TERMINAL_LINE:
                if not (self.retry_failed and line.state in RETRIED_LINE):
                    continue
            if request.error:
                self._record("LINE_UNPARSABLE", line=request.line, input=request.text, detail=request.error)
                continue
            while not self.stop.is_set():
                queries = [0]
                try:
                    matches = self._find_all(request.find_keys(), queries)
                except _Stopped:
                    return
                except PacsUnavailable as exc:
                    self._pause(str(exc))
                    continue
                except FindFailed as exc:
                    self._record(
                        "LINE_FAILED",
                        line=request.line,
                        input=request.text,
                        # none for a silent cap: the PACS said Success (0x0000), find_limit took it as cut
                        pacs_status=status_text(exc.status) if exc.status else None,
                        detail=str(exc),
                    )
                    break
                for m in matches:
                    self._record(
                        "STUDY_FOUND",
                        line=request.line,
                        study_instance_uid=m.study_instance_uid,
                        accession_number=m.accession_number or None,
                        expected_instances=m.expected_instances,
                    )
                event = "LINE_FOUND" if matches else "LINE_NOT_FOUND"
                detail = f"{len(matches)} studies"
                if queries[0] > 1:
                    detail += f" by {queries[0]} C-FINDs (the PACS's limit of matches reached: the line asked in parts)"
                self._record(event, line=request.line, input=request.text, pacs_status="0x0000", detail=detail)
                break

    def _find_all(self, keys: dict[str, str], queries: list[int], part: bool = False) -> list[StudyMatch]:
        """Every study ``keys`` finds, even on a PACS that cuts its answers at a limit of matches: a query
        at the limit is asked again in parts (its date range halved, down to one day) and their
        matches joined, a study found by two parts once. FindFailed when it cannot be narrowed enough.
        ``queries[0]`` counts the C-FINDs sent."""
        try:
            return self._ask(keys, queries, part)
        except FindLimitReached as cut:
            parts = split_keys(keys)
            if parts is None:
                raise FindFailed(cut.status, self._cannot_narrow(keys, cut)) from None
            log.info("collect_find_narrowed", job=self.job.job_id, parts=len(parts), answers=cut.answers)
            found: dict[str, StudyMatch] = {}
            for sub in parts:
                for m in self._find_all(sub, queries, part=True):
                    found.setdefault(m.study_instance_uid, m)
            # What the whole range listed must be in one of its parts: a study the parts miss (a PACS
            # matching date ranges otherwise than it lists them) would be lost without a word.
            missed = [m for m in cut.matches if m.study_instance_uid not in found]
            if missed:
                raise FindFailed(
                    cut.status,
                    f"the PACS's limit of matches was reached for {describe(keys)}, and {len(missed)} of the "
                    f"studies it listed for it are in none of its parts: "
                    f"narrow the line's query (a shorter date range, one modality) or raise the PACS's limit",
                ) from None
            return list(found.values())

    def _ask(self, keys: dict[str, str], queries: list[int], part: bool) -> list[StudyMatch]:
        """One C-FIND. A part of a narrowed line is asked again by itself, the parts already answered
        kept: after a pause when the PACS does not answer (as long as for the line's own C-FIND), or
        answers 0xA7xx with no match (busy; at most ``retries`` pauses). Any other failure of a part
        fails the line, naming the part."""
        busy = 0
        while True:
            if self.stop.is_set():
                raise _Stopped
            queries[0] += 1
            try:
                return self.pacs.find_studies(keys)
            except FindLimitReached:
                raise
            except PacsUnavailable as exc:
                if not part:
                    raise
                self._pause(f"{exc} (asking {describe(keys)}, a part of the line)")
            except FindFailed as exc:
                if not part:
                    raise
                if exc.status >> 8 == 0xA7 and busy < self.settings.retries:
                    busy += 1
                    self._pause(
                        f"PACS {self.pacs.where} is out of resources ({status_text(exc.status)}) asking "
                        f"{describe(keys)}, a part of the line ({busy} of at most {self.settings.retries} pauses)"
                    )
                    continue
                raise FindFailed(
                    exc.status, f"asking {describe(keys)}, a part of the line at the PACS's limit of matches: {exc}"
                ) from None

    def _cannot_narrow(self, keys: dict[str, str], cut: FindLimitReached) -> str:
        """Why a query at the PACS's limit of matches ends the line find_failed (none retrieved)."""
        if cut.status:  # the PACS's own status after some matches: its text counts them
            said = f"the PACS's limit of matches was reached: {cut}"
        else:
            said = (
                f"the PACS's limit of matches was reached ({cut.answers} matches, [collect] find_limit = "
                f"{self.settings.find_limit}): the list may be cut, none retrieved"
            )
        if not keys.get("StudyDate"):
            return f"{said}; the line has no study date to split it by: give it DateFrom and DateTo, or one modality"
        if one_day(keys):
            # Not split by StudyTime: a study without one (Type 2) matches no time range, and would be lost.
            return (
                f"{said}; still so for {describe(keys)}, one day: studies without a StudyTime could not be "
                f"listed if the day were asked in parts by time, so it is not: narrow the line otherwise "
                f"(one modality) or raise the PACS's limit"
            )
        return (
            f"{said}; still so for {describe(keys)}, as narrow as diana collect asks: narrow the line (one "
            f"modality) or raise the PACS's limit"
        )

    def retrieve_all(self) -> None:
        todo = [s.study_instance_uid for s in self.job.studies.values() if not s.done or self._retried(s)]
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=max(1, self.settings.concurrency), thread_name_prefix="collect") as pool:
            pending = {pool.submit(self._retrieve_or_stop, uid) for uid in todo}
            raising = False
            try:
                while pending and not self.stop.is_set():
                    # Whichever fails first, at once (not in the order submitted); a bounded wait, so
                    # that Ctrl-C and SIGTERM get through.
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    for future in done:
                        future.result()
            except BaseException:
                raising = True
                self.stop.set()
                raise
            finally:
                # The first error (the index gone, a bug), Ctrl-C or SIGTERM stops the job: the studies
                # queued are not started, the running ones aborted (move_study watches stop), the
                # record as it is. Errors of those that ended meanwhile are said, not lost.
                pool.shutdown(wait=True, cancel_futures=True)
                for future in pending:
                    if future.done() and not future.cancelled() and (error := future.exception()) is not None:
                        errors.append(error)
                if raising:
                    for error in errors:
                        log.error("collect_study_error", job=self.job.job_id, error=repr(error))
        if errors:
            # The stop a failing worker set was seen before its error: the error is the job's end.
            for error in errors[1:]:
                log.error("collect_study_error", job=self.job.job_id, error=repr(error))
            raise errors[0]
        if not self.stop.is_set():
            self._record("JOB_DONE", detail=json.dumps(self.job.counts(), sort_keys=True))

    def _retried(self, study: StudyState) -> bool:
        """Ended failed or partial, and to be tried again now (its MOVE_STARTED makes it not done)."""
        return self.retry_failed and study.state in RETRIED_STUDY

    def run(self) -> JobState:
        self.start()
        self.resolve_lines()
        if not self.stop.is_set():
            self.retrieve_all()
        return self.job

    # ------------------------------------------------------------------ one study
    def _finish(self, study: StudyState, event: str, **fields: Any) -> None:
        self._record(event, study_instance_uid=study.study_instance_uid, line=study.line, **fields)
        self.on_study_done(study)

    def _complete(self, study: StudyState, have: int, expected: int | None) -> None:
        self._finish(
            study, "STUDY_COMPLETE", indexed_instances=have, expected_instances=expected, detail=f"{have} instances"
        )

    def _move_ended(self, study: StudyState, result: MoveResult, **fields: Any) -> None:
        self._record(
            "MOVE_ENDED",
            study_instance_uid=study.study_instance_uid,
            line=study.line,
            attempt=study.attempts,
            pacs_status=status_text(result.status),
            completed=result.completed,
            failed=result.failed,
            warning=result.warning,
            **fields,
        )

    def _retrieve_or_stop(self, uid: str) -> None:
        try:
            self._retrieve_study(uid)
        except BaseException:
            # Set here, in the worker: its thread would otherwise take the next queued study before
            # retrieve_all sees the error (a PACS that does not know our move destination got one more).
            self.stop.set()
            raise

    def _retrieve_study(self, uid: str) -> None:
        if self.stop.is_set():
            # Queued studies still start until retrieve_all sees the stop (up to half a second later):
            # not even the index is asked for them.
            return
        study = self.job.studies[uid]
        # A count of 0 or less (recorded by an earlier version from such a C-FIND answer) says nothing.
        expected = study.expected_instances if (study.expected_instances or 0) > 0 else None
        s = self.settings
        if expected is None and s.count_instances:
            # No count in the C-FIND's answer (dcmqrscp): the PACS's instances counted one by one, so that
            # a study already held is not retrieved again and the retrieve has a count to wait for.
            # None (the C-FIND failed, was cut or too slow): as without it.
            expected = self.pacs.count_instances(uid, self.stop)
            if self.stop.is_set():  # the count aborted by Ctrl-C or SIGTERM: no retrieve
                return
        # Already in diana-star? After a restart mid-retrieve, give the pipeline time to index what arrived.
        if expected:
            if study.arriving:
                have = self.counter.wait_for(uid, expected, s.verify_timeout_s, self.stop)
            else:
                have = self.counter.count(uid)
            if have >= expected:
                event = "STUDY_COMPLETE" if study.attempts else "STUDY_SKIPPED"
                # after a restart, or with --retry-failed (what was short came late)
                detail = "retrieved by an earlier retrieve" if study.attempts else "already complete in diana-star"
                self._finish(study, event, indexed_instances=have, expected_instances=expected, detail=detail)
                return
        result: MoveResult | None = None
        have = 0
        tries = 0
        busy = 0  # retrieves the PACS refused for want of resources, not counted as tries
        while tries <= s.retries and not self.stop.is_set():
            if tries:
                wait = s.backoff_s * 2 ** (tries - 1)
                log.info("collect_retry", job=self.job.job_id, study=uid, attempt=tries + 1, wait_s=wait)
                if self.stop.wait(wait):
                    return
            place = self.gate.acquire(self.stop, self.notify)
            if place is None:
                return
            problem = self.receiver.problem() if self.receiver is not None else None
            if problem:
                # Not the study's fault, nor the PACS's: paused, the hour's place given back.
                self.gate.give_back(place)
                self._pause(problem)
                continue
            if self.stop.is_set():  # stopped while it waited for the gate or the echo: no retrieve
                self.gate.give_back(place)
                return
            started = False

            def begin() -> None:
                # Recorded once the PACS took the association: a refused one is no retrieve, neither
                # in the report's count nor in the hourly limit (its place is given back below).
                nonlocal started
                self._record("MOVE_STARTED", study_instance_uid=uid, line=study.line, attempt=study.attempts + 1)
                started = True

            try:
                try:
                    result = self.pacs.move_study(uid, self.stop, on_established=begin)
                finally:
                    if not started:
                        self.gate.give_back(place)
            except MoveAborted as exc:
                # The PACS was there and dropped this study's retrieve: a try used, as a failed C-MOVE.
                tries += 1
                self._record(
                    "MOVE_ENDED", study_instance_uid=uid, line=study.line, attempt=study.attempts, detail=str(exc)
                )
                log.warning("collect_move_aborted", job=self.job.job_id, study=uid, attempt=tries)
                # A PACS may send every instance and then drop the association instead of answering.
                have = (
                    self.counter.wait_for(uid, expected, s.verify_timeout_s, self.stop)
                    if expected
                    else self.counter.count(uid)
                )
                if expected and have >= expected:
                    self._complete(study, have, expected)
                    return
                continue
            except PacsUnavailable as exc:
                if self.stop.is_set():
                    return
                self._pause(str(exc))
                continue  # not the study's fault: does not use up a retry
            if result.status == MOVE_DESTINATION_UNKNOWN:
                # The same for every study: the job stops, and this one is not failed (nor its try counted).
                self._move_ended(study, result, detail="the PACS does not know the move destination: the job stopped")
                raise MoveDestinationUnknown(self.pacs.move_destination, self.pacs.where)
            if result.status >> 8 == 0xA7 and busy < s.retries:
                # Out of resources (0xA701, 0xA702...): the PACS is busy, not this study at fault; a pause
                # as for a PACS that does not answer. At most `retries` of them, then tries: a PACS that
                # always says so of this study cannot hold the job for ever.
                busy += 1
                why = f"the PACS is out of resources ({busy} of at most {s.retries} pauses)"
                pause = f"PACS {self.pacs.where} is out of resources ({status_text(result.status)}), busy"
                if not result.completed + result.failed + result.warning:
                    # Refused before any sub-operation (no counts at all counts as none): not a retrieve.
                    # MOVE_REFUSED takes back the MOVE_STARTED recorded when the PACS took the association
                    # (the study's retrieves, the hour's starts, its state before it), and the place in the
                    # hour is given back, as for an association refused.
                    self._record(
                        "MOVE_REFUSED",
                        study_instance_uid=uid,
                        line=study.line,
                        attempt=study.attempts,
                        pacs_status=status_text(result.status),
                        detail=f"{why}: no try",
                    )
                    self.gate.give_back(place)
                    self._pause(pause)
                    continue
                # Sub-operations were sent, then the PACS ran out: a retrieve (recorded with its counts,
                # in the report and the hour; instances may be on their way), not counted as a try. Its
                # counts are what it did before stopping, not the study's: no count is taken from them.
                sent = result.completed + result.warning
                self._move_ended(
                    study,
                    result,
                    expected_instances=expected,
                    detail=f"{why} after {sent} sent, {result.failed} failed: not counted as a try",
                )
                have = self.counter.wait_for(uid, expected or sent, s.verify_timeout_s, self.stop)
                if expected and have >= expected:
                    self._complete(study, have, expected)
                    return
                self._pause(pause)
                continue
            tries += 1
            moved = result.completed + result.failed + result.warning
            if moved > (expected or 0):
                # The C-FIND did not say how many (not every PACS returns NumberOfStudyRelatedInstances),
                # or fewer than the retrieve moved (the study grew since, or the count was stale): the
                # retrieve's own count of sub-operations is the PACS's count, and what to wait for.
                expected = moved
            # the count recorded, so that a restart knows what to wait for before retrieving again
            self._move_ended(study, result, expected_instances=expected)
            # Wait for what the PACS says it sent to be indexed: all of the study when it reported success.
            sent = result.completed + result.warning
            want = expected if expected is not None and result.success else sent
            if expected is not None:
                want = min(want, expected)
            have = self.counter.wait_for(uid, want, s.verify_timeout_s, self.stop)
            target = expected if expected is not None else sent
            # Nothing received is never a complete study: a PACS answering success to a move of nothing.
            if have >= target > 0 and (expected is not None or result.success):
                self._complete(study, have, expected)
                return
        if self.stop.is_set():
            return
        if result is None:  # every try aborted by the PACS
            answer, pacs_status = "the PACS dropped the association during every retrieve", "aborted"
        else:
            answer = f"PACS status {status_text(result.status)}: {result.completed} sent, {result.failed} failed"
            pacs_status = status_text(result.status)
        detail = f"{have} of {expected if expected is not None else '?'} instances in diana-star after {tries} retrieves; {answer}"
        event = "STUDY_PARTIAL" if have else "STUDY_FAILED"
        self._finish(
            study,
            event,
            indexed_instances=have,
            expected_instances=expected,
            pacs_status=pacs_status,
            detail=detail,
        )
        log.warning(
            "collect_study_short", job=self.job.job_id, study=uid, outcome=event, indexed=have, expected=expected
        )
