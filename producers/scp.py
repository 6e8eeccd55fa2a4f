"""The DICOM receiver: a pynetdicom Storage SCP (and Verification SCP) in front of Ingest.

The C-STORE handler is small: what it returns *is* the DIMSE status, and each failure has
its own named status so that a modality knows whether to retry.
"""
from __future__ import annotations

import signal
import socket
import threading

import structlog
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from diana.config import Config
from diana.producers import metrics
from diana.producers.header import HeaderError, InvalidIdentifiers
from diana.producers.ingest import Ingest
from diana.producers.landing import LandingStore
from diana.producers.publisher import EventPublisher, PublishError
from diana.schemas.codec import default_codec

__all__ = ["Receiver", "handle_store", "STATUS"]

log = structlog.get_logger("diana.receiver")


class STATUS:
    """C-STORE statuses (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    # Refused: out of resources. Disk or broker trouble: the sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    # Error: data set does not match SOP class. Missing or malformed identifying UIDs.
    INVALID_DATASET = 0xA900
    # Error: cannot understand. The data set cannot be parsed.
    CANNOT_UNDERSTAND = 0xC210
    # Last resort for a failure nobody anticipated; the service keeps running.
    PROCESSING_FAILURE = 0xC211


def handle_store(event: evt.Event, ingest: Ingest) -> int:
    assoc = event.assoc
    calling_ae = assoc.requestor.ae_title
    context = {"assoc": assoc.native_id, "calling_ae": calling_ae}
    try:
        part10 = event.encoded_dataset(include_meta=True)
        accepted = ingest.accept(part10, "C_STORE", calling_ae=calling_ae, called_ae=assoc.acceptor.ae_title,
                                 expected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID))
    except InvalidIdentifiers as exc:
        metrics.REJECTED.labels("invalid_identifiers").inc()
        log.warning("store.rejected", reason="invalid identifiers", detail=str(exc), **context)
        return STATUS.INVALID_DATASET
    except HeaderError as exc:
        metrics.REJECTED.labels("undecodable").inc()
        log.warning("store.rejected", reason="undecodable", detail=str(exc), **context)
        return STATUS.CANNOT_UNDERSTAND
    except PublishError as exc:
        metrics.REJECTED.labels("broker").inc()
        log.error("store.rejected", reason="broker did not acknowledge", detail=str(exc), **context)
        return STATUS.OUT_OF_RESOURCES
    except OSError as exc:
        metrics.REJECTED.labels("storage").inc()
        log.error("store.rejected", reason="landing store write failed", detail=exc.strerror, **context)
        return STATUS.OUT_OF_RESOURCES
    except Exception:
        metrics.REJECTED.labels("internal").inc()
        log.exception("store.failed", **context)
        return STATUS.PROCESSING_FAILURE
    metrics.RECEIVED.inc()
    metrics.BYTES.inc(accepted.size)
    metrics.PUBLISH_LATENCY.observe(accepted.publish_latency_s)
    log.debug("store.accepted", sop_instance_uid=accepted.header.sop_instance_uid, **context)
    return STATUS.SUCCESS


def handle_echo(_event: evt.Event) -> int:
    return STATUS.SUCCESS


def _on_conn_open(event: evt.Event) -> None:
    # pynetdicom leaves Nagle on: small PDUs (the C-STORE response) would wait ~40 ms for an ACK.
    sock = event.assoc.dul.socket.socket
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_open_associations: set[int] = set()
_open_lock = threading.Lock()


def _on_established(event: evt.Event) -> None:
    with _open_lock:
        _open_associations.add(id(event.assoc))
    metrics.ASSOCIATIONS.inc()
    log.info("association.open", assoc=event.assoc.native_id, calling_ae=event.assoc.requestor.ae_title,
             peer=event.assoc.requestor.address)


def _on_closed(event: evt.Event) -> None:
    with _open_lock:
        if id(event.assoc) not in _open_associations:
            return  # rejected or aborted before it was established
        _open_associations.discard(id(event.assoc))
    metrics.ASSOCIATIONS.dec()
    log.info("association.closed", assoc=event.assoc.native_id)


class Receiver:
    """Wiring: one AE, one shared publisher, one landing store."""

    def __init__(self, config: Config):
        self.cfg = config.receiver
        self.landing = LandingStore(config.path(config.storage.landing_dir))
        self.publisher = EventPublisher(config.kafka.bootstrap, config.kafka.publish_timeout_s)
        self.ingest = Ingest(self.landing, self.publisher, default_codec())
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for large objects
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server = None
        self._stopped = threading.Event()

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, handle_store, [self.ingest]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_CONN_OPEN, _on_conn_open),
            (evt.EVT_ESTABLISHED, _on_established),
            (evt.EVT_RELEASED, _on_closed),
            (evt.EVT_ABORTED, _on_closed),
        ]
        self.server = self.ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers)
        log.info("receiver.listening", ae_title=self.cfg.ae_title, host=self.cfg.host, port=self.cfg.port,
                 landing=str(self.landing.root))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.publisher.close()
        self._stopped.set()
        log.info("receiver.stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        self._stopped.wait()
