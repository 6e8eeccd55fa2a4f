"""Accept one Part-10 object: validate its header, land it durably, publish InstanceArrived.

Shared by the C-STORE SCP, bulk import and start-up recovery. The order is the guarantee:
bytes are fsync'd before the event exists, and the caller hears success only after the
broker acknowledged. An event therefore never points at bytes that do not exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from diana.durable import sha256_file
from diana.producers import metrics
from diana.producers.header import HeaderError, InstanceHeader, InvalidIdentifiers, read_header_file
from diana.producers.inflate import DEFAULT_MAX_INFLATED_BYTES
from diana.producers.landing import LandingStore, StoredObject
from diana.producers.publisher import EventPublisher, PublishRefused
from diana.schemas.codec import Codec
from diana.schemas.topics import INSTANCES

__all__ = ["Ingest", "Accepted", "header_budget"]

log = structlog.get_logger("diana.ingest")


# Room in an event for everything but the header (UIDs, search fields, the omitted list).
_EVENT_ROOM = 256 * 1024


def header_budget(max_message_bytes: int) -> int:
    """Bytes of DICOM JSON an event may carry under the producer's (and topic's) message limit."""
    return max(max_message_bytes - _EVENT_ROOM, max_message_bytes // 2)


@dataclass(frozen=True)
class Accepted:
    header: InstanceHeader
    sha256: str
    size: int
    publish_latency_s: float


class Ingest:
    def __init__(
        self,
        landing: LandingStore,
        publisher: EventPublisher,
        codec: Codec,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    ):
        self.landing = landing
        self.max_inflated_bytes = max_inflated_bytes
        self.publisher = publisher
        self.codec = codec
        self.header_budget = header_budget(publisher.max_message_bytes)

    def accept_file(
        self,
        path: Path,
        source: str,
        *,
        owned: bool,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
        synced_digest: Callable[[], tuple[str, int]] | None = None,
    ) -> Accepted:
        """Raises HeaderError / InvalidIdentifiers (bad input), OSError (disk), PublishError (broker).

        ``synced_digest``: called once the header is read, returns the (SHA-256, size) of ``path``
        when it is fsync'd (the receiver hashes while the bytes arrive, and fsyncs while the header is
        read); otherwise the landing store reads the file to hash it.
        ``owned`` False (a user's file, imported): the file is copied into the landing store's .incoming
        first, hashed as it is copied, and the header is read from that copy, so that the event's header,
        its sha256 and the landed bytes are the same bytes even when the file is rewritten meanwhile.
        """
        if not owned:
            with self.landing.private_copy(path) as (copy, copied):
                return self.accept_file(
                    copy,
                    source,
                    owned=True,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    expected_sop_instance_uid=expected_sop_instance_uid,
                    expected_sop_class_uid=expected_sop_class_uid,
                    synced_digest=lambda: copied,
                )
        header = read_header_file(path, self.header_budget, self.max_inflated_bytes, self.landing.incoming)
        _log_omitted(header)
        if expected_sop_instance_uid is not None and header.sop_instance_uid != expected_sop_instance_uid:
            # The file meta we store names the request's UID: the two must agree.
            raise InvalidIdentifiers("SOPInstanceUID differs from the C-STORE's Affected SOP Instance UID")
        if expected_sop_class_uid is not None and header.sop_class_uid != expected_sop_class_uid:
            # Stored under the negotiated SOP Class, the object would claim to be what it is not.
            raise InvalidIdentifiers("SOPClassUID differs from the SOP Class negotiated for this presentation context")
        digest = synced_digest() if synced_digest is not None else None
        with self.landing.landed(path, owned=owned, synced_digest=digest) as stored:
            return self._publish(header, stored, source, calling_ae, called_ae, datetime.now(UTC))

    def _publish(
        self,
        header: InstanceHeader,
        stored: StoredObject,
        source: str,
        calling_ae: str | None,
        called_ae: str | None,
        received_at: datetime,
    ) -> Accepted:
        event = {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            **header.fields,
            "size_bytes": stored.size,
            "sha256": stored.sha256,
            "landing_path": stored.relative_path,  # the key, for readers of InstanceArrived before v4
            "landing_uri": stored.uri,
            "received_at": received_at,
            "source": source,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
        }
        key = header.study_instance_uid.encode()
        try:
            latency = self.publisher.publish(INSTANCES.name, key, self.codec.encode(INSTANCES.value_schema, event))
        except PublishRefused as exc:
            if not event.get("header_json"):
                metrics.PUBLISH_REFUSED.labels(exc.code).inc()
                raise
            # The broker holds a smaller limit than ours: the object is still stored, its event
            # goes without the header, which stays readable in the archived object.
            log.warning("publish.header_dropped", code=exc.code, sop_instance_uid=header.sop_instance_uid)
            metrics.HEADER_OMITTED.labels("event_refused").inc()
            event["header_json"] = None
            event["header_omitted"] = [
                {"path": "", "reason": f"the broker refused the event with its header ({exc.code})"}
            ]
            try:
                latency = self.publisher.publish(INSTANCES.name, key, self.codec.encode(INSTANCES.value_schema, event))
            except PublishRefused as again:
                metrics.PUBLISH_REFUSED.labels(again.code).inc()
                raise
        return Accepted(header, stored.sha256, stored.size, latency)

    def republish_landed(self, older_than_s: float = 0.0, skip: Callable[[str], bool] | None = None) -> list[str]:
        """Publish an event for every object still in the landing store (the outbox step); return their paths.

        Run at start-up: an object landed just before a crash may have no event. Objects whose
        event did go out are published again; every consumer is idempotent on the SOP Instance UID.
        Run periodically too (``older_than_s``: only objects landed that long ago; ``skip``: paths
        already republished): objects being received or published right now are never touched.
        """
        published: list[str] = []
        cutoff = time.time() - older_than_s
        for relative, landed_at in self.landing.landed_objects():
            if landed_at > cutoff or self.landing.in_flight(relative) or (skip is not None and skip(relative)):
                continue
            try:
                with self.landing.local_copy(relative) as path:
                    header = read_header_file(path, self.header_budget, self.max_inflated_bytes, self.landing.incoming)
                    digest, size = sha256_file(path)
                received = datetime.fromtimestamp(landed_at, tz=UTC)
            except FileNotFoundError:
                continue  # archived (and removed) meanwhile: its event went out
            except (HeaderError, InvalidIdentifiers) as exc:
                log.error("recover.unreadable", landing_path=relative, detail=str(exc))
                continue
            except OSError as exc:  # this object's read failed (EIO, the store): the others are still tried
                log.error("recover.read_failed", landing_path=relative, error=type(exc).__name__, errno=exc.errno)
                continue
            if relative != f"{digest[:2]}/{digest}.dcm":
                log.error("recover.corrupt", landing_path=relative, sha256=digest)
                continue
            stored = StoredObject(relative, digest, size, self.landing.uri(relative))
            try:
                self._publish(header, stored, "RECOVERED", None, None, received)
            except PublishRefused as exc:  # retrying cannot help; the object stays for an operator
                log.error("recover.refused", landing_path=relative, code=exc.code, detail=str(exc))
                continue
            published.append(relative)
        return published


def _log_omitted(header: InstanceHeader) -> None:
    """Name (never show) the elements left out of the event's header."""
    omitted = header.fields.get("header_omitted") or []
    for item in omitted:
        metrics.HEADER_OMITTED.labels(item["reason"].split(":", 1)[0]).inc()
    if omitted:
        log.info(
            "header.omitted",
            sop_instance_uid=header.sop_instance_uid,
            elements=[f"{o['path']} ({o['reason']})" for o in omitted[:20]],
            count=len(omitted),
        )
