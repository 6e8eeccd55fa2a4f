"""Accept one Part-10 object: validate its header, land it durably, publish InstanceArrived.

Shared by the C-STORE SCP and bulk import. The order is the guarantee: bytes are fsync'd
before the event exists, and the caller hears success only after the broker acknowledged.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from diana.producers.header import InstanceHeader, InvalidIdentifiers, read_header
from diana.producers.landing import LandingStore
from diana.producers.publisher import EventPublisher
from diana.schemas.codec import Codec
from diana.schemas.topics import INSTANCES

__all__ = ["Ingest", "Accepted"]


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

    def accept(self, part10: bytes, source: str, calling_ae: str | None = None,
               called_ae: str | None = None, expected_sop_instance_uid: str | None = None) -> Accepted:
        """Raises HeaderError / InvalidIdentifiers (bad input), OSError (disk), PublishError (broker)."""
        header = read_header(part10)
        if expected_sop_instance_uid is not None and header.sop_instance_uid != expected_sop_instance_uid:
            # The file meta we store names the request's UID: the two must agree.
            raise InvalidIdentifiers("SOPInstanceUID differs from the C-STORE's Affected SOP Instance UID")
        stored = self.landing.put(part10)
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
            "received_at": datetime.now(timezone.utc),
            "source": source,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
        }
        value = self.codec.encode(INSTANCES.schema, event)
        latency = self.publisher.publish(INSTANCES.name, header.study_instance_uid.encode(), value)
        return Accepted(header, stored.sha256, stored.size, latency)
