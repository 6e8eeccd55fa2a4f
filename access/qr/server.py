"""Building the Query/Retrieve SCP from the configuration: for the receiver's AE, or alone (`diana serve`)."""

from __future__ import annotations

import dataclasses
import signal
import ssl
import threading

import structlog
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from diana.access.qr.index_reader import IndexReader
from diana.access.qr.peers import PeerPolicy
from diana.access.qr.service import QueryRetrieve
from diana.clients import opensearch_client
from diana.config import Config, parse_destinations
from diana.producers import reactor, transport_guard
from diana.producers.scp import association_handlers, guard_settings, handle_echo, tls_context
from diana.producers.transport_guard import GuardedServer
from diana.storage import open_store

__all__ = ["build_query_retrieve", "destination_tls", "QueryRetrieveServer"]

log = structlog.get_logger("diana.qr")


def destination_tls(config: Config) -> ssl.SSLContext:
    """TLS toward move destinations: verified against [receiver] tls_ca_file (else the system CAs);
    the receiver's certificate is presented when it has one (destinations requiring client certificates)."""
    r = config.receiver
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=r.tls_ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if r.tls_cert_file and r.tls_key_file:
        ctx.load_cert_chain(r.tls_cert_file, r.tls_key_file)
    return ctx


def build_query_retrieve(config: Config, warn: bool = True) -> QueryRetrieve:
    """The Q/R service of ``config``; ``warn``: log once that peers off this host are refused, when they are
    (False for all but one of the receiver's processes)."""
    qr = config.query_retrieve
    destinations = parse_destinations(qr.destinations)
    peers = PeerPolicy.from_config(qr)
    warning = peers.start_warning(config.receiver.host)
    if warn and warning:
        log.warning("qr.off_host_refused", detail=warning)
    client = opensearch_client(config.opensearch, timeout=30)
    return QueryRetrieve(
        IndexReader(client, config.opensearch.index_prefix),
        open_store(config, "archive"),
        destinations,
        config.receiver.ae_title,
        max_matches=qr.max_matches,
        max_retrieve=qr.max_retrieve,
        destination_tls=destination_tls(config) if any(d.tls for d in destinations.values()) else None,
        peers=peers,
        storage_sop_classes=tuple(config.receiver.extra_storage_sop_classes),
    )


class QueryRetrieveServer:
    """Q/R alone: the receiver's AE title, allow-lists, TLS settings and limits on hostile and slow peers
    (GuardedServer), on ``[query_retrieve] port``; who may query and retrieve from off this host,
    ``[query_retrieve] allowed_*`` (peers.py)."""

    def __init__(self, config: Config):
        self.config = config
        self.service = build_query_retrieve(config)
        r = config.receiver
        ae = AE(ae_title=r.ae_title)
        ae.maximum_associations = r.max_associations
        ae.maximum_pdu_size = r.max_pdu_bytes
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        for abstract_syntax, options in self.service.contexts():
            ae.add_supported_context(abstract_syntax, **options)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        self.ae = ae
        self.ssl_context = tls_context(r)
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        # The DUL threads of the associations peers open wait on their sockets, as the receiver's do
        # (producers/reactor.py; association_handlers' EVT_CONN_OPEN makes them so only once installed):
        # a C-FIND or C-GET response then leaves at once instead of at the next 1 ms turn.
        reactor.install()
        # The receiver's limits on hostile and slow peers (producers/transport_guard.py: TLS handshakes off
        # the accept loop, max_associations_per_host, the PDU cap, deadline and minimum rate), from
        # [receiver] as the AE title, allow-lists and TLS are: pynetdicom's plain server had none of them.
        guard = guard_settings(self.config.receiver)
        if self.config.query_retrieve.max_associations_per_host:
            guard = dataclasses.replace(
                guard, max_associations_per_host=self.config.query_retrieve.max_associations_per_host
            )
        transport_guard.install(guard)
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            *association_handlers(self.config.receiver),
            *self.service.handlers(),
        ]
        host, port = self.config.receiver.host, self.config.query_retrieve.port
        server = self.ae.make_server(
            (host, port), evt_handlers=handlers, ssl_context=self.ssl_context, server_class=GuardedServer
        )
        threading.Thread(target=server.serve_forever, name="QueryRetrieveAcceptor", daemon=True).start()
        self.ae._servers.append(server)  # as start_server does: the AE's shutdown() stops it too
        self.server = server
        log.info(
            "qr.listening",
            ae_title=self.config.receiver.ae_title,
            host=host,
            port=port,
            tls=self.ssl_context is not None,
            destinations=sorted(self.service.destinations),
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        log.info("qr.stopped")

    def serve_forever(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()
