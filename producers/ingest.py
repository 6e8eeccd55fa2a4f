"""Accept one Part-10 object: validate its header, land it durably, publish InstanceArrived.

Shared by the C-STORE SCP, bulk import and start-up recovery. The order is the guarantee:
bytes are fsync'd before the event exists, and the caller hears success only after the
broker acknowledged. An event therefore never points at bytes that do not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from diana.durable import sha256_file
from diana.producers.header import HeaderError, InstanceHeader, InvalidIdentifiers, read_header_file
from diana.producers.landing import LandingStore, StoredObject
from diana.producers.publisher import EventPublisher
from diana.schemas.codec import Codec
from diana.schemas.topics import INSTANCES

__all__ = ["Ingest", "Accepted"]

log = structlog.get_logger("diana.ingest")


@dataclass(frozen=True)
class Accepted:
    header: InstanceHeader
    sha256: str
    size: int
    publish_latency_s: float


class Ingest:
    def __init__(self, landing: LandingStore, publisher: EventPublisher, codec: Codec):
        self.landing = landing
        self.publisher = publisher
        self.codec = codec

    def accept_file(
        self,
        path: Path,
        source: str,
        *,
        owned: bool,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        expected_sop_instance_uid: str | None = None,
    ) -> Accepted:
        """Raises HeaderError / InvalidIdentifiers (bad input), OSError (disk), PublishError (broker)."""
        header = read_header_file(path)
        if expected_sop_instance_uid is not None and header.sop_instance_uid != expected_sop_instance_uid:
            # The file meta we store names the request's UID: the two must agree.
            raise InvalidIdentifiers("SOPInstanceUID differs from the C-STORE's Affected SOP Instance UID")
        with self.landing.landed(path, owned=owned) as stored:
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
            "landing_path": stored.relative_path,
            "received_at": received_at,
            "source": source,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
        }
        value = self.codec.encode(INSTANCES.value_schema, event)
        latency = self.publisher.publish(INSTANCES.name, header.study_instance_uid.encode(), value)
        return Accepted(header, stored.sha256, stored.size, latency)

    def republish_landed(self) -> int:
        """Publish an event for every object still in the landing store (the outbox step).

        Run at start-up: an object landed just before a crash may have no event. Objects whose
        event did go out are published again; every consumer is idempotent on the SOP Instance UID.
        """
        count = 0
        for relative, path in self.landing.stored_objects():
            try:
                header = read_header_file(path)
                digest, size = sha256_file(path)
                received = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
            except FileNotFoundError:
                continue  # archived (and removed) meanwhile: its event went out
            except (HeaderError, InvalidIdentifiers) as exc:
                log.error("recover.unreadable", landing_path=relative, detail=str(exc))
                continue
            if digest != path.stem:
                log.error("recover.corrupt", landing_path=relative, sha256=digest)
                continue
            stored = StoredObject(relative, digest, size)
            self._publish(header, stored, "RECOVERED", None, None, received)
            count += 1
        return count
