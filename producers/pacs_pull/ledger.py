"""A collect job's record on the ``collect.jobs`` topic: its events written one by one, and its state
folded back from them.

Every event is keyed by the job id, so a job's whole history sits in one partition, in order. An event
is written (acks=all, idempotent producer) and acknowledged before the step it records counts as
done: a ``kill -9`` loses at most the step in progress, which the restarted job does again or finds
already complete in the index.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from diana.clients import kafka_consumer, kafka_producer
from diana.config import KafkaConfig
from diana.schemas.codec import DecodeError, default_codec
from diana.schemas.topics import COLLECT_JOBS

__all__ = [
    "JobLedger",
    "JobState",
    "StudyState",
    "LineState",
    "load_events",
    "TERMINAL_STUDY",
    "TERMINAL_LINE",
    "RETRIED_STUDY",
    "RETRIED_LINE",
]

TERMINAL_STUDY = ("STUDY_COMPLETE", "STUDY_SKIPPED", "STUDY_PARTIAL", "STUDY_FAILED")
TERMINAL_LINE = ("LINE_UNPARSABLE", "LINE_NOT_FOUND", "LINE_FAILED", "LINE_FOUND")
# Final, but tried again with `collect run --retry-failed` (once the cause is fixed). An unparsable line
# is not: the same file gives the same line.
RETRIED_STUDY = ("STUDY_PARTIAL", "STUDY_FAILED")
RETRIED_LINE = ("LINE_FAILED",)


class JobLedger:
    """Writes one job's events; ``record`` returns once the broker has acknowledged the event."""

    def __init__(self, kafka: KafkaConfig, job_id: str, timeout_s: float = 30.0):
        self.job_id = job_id
        self.timeout_s = timeout_s
        self._codec = default_codec()
        self._producer = kafka_producer(kafka, {"acks": "all", "enable.idempotence": True, "linger.ms": 0})
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        value = {"job_id": self.job_id, "at": datetime.now(UTC), "event": event, **fields}
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def delivered(err: KafkaError | None, _msg: object) -> None:
            outcome.append(err)
            done.set()

        with self._lock:
            self._producer.produce(
                COLLECT_JOBS.name,
                key=self.job_id.encode(),
                value=self._codec.encode(COLLECT_JOBS.value_schema, value),
                on_delivery=delivered,
            )
        deadline = time.monotonic() + self.timeout_s
        while not done.is_set():
            with self._lock:
                self._producer.poll(0.1)
            if time.monotonic() > deadline:
                raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, f"{COLLECT_JOBS.name}: no acknowledgement"))
        if outcome and outcome[0] is not None:
            raise KafkaException(outcome[0])
        return value


def load_events(kafka: KafkaConfig, job_id: str | None = None, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every event of ``job_id`` (of every job when None) on collect.jobs, in the order written."""
    codec = default_codec()
    consumer = kafka_consumer(
        kafka, f"diana-collect-reader-{uuid.uuid4()}", {"enable.auto.commit": False, "enable.partition.eof": True}
    )
    try:
        topic = consumer.list_topics(COLLECT_JOBS.name, timeout=10).topics.get(COLLECT_JOBS.name)
        if topic is None or topic.error is not None:
            return []
        starts = []
        for p in topic.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(COLLECT_JOBS.name, p), timeout=10)
            if high > low:
                starts.append(TopicPartition(COLLECT_JOBS.name, p, low))
        consumer.assign(starts)
        open_partitions = {tp.partition for tp in starts}
        events = []
        deadline = time.monotonic() + timeout_s
        while open_partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{COLLECT_JOBS.name}: could not read to its end within {timeout_s:.0f} s")
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(msg.partition())
                continue
            if job_id is not None and msg.key() != job_id.encode():
                continue
            try:
                events.append(codec.decode(msg.value(), expect=COLLECT_JOBS.value_schema)[1])
            except DecodeError:
                continue
        events.sort(key=lambda e: e["at"])
        return events
    finally:
        consumer.close()


def _refused(e: dict[str, Any]) -> bool:
    """A C-MOVE the PACS refused for want of resources before any sub-operation, without it counting as
    a try: MOVE_REFUSED, or as versions before it recorded one, a MOVE_ENDED 0xA7xx whose detail ends
    "no try" and that counted no sub-operation (they recorded so one after some were sent, too: that
    one is a retrieve, instances may have come)."""
    if e["event"] == "MOVE_REFUSED":
        return True
    status = e.get("pacs_status") or ""
    if not (e["event"] == "MOVE_ENDED" and status.startswith("0xA7")):
        return False
    counted = sum(e.get(name) or 0 for name in ("completed", "failed", "warning"))
    return counted == 0 and (e.get("detail") or "").endswith(": no try")


@dataclass
class StudyState:
    study_instance_uid: str
    line: int
    accession_number: str = ""
    expected_instances: int | None = None
    indexed_instances: int | None = None
    state: str = "STUDY_FOUND"
    pacs_status: str = ""
    attempts: int = 0
    detail: str = ""
    move_starts: list[float] = field(default_factory=list)
    # A retrieve of it may have sent instances not yet counted: it started, and did not end saying it
    # sent none, nor was the study found finished since. A restart waits for them before retrieving again.
    arriving: bool = False
    found_by: set[int] = field(default_factory=set)  # every input line whose C-FIND found it
    # Its state when its last MOVE_STARTED was recorded: a MOVE_REFUSED (the PACS out of resources,
    # 0xA7xx, before sending anything) puts it back, as if that retrieve had not started.
    state_before_move: str = "STUDY_FOUND"
    arriving_before_move: bool = False

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STUDY


@dataclass
class LineState:
    line: int
    text: str = ""
    state: str = ""
    pacs_status: str = ""
    detail: str = ""


@dataclass
class JobState:
    """A job folded from its events: the state of each line and of each study found."""

    job_id: str
    criteria: str = ""
    lines: dict[int, LineState] = field(default_factory=dict)
    studies: dict[str, StudyState] = field(default_factory=dict)
    finished: bool = False
    paused: str = ""

    @classmethod
    def fold(cls, job_id: str, events: list[dict[str, Any]]) -> JobState:
        job = cls(job_id)
        for e in events:
            job.apply(e)
        return job

    def apply(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "JOB_STARTED":
            self.criteria = self.criteria or (e.get("input") or "")
            self.finished = False
        elif kind == "JOB_DONE":
            self.finished, self.paused = True, ""
        elif kind == "JOB_PAUSED":
            self.paused = e.get("detail") or ""
        elif kind.startswith("LINE_"):
            line = self.lines.setdefault(e["line"], LineState(e["line"]))
            line.text = e.get("input") or line.text
            line.state, line.pacs_status, line.detail = kind, e.get("pacs_status") or "", e.get("detail") or ""
        elif kind.startswith("STUDY_") or kind.startswith("MOVE_"):
            uid = e["study_instance_uid"]
            study = self.studies.get(uid)
            if study is None:
                study = self.studies[uid] = StudyState(uid, e.get("line") or 0)
            if _refused(e):
                # The PACS took the association and refused the C-MOVE (0xA7xx): no retrieve. Before
                # this event, that MOVE_STARTED counted as a retrieve in the report, in the hourly limit
                # after a restart, and made a study found complete later "retrieved by an earlier
                # retrieve" rather than already present; its pacs_status and detail are not the study's.
                if study.attempts:
                    study.attempts -= 1
                if study.move_starts:
                    study.move_starts.pop()
                study.arriving = study.arriving_before_move
                study.state = study.state_before_move
                return
            if kind == "STUDY_FOUND" and e.get("line"):
                study.found_by.add(e["line"])  # retrieved once, reported on each line that asked for it
            for name in ("accession_number", "expected_instances", "indexed_instances"):
                if e.get(name) is not None:
                    setattr(study, name, e[name])
            if e.get("pacs_status"):
                study.pacs_status = e["pacs_status"]
            if e.get("detail") is not None:
                study.detail = e["detail"]
            if kind == "MOVE_STARTED":
                if study.state != "MOVE_STARTED":
                    study.state_before_move, study.arriving_before_move = study.state, study.arriving
                else:
                    # One left unended by a crash is not the state to go back to, but it may have sent
                    # instances: a refusal of this one leaves them still to wait for.
                    study.arriving_before_move = True
                study.attempts += 1
                study.move_starts.append(e["at"].timestamp())
                study.arriving = True
            elif kind == "MOVE_ENDED":
                # A retrieve aborted says no count: it may have sent some.
                sent = None if e.get("completed") is None else e["completed"] + (e.get("warning") or 0)
                study.arriving = sent is None or sent > 0
            elif kind != "STUDY_FOUND":
                study.arriving = False
            if kind != "STUDY_FOUND" or study.state == "STUDY_FOUND":
                study.state = kind

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines.values():
            if line.state != "LINE_FOUND":
                out[line.state] = out.get(line.state, 0) + 1
        for study in self.studies.values():
            out[study.state] = out.get(study.state, 0) + 1
        return out
