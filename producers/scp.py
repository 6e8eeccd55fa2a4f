"""The DICOM receiver: a pynetdicom Storage SCP (and Verification SCP) in front of Ingest.

The C-STORE handler is small: what it returns *is* the DIMSE status, and each failure has
its own named status so that a modality knows whether to retry. Data sets are received
in chunks straight to a file on the landing filesystem, never held whole in memory.
"""

from __future__ import annotations

import signal
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import structlog
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.sop_class import Verification

from diana.config import Config, ReceiverConfig
from diana.producers import metrics
from diana.producers.header import HeaderError, InvalidIdentifiers
from diana.producers.ingest import Ingest
from diana.producers.landing import LandingStore
from diana.producers.publisher import EventPublisher, PublishError
from diana.schemas.codec import default_codec

__all__ = ["Receiver", "association_handlers", "handle_echo", "handle_store", "tls_context", "STATUS"]

log = structlog.get_logger("diana.receiver")

# Write each incoming data set to a temporary file as its fragments arrive.
_config.STORE_RECV_CHUNKED_DATASET = True


class _SpillFile:
    """pynetdicom's temporary file for a data set being received, made safe on a full disk.

    pynetdicom writes fragments straight from its state machine: an OSError there (ENOSPC) killed
    the association's reactor thread, the sender waited for a timeout, the half-written file stayed
    and the thread leaked. Here a failed write removes the file and swallows the rest of the
    transfer; the C-STORE then answers 0xA700 (out of resources), and the sender retries later.
    """

    failed: set[str] = set()
    _lock = threading.Lock()

    def __init__(self, **kwargs):
        self._file = tempfile.NamedTemporaryFile(**kwargs)
        self.name = self._file.name
        self.is_failed = False

    @property
    def file(self) -> _SpillFile:  # pynetdicom calls .file.flush()
        return self

    def _fail(self, exc: OSError) -> None:
        self.is_failed = True
        with self._lock:
            self.failed.add(self.name)
        try:
            self._file.close()
        except OSError:
            pass
        Path(self.name).unlink(missing_ok=True)
        log.error("store.spill_failed", detail=exc.strerror)

    def write(self, data: bytes) -> int:
        if not self.is_failed:
            try:
                return self._file.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if not self.is_failed:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if not self.is_failed:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    @classmethod
    def take_failure(cls, path: object) -> bool:
        with cls._lock:
            if str(path) in cls.failed:
                cls.failed.discard(str(path))
                return True
        return False


_dimse_messages.NamedTemporaryFile = _SpillFile


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


class REJECT:
    """A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4."""

    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # permanent, service user


def handle_store(event: evt.Event, ingest: Ingest) -> int:
    assoc = event.assoc
    calling_ae = assoc.requestor.ae_title
    context = {"assoc": assoc.native_id, "calling_ae": calling_ae}
    if _SpillFile.take_failure(event.dataset_path):
        metrics.REJECTED.labels("storage").inc()
        log.error("store.rejected", reason="landing store write failed while receiving", **context)
        return STATUS.OUT_OF_RESOURCES
    try:
        accepted = ingest.accept_file(
            event.dataset_path,
            "C_STORE",
            owned=True,
            calling_ae=calling_ae,
            called_ae=assoc.acceptor.ae_title,
            expected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        )
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


def _on_requested(event: evt.Event, cfg: ReceiverConfig) -> None:
    """Refuse callers outside the allow-lists with an A-ASSOCIATE-RJ, and say why in the log."""
    assoc = event.assoc
    calling_ae = assoc.requestor.primitive.calling_ae_title.strip()
    host = assoc.requestor.address
    reason = None
    if cfg.allowed_calling_aes and calling_ae not in cfg.allowed_calling_aes:
        reason = "calling AE title not in allowed_calling_aes"
    elif cfg.allowed_hosts and host not in cfg.allowed_hosts:
        reason = "host not in allowed_hosts"
    if reason:
        metrics.REJECTED_ASSOCIATIONS.labels("not_allowed").inc()
        log.warning("association.rejected", reason=reason, calling_ae=calling_ae, peer=host)
        assoc.acse.send_reject(*REJECT.CALLING_AE_NOT_RECOGNISED)
        assoc.kill()


_open_associations: set[int] = set()
_open_lock = threading.Lock()


def _on_established(event: evt.Event) -> None:
    with _open_lock:
        _open_associations.add(id(event.assoc))
    metrics.ASSOCIATIONS.inc()
    log.info(
        "association.open",
        assoc=event.assoc.native_id,
        calling_ae=event.assoc.requestor.ae_title,
        peer=event.assoc.requestor.address,
    )


def _on_rejected(event: evt.Event) -> None:
    # pynetdicom's own rejections: over maximum_associations
    metrics.REJECTED_ASSOCIATIONS.labels("limit").inc()
    log.warning("association.rejected", reason="maximum_associations reached", peer=event.assoc.requestor.address)


def _on_closed(event: evt.Event) -> None:
    with _open_lock:
        if id(event.assoc) not in _open_associations:
            return  # rejected or aborted before it was established
        _open_associations.discard(id(event.assoc))
    metrics.ASSOCIATIONS.dec()
    log.info("association.closed", assoc=event.assoc.native_id)


def _discard_partial(event: evt.Event) -> None:
    """An association that ends mid-transfer leaves a half-received data set file: remove it now."""
    message = getattr(event.assoc.dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is not None:
        try:
            handle.close()
        except OSError:
            pass  # closing flushes: on a full disk that fails too, and the file must go all the same
        try:
            Path(handle.name).unlink(missing_ok=True)
            log.warning("store.incomplete", assoc=event.assoc.native_id, reason="association ended mid-transfer")
        except OSError:
            pass  # the sweeper removes it later


def tls_context(cfg: ReceiverConfig) -> ssl.SSLContext | None:
    if not (cfg.tls_cert_file or cfg.tls_key_file):
        return None
    if not (cfg.tls_cert_file and cfg.tls_key_file):
        raise ValueError("[receiver] TLS needs both tls_cert_file and tls_key_file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    if cfg.tls_ca_file:
        ctx.load_verify_locations(cfg.tls_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def association_handlers(cfg: ReceiverConfig) -> list[tuple]:
    """The allow-lists, Nagle off, association logs and metrics: what every AE of ours binds."""
    return [
        (evt.EVT_CONN_OPEN, _on_conn_open),
        (evt.EVT_REQUESTED, _on_requested, [cfg]),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_ESTABLISHED, _on_established),
        (evt.EVT_RELEASED, _on_closed),
        (evt.EVT_ABORTED, _on_closed),
    ]


class Receiver:
    """Wiring: one AE, one shared publisher, one landing store.

    ``extra_contexts`` (abstract syntax, add_supported_context keyword arguments) and
    ``extra_handlers`` let the entry point add services to the same AE title and port (the
    Query/Retrieve SCP of access/qr) without this package knowing them.
    """

    # Half-received files older than this are debris of aborted associations.
    SWEEP_AFTER_S = 3600.0

    def __init__(
        self,
        config: Config,
        extra_contexts: list[tuple[str, dict]] | None = None,
        extra_handlers: list[tuple] | None = None,
    ):
        self.cfg = config.receiver
        self.extra_handlers = list(extra_handlers or [])
        self.landing = LandingStore(config.path(config.storage.landing_dir))
        # pynetdicom writes chunked data sets with NamedTemporaryFile: keep them on the landing
        # filesystem so that accepting one is a hard link, not a copy.
        tempfile.tempdir = str(self.landing.incoming)
        self.publisher = EventPublisher(
            config.kafka.bootstrap, config.kafka.publish_timeout_s, linger_ms=config.kafka.linger_ms
        )
        self.ingest = Ingest(self.landing, self.publisher, default_codec())
        self.ssl_context = tls_context(self.cfg)
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = self.cfg.max_pdu_bytes
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        for abstract_syntax, options in extra_contexts or []:
            ae.add_supported_context(abstract_syntax, **options)
        self.ae = ae
        self.server = None
        self._stopped = threading.Event()

    def recover(self) -> None:
        """The outbox step: publish events for objects landed before a crash (retried until done)."""
        backoff = 1.0
        while not self._stopped.is_set():
            try:
                count = self.ingest.republish_landed()
                log.info("recover.done", republished=count)
                return
            except PublishError as exc:
                log.warning("recover.retry", detail=str(exc), backoff_s=backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 30)

    def _sweeper(self) -> None:
        while not self._stopped.wait(self.SWEEP_AFTER_S / 4):
            removed = self.landing.sweep(self.SWEEP_AFTER_S)
            if removed:
                log.info("landing.swept", removed=removed)

    def start(self) -> None:
        # Before listening, so none of ours exist yet: debris of a crash is swept.
        swept = self.landing.sweep(older_than_s=0)
        if swept:
            log.info("landing.swept", removed=swept)
        threading.Thread(target=self.recover, name="recover", daemon=True).start()
        threading.Thread(target=self._sweeper, name="sweeper", daemon=True).start()
        handlers = [
            (evt.EVT_C_STORE, handle_store, [self.ingest]),
            (evt.EVT_C_ECHO, handle_echo),
            *association_handlers(self.cfg),
            (evt.EVT_ABORTED, _discard_partial),
            (evt.EVT_CONN_CLOSE, _discard_partial),
            *self.extra_handlers,
        ]
        self.server = self.ae.start_server(
            (self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        log.info(
            "receiver.listening",
            ae_title=self.cfg.ae_title,
            host=self.cfg.host,
            port=self.cfg.port,
            tls=self.ssl_context is not None,
            landing=str(self.landing.root),
            extra_services=len(self.extra_handlers),
        )

    def stop(self) -> None:
        self._stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.publisher.close()
        log.info("receiver.stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        done = threading.Event()

        def shutdown(*_: object) -> None:
            threading.Thread(target=lambda: (self.stop(), done.set()), daemon=True).start()

        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, shutdown)
        done.wait()
