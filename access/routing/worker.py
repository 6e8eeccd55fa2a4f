"""One destination's routing loop: its own consumer group, so a slow or absent destination holds back no other.

Per consumed batch: each message is matched against the destination's rules and becomes the archived
instances to send (none when nothing matches). They are sent; an instance the destination refuses is
tried again with backoff and, after ``max_attempts`` refusals, dead-lettered (``dicom.deadletter``) with
the destination's status; while the destination does not answer at all, everything is tried again,
without limit and without committing, so nothing is lost while it is down. Offsets are committed only
once every message of the batch was delivered or dead-lettered (at least once: after a crash a batch
may be sent again, which a DICOM peer takes as the same SOP Instance UID).

An instance is sent from the ARCHIVE, which the archive sink writes after the event: one not archived
yet is waited for (up to ``[routing] archive_wait_s``, then dead-lettered as missing).

A study routed whole is sent at each of its complete records (COMPLETED, or AMENDED with every series
complete again after late instances), each time only the instances the destination's record (sent.py)
does not list: an amended study sends its late instances, not the whole study again. A dose alert's
study is sent the same way, from the same record: each alert (a study raises several, and the dose
worker re-publishes them after a crash or in a replay) sends only what the destination was not sent
yet, by its whole_study or its dose_alert rules alike (the same objects to the same place). Once an
alert of a study was delivered, the study's later complete records (AMENDED: late instances) send its
late instances by the dose_alert rules too, as whole_study rules send theirs: a destination with
dose_alert rules also consumes dicom.studies. The plain rules of a destination that has whole_study or
dose_alert rules share that record: an instance sent on its arrival is not sent again by the study's
alert or completion, nor one they sent on its (later consumed) arrival with the same bytes (the record
keeps each instance's SHA-256: a corrected copy archived under REPLACE goes on its own arrival). Only
instances the destination accepted are recorded: one dead-lettered is tried again by the study's next
completion or alert.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import structlog
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge

from diana.access.routing.rules import Destination, Rule
from diana.access.routing.senders import Delivery, Outcome, Result, Sender
from diana.access.routing.sent import StudiesSent
from diana.clients import kafka_consumer
from diana.config import KafkaConfig
from diana.durable import sha256_file
from diana.schemas.codec import default_codec
from diana.schemas.layout import archive_path
from diana.schemas.topics import DOSE_ALERTS, INSTANCES, STUDIES
from diana.schemas.uid import is_valid_uid
from diana.sinks.consumer import DeadLetters, RetryableError, commit_written_or_log, failure_reason, log_failed_commits
from diana.storage import ObjectStore, StorageError, StorageRefused, local_file

__all__ = ["IndexUnavailable", "RouteWorker", "WorkerSettings", "study_files", "rule_topics"]

log = structlog.get_logger("diana.route")

SENT = Counter("diana_route_sent_total", "Instances a destination accepted", ["destination"])
REFUSED = Counter("diana_route_refusals_total", "Sends a destination refused (each attempt)", ["destination"])
ROUTE_DEAD = Counter("diana_route_deadletters_total", "Instances dead-lettered for a destination", ["destination"])
UNAVAILABLE = Counter(
    "diana_route_unavailable_total", "Attempts that found the destination unreachable", ["destination"]
)
LAG = Gauge(
    "diana_route_lag", "Messages of the destination's topics not yet routed (its consumer group's lag)", ["destination"]
)
UP = Gauge("diana_route_destination_up", "1 when the destination answered its last attempt", ["destination"])

# What each kind of rule consumes: dose_alert rules also the study records, which send the late
# instances of a study alerted before.
TRIGGER_TOPICS = {"instance": (INSTANCES,), "study": (STUDIES,), "alert": (DOSE_ALERTS, STUDIES)}


def rule_topics(rules: Collection[Rule]) -> list[str]:
    """The topics a destination with these rules consumes, sorted."""
    return sorted({topic.name for r in rules for topic in TRIGGER_TOPICS[r.trigger]})


# How often a running worker removes the records older than sent_record_retention_s.
PRUNE_INTERVAL_S = 3600.0

_HEADER_TAGS = ["Modality", "StationName", "SOPClassUID", "BodyPartExamined", "StudyDescription"]


@dataclass(frozen=True)
class WorkerSettings:
    group_id: str
    archive: ObjectStore
    max_attempts: int
    max_backoff_s: float = 60.0
    archive_wait_s: float = 600.0
    batch_size: int = 100
    start_from_earliest: bool = False
    # The folder of the destination's record of what it was sent of each study, kept when it has a
    # whole_study or a dose_alert rule and shared by its plain rules then (sent.py); None: kept in
    # memory only, lost at a restart.
    sent_dir: Path | None = None
    # Records not written for this long are removed (at start, then every PRUNE_INTERVAL_S); 0: kept for ever.
    sent_record_retention_s: float = 0.0


@dataclass
class _Pending:
    msg: Message
    since: float = field(default_factory=time.monotonic)
    items: list[Delivery] | None = None  # None: not planned yet (its files are not all archived)
    waiting_for: str = ""


def study_files(archive: ObjectStore, study_uid: str, series_uids: list[str] | None = None) -> list[Delivery]:
    """Every archived instance of a study (of the given series, or of every series), by layout's names."""
    if not is_valid_uid(study_uid):
        return []
    by_series: dict[str, list[str]] = {}
    for key in archive.list(f"{study_uid}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2].endswith(".dcm"):
            by_series.setdefault(parts[1], []).append(parts[2].removesuffix(".dcm"))
    out = []
    for series in sorted(by_series) if series_uids is None else series_uids:
        if not is_valid_uid(series):
            continue
        for sop in sorted(by_series.get(series, [])):
            if is_valid_uid(sop):  # KEEP_BOTH versions (<SOP>.<sha>.dcm) are left out
                out.append(Delivery(study_uid, series, sop, archive_path(study_uid, series, sop)))
    return out


def _header(path: Path) -> dict[str, Any]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    return {
        "modality": ds.get("Modality"),
        "station_name": ds.get("StationName"),
        "sop_class_uid": ds.get("SOPClassUID"),
        "body_part_examined": ds.get("BodyPartExamined"),
        "study_description": ds.get("StudyDescription"),
    }


class IndexUnavailable(Exception):
    """The index does not answer a study's state: wait, as for an archive that does not answer."""


def _complete(study: dict[str, Any]) -> bool:
    """Every series of the study complete, at its first completion or after a late amendment (a dose
    report that came after the images' quiet time makes the study AMENDED, and it stays so)."""
    if study.get("status") not in ("COMPLETED", "AMENDED"):
        return False
    return int(study.get("completed_series_count") or 0) >= int(study.get("series_count") or 0)


class RouteWorker:
    def __init__(
        self,
        kafka: KafkaConfig,
        destination: Destination,
        rules: list[Rule],
        sender: Sender,
        settings: WorkerSettings,
        stop: threading.Event,
        study_state: Callable[[str], dict[str, Any] | None] | None = None,
    ):
        """``study_state``: a study's latest aggregate (status, series, instance count) or None, for alert rules."""
        self.kafka, self.destination, self.rules = kafka, destination, rules
        self.study_state = study_state
        self._consumer: Any = None
        self.sender, self.settings, self.stop = sender, settings, stop
        self.codec = default_codec()
        self.name = destination.name
        self.studies_sent = StudiesSent(self.name, settings.sent_dir, settings.sent_record_retention_s)
        self.topics = rule_topics(rules)
        # A destination with whole_study or dose_alert rules keeps a record of what it was sent of each
        # study (sent.py); its plain rules read and write it too, so that whichever rule matched an
        # instance, the destination gets it once. A destination with plain rules only keeps none.
        self._shares_record = any(r.trigger in ("study", "alert") for r in rules)
        # Beside plain rules the record keeps the SHA-256 of each instance the study rules send (the plain
        # rules compare their events' with it: a corrected copy goes); without them it is not computed.
        self._digests = self._shares_record and any(r.trigger == "instance" for r in rules)
        for metric in (SENT, REFUSED, ROUTE_DEAD, UNAVAILABLE):
            metric.labels(self.name)

    # --- what a message asks to send ------------------------------------------------------------
    def plan(self, msg: Message) -> tuple[list[Delivery] | None, str]:
        """(deliveries, "") when ready; (None, what it waits for) when its files are not archived yet."""
        topic = msg.topic()
        if topic == INSTANCES.name:
            _, event = self.codec.decode(msg.value(), expect=INSTANCES.value_schema)
            if not any(r.matches(event) for r in self.rules if r.trigger == "instance"):
                return [], ""
            study, series, sop = event["study_instance_uid"], event["series_instance_uid"], event["sop_instance_uid"]
            item = Delivery(study, series, sop, archive_path(study, series, sop))
            # These bytes sent already by the destination's whole_study or dose_alert rules (or by this
            # rule, in a replay): not again. Other bytes (a corrected copy under REPLACE), or a digest
            # not known (a record of an earlier version): sent. Sent now: recorded once delivered, so
            # that those rules do not send it again.
            sha256 = event["sha256"]
            if self._shares_record and self.studies_sent.sent_as(study, sop, sha256):
                return [], ""
            if not self.settings.archive.exists(item.key):
                return None, f"instance {sop} not archived yet"
            if self._shares_record:
                self.studies_sent.claim(study, {sop: sha256})
            return [item], ""
        if topic == STUDIES.name:
            _, study = self.codec.decode(msg.value(), expect=STUDIES.value_schema)
            # An AMENDED record with a series still open (late instances not quiet yet) waits for the
            # next; one complete again sends what the destination was not sent (the late instances).
            if not _complete(study):
                return [], ""
            triggers = {r.trigger for r in self.rules} & {"study"}
            if "alert" in {r.trigger for r in self.rules} and self.studies_sent.alerted(study["study_instance_uid"]):
                triggers.add("alert")  # its late instances follow the alert that sent the study
            if not triggers:
                return [], ""  # no rule of this record's: the archive is not listed
            return self._unsent_matching(study, triggers)
        if topic == DOSE_ALERTS.name:
            _, alert = self.codec.decode(msg.value(), expect=DOSE_ALERTS.value_schema)
            if alert.get("superseded_by"):
                return [], ""  # a withdrawal (docs/DOSE.md): no reason to send the study
            uid = alert["study_instance_uid"]
            # An alert may come before the study's last images: wait until the study is complete
            # (its aggregate, as indexed) and all its instances are archived.
            study = self.study_state(uid) if self.study_state else None
            if study is None or not _complete(study):
                return None, f"study {uid} of alert {alert['alert_id']} not complete yet"
            # Another alert of the study (or this one again) sends only what was not sent yet.
            items, waiting = self._unsent_matching({**study, "study_instance_uid": uid}, {"alert"})
            if items is not None:
                self.studies_sent.claim_alert(uid)
            return items, waiting
        return [], ""

    def _unsent_matching(self, study: dict[str, Any], triggers: set[str]) -> tuple[list[Delivery] | None, str]:
        """The study's matching instances the destination's record does not list, claimed for this batch
        (recorded once delivered); whole_study and dose_alert rules share the record. An instance listed
        is not sent again by them, whatever its digest: they send no corrected copy (its arrival event
        does, by a plain rule that matches it)."""
        uid = study["study_instance_uid"]
        found, waiting = self._matching_archived(study, triggers, self.studies_sent.sent(uid))
        if found is None:
            return None, waiting
        if found:
            self.studies_sent.claim(uid, {item.sop_instance_uid: digest for item, digest in found})
        return [item for item, _ in found], ""

    def _matching_archived(
        self, study: dict[str, Any], triggers: set[str], sent: Collection[str]
    ) -> tuple[list[tuple[Delivery, str | None]] | None, str]:
        """(the archived instance, its SHA-256 when the record keeps it) of each of the study's archived
        instances not in ``sent`` that a rule of one of ``triggers`` matches; (None, why) until every
        instance the aggregate counts is archived."""
        uid, count = study["study_instance_uid"], int(study.get("instance_count") or 0)
        files = study_files(self.settings.archive, uid, study.get("series_instance_uids"))
        if len(files) < count:
            return None, f"study {uid}: {len(files)} of {count} archived"
        rules = [r for r in self.rules if r.trigger in triggers]
        found: list[tuple[Delivery, str | None]] = []
        for f in files:
            if f.sop_instance_uid in sent:
                continue
            # The header read (on S3 the object comes whole into a temp file) and, for the record, the
            # digest of the same bytes: the file is at hand once.
            with local_file(self.settings.archive, f.key) as path:
                if any(r.matches(_header(path)) for r in rules):
                    found.append((f, sha256_file(path)[0] if self._digests else None))
        return found, ""

    def _plan_pending(self, pending: list[_Pending], dead: DeadLetters) -> None:
        # A batch's alerts first: a study record after them in the batch knows the study was alerted
        # (its late instances go with it), whichever came first in the topics.
        for p in sorted(pending, key=lambda p: p.msg.topic() != DOSE_ALERTS.name):
            if p.items is not None:
                continue
            try:
                items, waiting = self.plan(p.msg)
            except StorageRefused as exc:  # the store answered no for this object (access denied, cold storage)
                items, waiting = None, f"the archive: {exc}"
            except (StorageError, IndexUnavailable, ConnectionError, TimeoutError) as exc:
                # The object store or the index does not answer (an S3 503, OpenSearch down): not the
                # message's fault; waited for as long as it lasts, not counted toward archive_wait_s.
                p.since = time.monotonic()
                if p.waiting_for != (waiting := f"{type(exc).__name__} from the archive or the index"):
                    p.waiting_for = waiting
                    log.warning("route.store_unavailable", destination=self.name, error=type(exc).__name__)
                continue
            except OSError as exc:  # the archive's files (a permission, a bad sector): may be fixed, or not
                items, waiting = None, f"the archive: {type(exc).__name__}"
            except Exception as exc:  # not decodable, or an archived file pydicom cannot read: never a stuck worker
                dead.send(p.msg, failure_reason(f"route {self.name}", exc))
                ROUTE_DEAD.labels(self.name).inc()
                p.items = []
                continue
            if items is not None:
                p.items = items
            elif time.monotonic() - p.since > self.settings.archive_wait_s:
                dead.send(p.msg, f"route {self.name}: gave up waiting: {waiting}")
                ROUTE_DEAD.labels(self.name).inc()
                p.items = []
            elif waiting != p.waiting_for:
                p.waiting_for = waiting
                log.info("route.waiting_for_archive", destination=self.name, waiting_for=waiting)

    # --- sending until every message is done ------------------------------------------------------
    def deliver(self, messages: list[Message], dead: DeadLetters) -> bool:
        """Deliver (or dead-letter) everything the messages ask for; False if stopped first."""
        pending = [_Pending(m) for m in messages]
        # Claims of a batch that was not delivered (stopped, or failed in the middle) were sent not for sure.
        self.studies_sent.forget_claimed()
        attempts = self.destination.max_attempts or self.settings.max_attempts
        backoff = 0.5
        while True:
            self._plan_pending(pending, dead)
            owners = [(p, item) for p in pending if p.items for item in p.items]
            if owners:
                try:
                    results = self.sender.send([item for _, item in owners], self.settings.archive)
                except Exception as exc:  # a sender's own failure: nothing is known to be sent; try again
                    log.exception("route.send_failed", destination=self.name)
                    results = [Result(Outcome.UNAVAILABLE, f"sender failed: {type(exc).__name__}")] * len(owners)
                for (p, item), result in zip(owners, results, strict=True):
                    assert p.items is not None
                    if result.outcome is Outcome.DELIVERED:
                        SENT.labels(self.name).inc()
                        self.studies_sent.delivered(item.study_instance_uid, item.sop_instance_uid)
                        p.items.remove(item)
                    elif result.outcome is Outcome.FAILED:
                        REFUSED.labels(self.name).inc()
                        item.failures += 1
                        now = time.monotonic()
                        if item.first_refused_at is None:
                            item.first_refused_at = now
                        log.warning(
                            "route.refused", destination=self.name, sop=item.sop_instance_uid, status=result.status
                        )
                        # Out of room: tried (with backoff) for at least archive_wait_s, a full disk freed
                        # in the meantime loses nothing; then given up as any refusal (said of one object for good).
                        # Dead-lettered, it is not recorded as sent: the study's next completion or alert tries it again.
                        patient = result.out_of_resources and now - item.first_refused_at < self.settings.archive_wait_s
                        if item.failures >= attempts and not patient:
                            dead.send(
                                p.msg,
                                f"route {self.name}: {item.sop_instance_uid} refused {item.failures} times; "
                                f"last: {result.status}"[:1000],
                            )
                            ROUTE_DEAD.labels(self.name).inc()
                            p.items.remove(item)
                    else:
                        UNAVAILABLE.labels(self.name).inc()
                unreachable = [r for r in results if r.outcome is Outcome.UNAVAILABLE]
                UP.labels(self.name).set(0 if len(unreachable) == len(results) else 1)
                if unreachable:
                    log.warning("route.unavailable", destination=self.name, reason=unreachable[0].status)
            if all(p.items == [] for p in pending):
                try:
                    dead.flush()
                    self.studies_sent.write_delivered()  # before the commit: a replay sends none of it again
                    return True
                except RetryableError as exc:
                    log.warning("route.deadletter_retry", destination=self.name, reason=str(exc))
            if self.stop.is_set():
                dead.discard()
                return False
            self.stop.wait(backoff)
            backoff = min(backoff * 2, self.settings.max_backoff_s)
            if self._consumer is not None:
                self._update_lag(self._consumer)  # the lag grows while the destination is down: show it

    # --- the loop -----------------------------------------------------------------------------------
    def _update_lag(self, consumer: Any) -> None:
        try:
            assigned = consumer.assignment()
            if not assigned:
                return
            lag = 0
            for tp in consumer.committed(assigned, timeout=10):
                low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
                lag += high - max(tp.offset, low) if tp.offset >= 0 else high - low
            LAG.labels(self.name).set(lag)
        except KafkaException as exc:
            log.warning("route.lag_unknown", destination=self.name, error=str(exc))

    def _start_new_topics_now(self, consumer: Any) -> None:
        """A topic on which the group has no position yet starts at its end, committed before the
        worker joins the group: a new destination gets what arrives from now on, not the whole
        archive (`diana replay` of its group backfills on purpose)."""
        metadata = consumer.list_topics(timeout=30)
        for topic in self.topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                continue  # not created yet: it will hold only what arrives from now on
            partitions = [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]
            if any(tp.offset >= 0 for tp in consumer.committed(partitions, timeout=30)):
                continue
            ends = [
                TopicPartition(topic, tp.partition, consumer.get_watermark_offsets(tp, timeout=30)[1])
                for tp in partitions
            ]
            consumer.commit(offsets=ends, asynchronous=False)
            log.info("route.new_topic_starts_now", destination=self.name, topic=topic)

    def run(self) -> None:
        earliest = self.settings.start_from_earliest
        consumer = kafka_consumer(
            self.kafka,
            self.settings.group_id,
            {
                "enable.auto.commit": False,
                # a partition with no committed position (created after the group began) is read whole
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                # A destination may be down for hours: the worker stays in its group meanwhile.
                "max.poll.interval.ms": 24 * 3600 * 1000,
                "on_commit": log_failed_commits(log, "route.commit_failed", destination=self.name),
            },
        )
        self._consumer = consumer
        dead = DeadLetters(self.kafka, f"route-{self.name}")
        if not earliest:
            self._start_new_topics_now(consumer)
        consumer.subscribe(self.topics)
        log.info("route.started", destination=self.name, group=self.settings.group_id, topics=self.topics)
        last_lag = 0.0
        self.studies_sent.prune()
        last_prune = time.monotonic()
        try:
            while not self.stop.is_set():
                if time.monotonic() - last_lag > 5:
                    self._update_lag(consumer)
                    last_lag = time.monotonic()
                if time.monotonic() - last_prune > PRUNE_INTERVAL_S:
                    self.studies_sent.prune()
                    last_prune = time.monotonic()
                batch = []
                for msg in consumer.consume(self.settings.batch_size, timeout=0.5):
                    err = msg.error()
                    if err is None:
                        batch.append(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("route.consume_error", destination=self.name, error=err.str())
                if not batch:
                    continue
                if not self.deliver(batch, dead):
                    log.info("route.stopping_uncommitted", destination=self.name, messages=len(batch))
                    return
                # As the sinks commit: asynchronously, at the positions taken now. A synchronous commit
                # can wait for ever inside librdkafka after a broker restart (confluent-kafka-python
                # issue 1801), and this worker has no other way out of it; a commit lost so lets a batch
                # come again, which a destination takes as the same SOP Instance UIDs.
                commit_written_or_log(consumer, log, "route.commit_failed", destination=self.name)
        finally:
            consumer.close()
            self.sender.close()
            log.info("route.stopped", destination=self.name)
