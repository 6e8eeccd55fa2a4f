"""The DICOM receiver: a pynetdicom Storage SCP (and Verification SCP) in front of Ingest.

The C-STORE handler is small: what it returns *is* the DIMSE status, and each failure has
its own named status so that a modality knows whether to retry. Data sets are received
in chunks straight to a file on the landing filesystem, never held whole in memory.
"""

from __future__ import annotations

import functools
import gc
import signal
import socket
import ssl
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, cast

import structlog
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt, register_uid
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from diana.config import AllowedHosts, Config, ReceiverConfig, is_loopback_host, parse_allowed_hosts
from diana.producers import metrics, negotiation, reactor, transport_guard
from diana.producers.background import start_periodic, start_until_done
from diana.producers.header import HeaderError, InvalidIdentifiers
from diana.producers.ingest import Ingest
from diana.producers.landing import SWEEP_AFTER_S, open_landing
from diana.producers.publisher import EventPublisher, PublishError, PublishRefused
from diana.producers.spill import SpillFile, install_spill_to_file
from diana.producers.transport_guard import GuardedServer, GuardSettings
from diana.producers.workers import SharedPortServer
from diana.schemas.codec import default_codec

__all__ = [
    "Receiver",
    "add_storage_contexts",
    "association_handlers",
    "guard_settings",
    "handle_echo",
    "handle_store",
    "open_to_any_peer",
    "tls_context",
    "STATUS",
]

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
    # Error: the broker refuses this object's event for good (too large for its limit, not
    # authorised): sending it again cannot help, so this is not 0xA700.
    EVENT_REFUSED = 0xC212


class REJECT:
    """A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4."""

    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # permanent, service user


# fsync waits on the disk without the GIL: the association's thread reads the header meanwhile.
_FSYNC = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")


def handle_store(event: evt.Event, ingest: Ingest) -> int:
    assoc = event.assoc
    calling_ae = assoc.requestor.ae_title
    context = {"assoc": assoc.native_id, "calling_ae": calling_ae}
    if event.dataset_path is None:
        # CommandDataSetType 0x0101: the C-STORE came without a data set (nothing was received to a file).
        metrics.REJECTED.labels("no_dataset").inc()
        log.warning("store.rejected", reason="C-STORE without a data set", **context)
        return STATUS.CANNOT_UNDERSTAND
    if SpillFile.take_failure(event.dataset_path):
        metrics.REJECTED.labels("storage").inc()
        log.error("store.rejected", reason="landing store write failed while receiving", **context)
        return STATUS.OUT_OF_RESOURCES
    request = cast(C_STORE, event.request)
    spill = getattr(request, "_dataset_file", None)
    syncing: Future[tuple[str, int]] | None = None
    try:
        if isinstance(spill, SpillFile):
            # Hashed while the bytes arrived, never read back to hash; fsync'd while the header is read.
            spill.hand_over()
            syncing = _FSYNC.submit(spill.sync)
        accepted = ingest.accept_file(
            event.dataset_path,
            "C_STORE",
            owned=True,
            calling_ae=calling_ae,
            called_ae=assoc.acceptor.ae_title,
            expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            expected_sop_class_uid=str(event.context.abstract_syntax),
            synced_digest=syncing.result if syncing is not None else None,
        )
    except InvalidIdentifiers as exc:
        metrics.REJECTED.labels("invalid_identifiers").inc()
        log.warning("store.rejected", reason="invalid identifiers", detail=str(exc), **context)
        return STATUS.INVALID_DATASET
    except HeaderError as exc:
        metrics.REJECTED.labels("undecodable").inc()
        log.warning("store.rejected", reason="undecodable", detail=str(exc), **context)
        return STATUS.CANNOT_UNDERSTAND
    except PublishRefused as exc:
        metrics.REJECTED.labels("event_refused").inc()
        log.error("store.rejected", reason="broker refuses the event for good", code=exc.code, **context)
        return STATUS.EVENT_REFUSED
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
    finally:
        if syncing is not None:
            wait([syncing])  # never leave the file to pynetdicom while it is being fsync'd
    metrics.RECEIVED.inc()
    metrics.BYTES.inc(accepted.size)
    metrics.PUBLISH_LATENCY.observe(accepted.publish_latency_s)
    log.debug("store.accepted", sop_instance_uid=accepted.header.sop_instance_uid, **context)
    return STATUS.SUCCESS


def handle_echo(_event: evt.Event) -> int:
    return STATUS.SUCCESS


def _on_conn_open(event: evt.Event) -> None:
    reactor.fast_reactor(event.assoc.dul)
    # pynetdicom leaves Nagle on: small PDUs (the C-STORE response) would wait ~40 ms for an ACK.
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@functools.lru_cache(maxsize=4)
def _allowed_hosts(entries: tuple) -> AllowedHosts:
    """``[receiver] allowed_hosts`` parsed once (checked when the configuration was loaded)."""
    return parse_allowed_hosts(entries, "receiver")


def _on_requested(event: evt.Event, cfg: ReceiverConfig) -> None:
    """Refuse callers outside the allow-lists with an A-ASSOCIATE-RJ, and say why in the log."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    assert primitive is not None, "EVT_REQUESTED comes with the A-ASSOCIATE request"
    calling_ae = primitive.calling_ae_title.strip()
    host = assoc.requestor.address
    reason = None
    if cfg.allowed_calling_aes and calling_ae not in cfg.allowed_calling_aes:
        reason = "calling AE title not in allowed_calling_aes"
    elif cfg.allowed_hosts and not _allowed_hosts(tuple(cfg.allowed_hosts)).admits(host):
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


def open_to_any_peer(cfg: ReceiverConfig) -> bool:
    """Anyone on the network may associate and store under any AE title: bound off loopback with no
    allow-list and no client certificates. The default, as Orthanc's and dcm4chee's (modalities must be
    able to send), but said once at start (``receiver.open_to_any_peer``) and on the metrics."""
    loopback = is_loopback_host(cfg.host)
    return not (loopback or cfg.allowed_hosts or cfg.allowed_calling_aes or cfg.tls_ca_file)


OPEN_TO_ANY_PEER_WARNING = (
    "any host on the network may store under any AE title: set [receiver] allowed_hosts (addresses or "
    "networks), allowed_calling_aes (the AE-title allow-list) or tls_ca_file (client certificates), or bind "
    "host to loopback"
)


def announce_exposure(cfg: ReceiverConfig, warn: bool = True) -> None:
    """The gauge diana_receiver_open_to_any_peer, and one start-up warning when it is 1 (``warn``: False
    for all but one of the receiver's processes). No value is logged: the settings say how to close it."""
    exposed = open_to_any_peer(cfg)
    metrics.OPEN_TO_ANY_PEER.set(1 if exposed else 0)
    if exposed and warn:
        log.warning("receiver.open_to_any_peer", detail=OPEN_TO_ANY_PEER_WARNING)


def guard_settings(cfg: ReceiverConfig) -> GuardSettings:
    """The limits on hostile and slow peers (transport_guard.py) of every DICOM port diana-star listens on:
    the receiver's, and `diana serve`'s query/retrieve port, which shares its AE settings."""
    return GuardSettings(
        max_pdu_bytes=cfg.max_pdu_bytes,
        tls_handshake_timeout_s=cfg.tls_handshake_timeout_s,
        max_associations_per_host=cfg.max_associations_per_host,
        pdu_read_timeout_s=cfg.pdu_read_timeout_s,
        min_bytes_per_s=cfg.min_bytes_per_s,
        min_rate_after_s=cfg.min_rate_after_s,
    )


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


def extra_storage_classes(extra_sop_classes: tuple[str, ...] | list[str]) -> list[str]:
    """The entries of ``[receiver] extra_storage_sop_classes`` that are not standard storage classes, once
    each, in order. A UID pynetdicom knows as another service (Query/Retrieve, Verification...) is refused
    with ValueError at start."""
    out = []
    for uid in dict.fromkeys(extra_sop_classes):
        if uid in _STANDARD_STORAGE:
            continue
        service = uid_to_service_class(uid)
        if service is not ServiceClass and service is not StorageServiceClass:
            raise ValueError(
                f"[receiver] extra_storage_sop_classes: {uid} is a {service.__name__} SOP Class, not a storage one"
            )
        out.append(uid)
    return out


_STANDARD_STORAGE = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


def add_storage_contexts(ae: AE, extra_sop_classes: tuple[str, ...] = ()) -> None:
    """Accept every standard Storage SOP Class, and ``extra_sop_classes`` (``[receiver]
    extra_storage_sop_classes``: vendors' private ones), each with every transfer syntax.

    pynetdicom serves a C-STORE through its Storage service only for UIDs it knows as storage: an extra
    one is registered as such (process-wide, once). A UID pynetdicom knows as another service
    (Query/Retrieve, Verification...) is refused with ValueError at start.
    """
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    for uid in extra_storage_classes(extra_sop_classes):
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, "DianaStorage_" + uid.replace(".", "_"), StorageServiceClass)
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)


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
    SWEEP_AFTER_S = SWEEP_AFTER_S

    def __init__(
        self,
        config: Config,
        extra_contexts: list[tuple[str, dict]] | None = None,
        extra_handlers: list[tuple] | None = None,
        worker: int = 0,
        started_at: float | None = None,
    ):
        # Process-wide changes to pynetdicom, made here at service start and nowhere on import.
        install_spill_to_file()
        self.cfg = config.receiver
        # One of [receiver] processes sharing the port (workers.py), or the only one.
        self.worker = worker
        self.shared = self.cfg.processes > 1
        self.extra_handlers = list(extra_handlers or [])
        self.landing = open_landing(config, shared=self.shared)
        # When the receiver (all its workers) started: recovery republishes what landed before.
        self.started_at = time.time() if started_at is None else started_at
        # pynetdicom writes chunked data sets with NamedTemporaryFile: keep them on the landing
        # filesystem so that accepting one is a hard link, not a copy.
        tempfile.tempdir = str(self.landing.incoming)
        self.publisher = EventPublisher(config.kafka)
        self.ingest = Ingest(
            self.landing, self.publisher, default_codec(), max_inflated_bytes=self.cfg.max_inflated_bytes
        )
        self.ssl_context = tls_context(self.cfg)
        # Accept the encoding the sender chose (explicit VR first), not pynetdicom's implicit VR.
        negotiation.install()
        # The DUL thread waits on its socket instead of sleeping 1 ms between checks (reactor.py).
        reactor.install()
        transport_guard.install(guard_settings(self.cfg))
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = self.cfg.max_pdu_bytes
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        add_storage_contexts(ae, self.cfg.extra_storage_sop_classes)
        ae.add_supported_context(Verification)
        for abstract_syntax, options in extra_contexts or []:
            ae.add_supported_context(abstract_syntax, **options)
        self.ae = ae
        self.server: ThreadedAssociationServer | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._reconciled: set[str] = set()  # landing paths republished by this process

    def recover(self) -> None:
        """The outbox step: publish events for objects landed before a crash."""
        # Objects landed before this run: with several workers, the others' objects of this run
        # are theirs to publish (republishing one would be harmless, a shared store never removes
        # a landed object, but it is a needless duplicate event).
        published = self.ingest.republish_landed(older_than_s=max(time.time() - self.started_at, 0.0))
        self._reconciled.update(published)
        log.info("recover.done", republished=len(published))

    def reconcile(self) -> None:
        """The outbox step again, periodically: objects still landed after ``reconcile_after_s``
        (an event lost after its acknowledgement, a recovery that could not finish) are republished
        once per run of the receiver. Objects received or published right now are never touched."""
        published = self.ingest.republish_landed(
            older_than_s=self.cfg.reconcile_after_s, skip=self._reconciled.__contains__
        )
        self._reconciled.update(published)
        if published:
            log.info("reconcile.republished", count=len(published))

    def sweep_debris(self) -> None:
        """Remove everything half-written a crash left behind: call only while nothing is received."""
        swept = self.landing.sweep(older_than_s=0)
        if swept:
            log.info("landing.swept", removed=swept)

    def _sweep(self) -> None:
        removed = self.landing.sweep(self.SWEEP_AFTER_S)
        if removed:
            log.info("landing.swept", removed=removed)

    def start(self) -> None:
        if not self.shared:
            # Before listening, so none of ours exist yet: debris of a crash is swept. With several
            # workers, the parent does it before any of them listens (workers.py).
            self.sweep_debris()
        if self.worker == 0:
            start_until_done("recover", self.recover, self._stopped)
            start_periodic("sweeper", self.SWEEP_AFTER_S / 4, self._sweep, self._stopped)
            start_periodic("reconcile", self.cfg.reconcile_interval_s, self.reconcile, self._stopped)
        announce_exposure(self.cfg, warn=self.worker == 0)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.ingest]),
            (evt.EVT_C_ECHO, handle_echo),
            *association_handlers(self.cfg),
            (evt.EVT_ABORTED, _discard_partial),
            (evt.EVT_CONN_CLOSE, _discard_partial),
            *self.extra_handlers,
        ]
        # pynetdicom's start_server, with the guarded server class (transport_guard.py).
        self.server = self.ae.make_server(
            (self.cfg.host, self.cfg.port),
            evt_handlers=handlers,
            ssl_context=self.ssl_context,
            server_class=SharedPortServer if self.shared else GuardedServer,
        )
        assert self.server is not None
        # What exists now (modules, pydicom's dictionaries, the AE: about 90,000 objects) lives as long
        # as the process: the cyclic collector's full passes need not scan it again (18 ms each when
        # they did). Rare: none in 300 instances received (bench.receiver_timeline prints them).
        gc.collect()
        gc.freeze()
        threading.Thread(target=self.server.serve_forever, name="AcceptorServer", daemon=True).start()
        self.ae._servers.append(self.server)
        log.info(
            "receiver.listening",
            ae_title=self.cfg.ae_title,
            host=self.cfg.host,
            port=self.cfg.port,
            worker=self.worker,
            workers=self.cfg.processes,
            tls=self.ssl_context is not None,
            landing=self.landing.uri("") if self.landing.remote is not None else str(self.landing.root),
            extra_services=len(self.extra_handlers),
        )

    def stop(self) -> None:
        # Once, however many signals arrive (a worker gets SIGTERM from its parent and, from a
        # terminal or `timeout`, from its process group too).
        with self._stop_lock:
            if self._stopped.is_set():
                return
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
            def stop_then_release() -> None:
                self.stop()
                done.set()

            threading.Thread(target=stop_then_release, daemon=True).start()

        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, shutdown)
        done.wait()
