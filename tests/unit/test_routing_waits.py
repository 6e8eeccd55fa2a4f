"""The route worker's planning: when a dose alert's study counts as complete, and what it does while the
archive or the index does not answer (waits without giving up, where a message's own fault is
dead-lettered). The destination is a recording sender: what is tested is which instances the worker
decides to send, from real DICOM files in a real archive folder."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import Message
from pydicom.uid import generate_uid

from diana.access.routing.rules import parse_rules
from diana.access.routing.senders import DicomSender, Outcome, Result
from diana.access.routing.worker import IndexUnavailable, RouteWorker, WorkerSettings
from diana.config import KafkaConfig
from diana.durable import sha256_file
from diana.schemas.codec import default_codec
from diana.schemas.topics import DOSE_ALERTS
from diana.storage import FilesystemStore, StorageError
from diana.stream_apps.aggregate_fold import apply_instance, complete_series, study_record
from diana.stream_apps.completeness import QuietTimes
from tests.support.dicomgen import make_instance

STUDY = generate_uid()
T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
QUIET = QuietTimes.parse("*=30")


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, items, attempt):
        self.sent += [i.sop_instance_uid for i in items]
        return [Result(Outcome.DELIVERED)] * len(items)

    def close(self) -> None:
        pass


class _Dead:
    def __init__(self) -> None:
        self.letters: list[str] = []

    def send(self, msg, reason: str) -> None:
        self.letters.append(reason)

    def flush(self) -> None:
        pass

    def discard(self) -> None:
        pass


def _archive(root: Path, series: dict[str, int]) -> list[dict]:
    """Real instances of STUDY in an archive folder; their InstanceArrived-like events."""
    events = []
    for series_uid, count in series.items():
        for n in range(1, count + 1):
            ds = make_instance(STUDY, series_uid, n, patient_id="ROUTE1", study_date="20261130")
            path = root / STUDY / series_uid / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            events.append(
                {
                    "study_instance_uid": STUDY,
                    "series_instance_uid": series_uid,
                    "sop_instance_uid": ds.SOPInstanceUID,
                    "sop_class_uid": ds.SOPClassUID,
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "instance_number": n,
                    "modality": "CT",
                    "size_bytes": path.stat().st_size,
                    "sha256": sha256_file(path)[0],
                }
            )
    return events


def _alert() -> Message:
    alert = {
        "alert_id": "a1",
        "revision": 1,
        "raised_at": 0,
        "rule": "ctdi",
        "rule_type": "threshold",
        "metric": "ctdivol",
        "value": 80.0,
        "threshold": 60.0,
        "study_instance_uid": STUDY,
        "message": "over the reference level",
    }
    return Message(
        topic=DOSE_ALERTS.name, partition=0, offset=5, value=default_codec().encode(DOSE_ALERTS.value_schema, alert)
    )


def _worker(root: Path, study_state, wait_s: float = 3) -> tuple[RouteWorker, _Recorder]:
    routing = parse_rules(
        {
            "destinations": [{"name": "ws", "ae_title": "WS", "host": "127.0.0.1", "port": 1}],
            "rules": [{"name": "dose", "match": {"dose_alert": True}, "destinations": ["ws"]}],
        }
    )
    sender = _Recorder()
    settings = WorkerSettings("g", FilesystemStore(root), 5, max_backoff_s=0.2, archive_wait_s=wait_s)
    worker = RouteWorker(
        KafkaConfig(),
        routing.destinations["ws"],
        routing.rules_for("ws"),
        sender,
        settings,
        threading.Event(),
        study_state,
    )
    return worker, sender


def test_an_alert_on_a_study_amended_by_its_late_dose_report_is_routed(tmp_path: Path):
    """The dose report (its own series) came after the images' quiet time: the study completed, then
    became AMENDED for good. Before, the alert waited for COMPLETED and was given up on."""
    images, report = generate_uid(), generate_uid()
    events = _archive(tmp_path, {images: 3, report: 1})
    series, study = None, None
    for n, event in enumerate(events[:3]):
        series, study = apply_instance(series, study, {**event, "received_at": T0 + timedelta(seconds=n)}, QUIET)
    series, study, _ = complete_series(series, study)
    late = {**events[3], "received_at": T0 + timedelta(seconds=120)}
    report_series, study = apply_instance(None, study, late, QUIET)
    mid_amendment = study_record(study)  # the report's series not quiet yet
    report_series, study, _ = complete_series(report_series, study)
    amended = study_record(study)
    assert (mid_amendment["status"], amended["status"]) == ("AMENDED", "AMENDED")

    worker, _ = _worker(tmp_path, lambda uid: mid_amendment)
    assert worker.plan(_alert())[0] is None  # waits for the report's series
    worker, sender = _worker(tmp_path, lambda uid: amended)
    dead = _Dead()
    assert worker.deliver([_alert()], dead) is True
    assert sorted(sender.sent) == sorted(e["sop_instance_uid"] for e in events) and dead.letters == []


def test_an_index_or_archive_that_does_not_answer_is_waited_for_not_dead_lettered(tmp_path: Path):
    """OpenSearch down (the study's state) or an S3 503 past archive_wait_s: the alert waits and is
    sent once they answer; before, it was dead-lettered as 'not complete' or 'unexpected'."""
    series_uid = generate_uid()
    events = _archive(tmp_path, {series_uid: 2})
    series, study = None, None
    for n, event in enumerate(events):
        series, study = apply_instance(series, study, {**event, "received_at": T0 + timedelta(seconds=n)}, QUIET)
    series, study, _ = complete_series(series, study)
    record = study_record(study)
    failures = [IndexUnavailable("ConnectionError"), StorageError("object store: get: 503 SlowDown")] * 3
    answered_at: list[float] = []

    def state(uid: str) -> dict:
        if failures:
            raise failures.pop(0)
        answered_at.append(1)
        return record

    worker, sender = _worker(tmp_path, state, wait_s=0.0)  # anything waited for is given up on at once
    dead = _Dead()
    assert worker.deliver([_alert()], dead) is True
    assert dead.letters == [] and answered_at and sorted(sender.sent) == sorted(e["sop_instance_uid"] for e in events)


def test_a_destination_out_of_room_is_tried_for_archive_wait_s_then_given_up_as_a_refusal(tmp_path: Path):
    """0xA7xx (Refused: Out of Resources): a full disk freed within archive_wait_s loses nothing (before,
    max_attempts refusals, about 7 s, dead-lettered the instance); one that stays full (some servers say
    it of one object for good) is given up after archive_wait_s, as any refusal, not waited on for ever."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    from diana.schemas.topics import INSTANCES

    full_until = [time.monotonic() + 1.5]
    stored: list[str] = []

    def on_store(event) -> int:
        if time.monotonic() < full_until[0]:
            return 0xA700
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    scp = AE("WS")
    scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        routing = parse_rules(
            {
                "destinations": [
                    {"name": "ws", "ae_title": "WS", "host": "127.0.0.1", "port": server.server_address[1]}
                ],
                "rules": [{"name": "ct", "match": {"modality": "CT"}, "destinations": ["ws"]}],
            }
        )
        (event,) = _archive(tmp_path, {generate_uid(): 1})
        record = {
            **event,
            "sha256": "0" * 64,
            "landing_path": "x",
            "received_at": datetime.now(UTC),
            "source": "C_STORE",
            "header_json": "{}",
        }
        msg = Message(
            topic=INSTANCES.name, partition=0, offset=1, value=default_codec().encode(INSTANCES.value_schema, record)
        )

        def deliver(wait_s: float) -> _Dead:
            settings = WorkerSettings("g", FilesystemStore(tmp_path), 2, max_backoff_s=0.2, archive_wait_s=wait_s)
            sender = DicomSender(routing.destinations["ws"], "DIANA", 10)
            worker = RouteWorker(
                KafkaConfig(), routing.destinations["ws"], routing.rules_for("ws"), sender, settings, threading.Event()
            )
            dead = _Dead()
            assert worker.deliver([msg], dead) is True
            return dead

        assert deliver(wait_s=30).letters == [] and stored == [event["sop_instance_uid"]]
        full_until[0] = time.monotonic() + 3600  # full for good
        started = time.monotonic()
        (letter,) = deliver(wait_s=1).letters
        assert "0xA700" in letter and 1 <= time.monotonic() - started < 10
    finally:
        server.shutdown()


def test_an_archive_file_that_cannot_be_read_is_given_up_after_archive_wait_s(tmp_path: Path):
    """A permission or a bad sector is not an outage: waited for archive_wait_s, then dead-lettered."""

    def state(uid: str) -> dict:
        raise PermissionError(13, "Permission denied")

    worker, sender = _worker(tmp_path, state, wait_s=0.0)
    dead = _Dead()
    assert worker.deliver([_alert()], dead) is True
    assert sender.sent == [] and len(dead.letters) == 1 and "PermissionError" in dead.letters[0]


def test_an_archived_file_that_cannot_be_read_is_a_refusal_and_a_store_that_does_not_answer_is_not():
    """In the senders: a permission, a bad sector or the store's 'access denied' is counted as a refusal
    (dead-lettered after max_attempts); a socket or the store not answering is tried again without
    limit. Before, every OSError was 'unavailable', and one unreadable file held its destination."""
    import errno

    from diana.access.routing.senders import _os_error
    from diana.storage import StorageRefused

    refusals = [
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.EIO, "Input/output error"),
        FileNotFoundError(errno.ENOENT, "No such file"),
        StorageRefused("object store: get k: AccessDenied"),
    ]
    outages = [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        StorageError("object store: get k: 503 SlowDown"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
    ]
    assert [_os_error(e, "x").outcome for e in refusals] == [Outcome.FAILED] * len(refusals)
    assert [_os_error(e, "x").outcome for e in outages] == [Outcome.UNAVAILABLE] * len(outages)


def test_an_object_the_store_refuses_is_given_up_after_archive_wait_s(tmp_path: Path):
    from diana.storage import StorageRefused

    def state(uid: str) -> dict:
        raise StorageRefused("object store: get k: InvalidObjectState (archived to cold storage)")

    worker, sender = _worker(tmp_path, state, wait_s=0.0)
    dead = _Dead()
    assert worker.deliver([_alert()], dead) is True
    assert sender.sent == [] and len(dead.letters) == 1 and "InvalidObjectState" in dead.letters[0]
