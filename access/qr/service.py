"""The Query/Retrieve SCP's event handlers and presentation contexts, for any pynetdicom AE.

``QueryRetrieve.handlers()`` and ``QueryRetrieve.contexts()`` are what the receiver's AE (one AE
title and port for storage and Q/R) or ``diana serve`` (Q/R alone) add to their own. Statuses:
0x0124 (Refused: Not Authorised, PS3.7 C.5) for a peer off this host that ``[query_retrieve]
allowed_calling_aes`` / ``allowed_hosts`` / ``allow_any_peer`` do not admit (peers.py), 0xA900 and
0xC000 for identifiers that cannot be answered (identifier.py), 0xA700 when OpenSearch does not
answer or a C-FIND has more than ``max_matches`` matches (the matches sent are not all of them),
0xA801 for a move destination not in ``[query_retrieve] destinations``, 0xA701 when a retrieve
holds more objects than ``max_retrieve``, 0xFE00 after C-CANCEL. Sub-operation counts, 0xB000
(some failed) and 0xA702 (all failed) come from pynetdicom's service classes. A C-MOVE refused
before anything is sent never connects to its destination (retrieve.NO_DESTINATION).
"""

from __future__ import annotations

import ssl
import time
import weakref
from collections.abc import Iterator
from typing import Any

import structlog
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import RequestError, TransportError
from prometheus_client import Counter, Histogram
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from diana.access.qr.identifier import IdentifierError, Query, attribute_name, parse_identifier
from diana.access.qr.index_reader import IndexReader
from diana.access.qr.peers import REFUSED_COMMENT, PeerPolicy
from diana.access.qr.response import build_response, header_fields
from diana.access.qr.retrieve import (
    NO_DESTINATION,
    ArchivedInstance,
    archive_key,
    as_archived,
    install_file_sending,
    move_contexts,
)
from diana.config import MoveDestination
from diana.outbound_association import outbound_association_handlers
from diana.producers.scp import extra_storage_classes
from diana.storage import ObjectStore

__all__ = ["QueryRetrieve", "QR_SOP_CLASSES"]

log = structlog.get_logger("diana.qr")

REQUESTS = Counter("diana_qr_requests_total", "Query/retrieve requests answered", ["operation", "status"])
FIND_SECONDS = Histogram("diana_qr_find_seconds", "Time to answer a C-FIND, all matches sent")
SENT = Counter("diana_qr_sent_instances_total", "Objects handed to C-MOVE/C-GET sub-operations", ["operation"])

_MODEL = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
}
QR_SOP_CLASSES = tuple(_MODEL)

PENDING = 0xFF00
CANCEL = 0xFE00
# PS3.7 C.5 general status "Refused: Not Authorised", valid for C-FIND, C-MOVE and C-GET (pynetdicom
# lists it for each); PS3.4's own Q/R statuses have none for a requester that may not ask.
NOT_AUTHORISED = 0x0124
OUT_OF_RESOURCES = 0xA700
TOO_MANY_MATCHES = 0xA701
UNABLE_TO_PROCESS = 0xC000


def _status(code: int, comment: str, tag: int | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    if tag is not None:
        ds.OffendingElement = [tag]
    return ds


def _attribute(tag: int | None) -> str:
    """The attribute a refusal is about, by name: what the log says of it, never its value."""
    if tag is None:
        return "the identifier"
    return attribute_name(tag)


def _model(event: evt.Event) -> str:
    return _MODEL[str(event.request.AffectedSOPClassUID)]


class QueryRetrieve:
    def __init__(
        self,
        reader: IndexReader,
        archive: ObjectStore,
        destinations: dict[str, MoveDestination],
        ae_title: str,
        max_matches: int = 10000,
        max_retrieve: int = 65535,
        destination_tls: ssl.SSLContext | None = None,
        peers: PeerPolicy | None = None,
        storage_sop_classes: tuple[str, ...] = (),
    ):
        self.reader = reader
        self.archive = archive
        self.destinations = destinations
        self.ae_title = ae_title
        self.max_matches = max_matches
        self.max_retrieve = min(max_retrieve, 65535)
        self.destination_tls = destination_tls
        # None: only peers on loopback may query and retrieve.
        self.peers = peers or PeerPolicy()
        # [receiver] extra_storage_sop_classes: private classes a C-GET may fetch too (contexts()).
        self.storage_sop_classes = tuple(storage_sop_classes)
        # Associations whose refusal was logged: once per association, not per request.
        self._refused: weakref.WeakSet[Association] = weakref.WeakSet()
        install_file_sending()

    # ------------------------------------------------------------------ who may ask
    def _refusal(self, event: evt.Event, operation: str) -> Dataset | None:
        """The 0x0124 status refusing ``event``'s request when its peer may not query and retrieve, else None."""
        assoc = event.assoc
        calling_ae, address = str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)
        if self.peers.allows(calling_ae, address):
            return None
        REQUESTS.labels(operation, "0124").inc()
        if assoc not in self._refused:
            self._refused.add(assoc)
            log.warning(
                "qr.refused",
                reason="peer not in [query_retrieve] allowed_calling_aes / allowed_hosts",
                operation=operation,
                calling_ae=calling_ae,
                peer=address,
            )
        return _status(NOT_AUTHORISED, REFUSED_COMMENT)

    # ------------------------------------------------------------------ wiring
    def handlers(self) -> list[tuple]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move), (evt.EVT_C_GET, self.on_get)]

    def contexts(self) -> list[tuple[str, dict[str, Any]]]:
        """(abstract syntax, add_supported_context keyword arguments): the Q/R SOP classes, and the
        storage classes with the SCP role a C-GET requester takes for its sub-operations: every
        standard one and ``[receiver] extra_storage_sop_classes`` (vendors' private ones), since a
        C-GET can fetch only objects of classes negotiated so.

        pynetdicom's limit of 128 presentation contexts binds the requester, which proposes them
        (PS3.8 9.3.2.2: context IDs are odd numbers 1-255); an acceptor may support any number and
        accepts, of those proposed, the ones it supports."""
        out: list[tuple[str, dict[str, Any]]] = [(uid, {}) for uid in QR_SOP_CLASSES]
        storage = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        storage += extra_storage_classes(self.storage_sop_classes)
        out += [
            (uid, {"transfer_syntax": ALL_TRANSFER_SYNTAXES, "scu_role": True, "scp_role": True}) for uid in storage
        ]
        return out

    # ------------------------------------------------------------------ C-FIND
    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        started = time.monotonic()
        refused = self._refusal(event, "find")
        if refused is not None:
            yield refused, None
            return
        context = {"assoc": event.assoc.native_id, "calling_ae": event.assoc.requestor.ae_title}
        try:
            query = parse_identifier(event.identifier, _model(event))
        except IdentifierError as exc:
            REQUESTS.labels("find", f"{exc.status:04X}").inc()
            # The reason goes to the requester (it quotes their value: a name, a birth date), not to the log.
            log.warning("find.refused", status=f"0x{exc.status:04X}", attribute=_attribute(exc.tag), **context)
            yield _status(exc.status, str(exc), exc.tag), None
            return
        except Exception as exc:  # the identifier itself cannot be decoded
            REQUESTS.labels("find", "C000").inc()
            log.warning("find.refused", status="0xC000", reason=f"undecodable identifier: {type(exc).__name__}")
            yield _status(UNABLE_TO_PROCESS, "the identifier cannot be decoded"), None
            return
        sent = 0
        truncated = False
        try:
            matches = self.reader.find(
                query, self.max_matches + 1, cancelled=lambda: event.is_cancelled, header=header_fields(query)
            )
            for match in matches:
                if event.is_cancelled:
                    REQUESTS.labels("find", "FE00").inc()
                    log.info("find.cancelled", level=query.level, sent=sent, **context)
                    yield CANCEL, None
                    return
                if sent == self.max_matches:  # one more than max_matches was asked for: this one
                    truncated = True
                    break
                sent += 1
                yield PENDING, build_response(query, match, self.ae_title)
        except RequestError as exc:  # OpenSearch's 400: the query is at fault, a retry would fail the same
            REQUESTS.labels("find", "C000").inc()
            log.warning("find.refused", status="0xC000", reason=f"the index refuses the query: {exc.error}", **context)
            yield _status(UNABLE_TO_PROCESS, f"the index refuses this query ({exc.error}): ask with fewer values"), None
            return
        except (OSConnectionError, TransportError) as exc:
            REQUESTS.labels("find", "A700").inc()
            log.error("find.failed", reason="OpenSearch did not answer", detail=type(exc).__name__, **context)
            yield _status(OUT_OF_RESOURCES, "the index does not answer; retry later"), None
            return
        FIND_SECONDS.observe(time.monotonic() - started)
        if truncated:
            # Not 0x0000, which says the matches sent are all of them (PS3.4 C.4.1.1.4: no status says
            # "more exist"; 0xA700, Refused: Out of resources, is the one for an SCP that will not send them).
            REQUESTS.labels("find", "A700").inc()
            log.warning("find.truncated", level=query.level, max_matches=self.max_matches, **context)
            yield _status(OUT_OF_RESOURCES, f"more than {self.max_matches} matches: narrow the query"), None
            return
        REQUESTS.labels("find", "0000").inc()
        log.info(
            "find.done",
            model=query.model,
            level=query.level,
            keys=[m.attribute.keyword for m in query.matchers],
            matches=sent,
            ms=round((time.monotonic() - started) * 1000, 1),
            **context,
        )

    # ------------------------------------------------------------------ C-MOVE / C-GET
    def _resolve(self, event: evt.Event, operation: str) -> tuple[Query, list[dict[str, Any]]] | Dataset:
        """The instances to send, or the status Dataset that refuses the request."""
        try:
            query = parse_identifier(event.identifier, _model(event), retrieve=True)
        except IdentifierError as exc:
            REQUESTS.labels(operation, f"{exc.status:04X}").inc()
            log.warning(f"{operation}.refused", status=f"0x{exc.status:04X}", attribute=_attribute(exc.tag))
            return _status(exc.status, str(exc), exc.tag)
        except Exception as exc:
            REQUESTS.labels(operation, "C000").inc()
            log.warning(f"{operation}.refused", status="0xC000", reason=f"undecodable identifier: {type(exc).__name__}")
            return _status(UNABLE_TO_PROCESS, "the identifier cannot be decoded")
        try:
            instances = self.reader.instances(query, self.max_retrieve + 1)
        except (OSConnectionError, TransportError) as exc:
            REQUESTS.labels(operation, "A700").inc()
            log.error(f"{operation}.failed", reason="OpenSearch did not answer", detail=type(exc).__name__)
            return _status(OUT_OF_RESOURCES, "the index does not answer; retry later")
        if len(instances) > self.max_retrieve:
            REQUESTS.labels(operation, "A701").inc()
            log.warning(f"{operation}.refused", reason="too many objects", max_retrieve=self.max_retrieve)
            return _status(TOO_MANY_MATCHES, f"more than {self.max_retrieve} objects: retrieve series by series")
        valid = [doc for doc in instances if archive_key(doc) is not None]
        if len(valid) < len(instances):  # the receiver validates UIDs: only a foreign index document
            log.error(
                f"{operation}.skipped", reason="index document with invalid UIDs", count=len(instances) - len(valid)
            )
        return query, valid

    def _send(self, event: evt.Event, operation: str, instances: list[dict[str, Any]]) -> Iterator[tuple]:
        started = time.monotonic()
        for number, doc in enumerate(instances):
            if event.is_cancelled:
                REQUESTS.labels(operation, "FE00").inc()
                log.info(f"{operation}.cancelled", sent=number, remaining=len(instances) - number)
                yield CANCEL, None
                return
            SENT.labels(operation).inc()
            key = archive_key(doc) or "invalid"
            # A missing object fails its sub-operation (pynetdicom lists it in FailedSOPInstanceUIDList).
            yield PENDING, ArchivedInstance(self.archive, key, doc.get("sop_class_uid") or "", doc["sop_instance_uid"])
        REQUESTS.labels(operation, "done").inc()
        log.info(
            f"{operation}.done",
            instances=len(instances),
            ms=round((time.monotonic() - started) * 1000, 1),
            assoc=event.assoc.native_id,
        )

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        refused = self._refusal(event, "move")
        if refused is not None:
            yield from _refuse_move(refused)
            return
        name = str(event.move_destination).strip() if event.move_destination else ""
        destination = self.destinations.get(name)
        if destination is None:
            REQUESTS.labels("move", "A801").inc()
            log.warning("move.refused", reason="unknown move destination", destination=name)
            yield None, None
            return
        resolved = self._resolve(event, "move")
        if isinstance(resolved, Dataset):
            yield from _refuse_move(resolved)
            return
        _, instances = resolved
        instances = as_archived(self.archive, instances)
        options: dict[str, Any] = {
            "ae_title": destination.ae_title,
            "evt_handlers": outbound_association_handlers(),
            "contexts": move_contexts(instances),
        }
        if destination.tls:
            options["tls_args"] = (self.destination_tls or ssl.create_default_context(), destination.host)
        log.info("move.start", destination=name, instances=len(instances), assoc=event.assoc.native_id)
        yield destination.host, destination.port, options
        yield len(instances)
        yield from self._send(event, "move", instances)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        refused = self._refusal(event, "get")
        if refused is not None:
            yield 1
            yield refused, None
            return
        resolved = self._resolve(event, "get")
        if isinstance(resolved, Dataset):
            yield 1
            yield resolved, None
            return
        _, instances = resolved
        yield len(instances)
        yield from self._send(event, "get", instances)


def _refuse_move(status: Dataset) -> Iterator[Any]:
    """A C-MOVE's yields that end it with ``status`` and connect nowhere: pynetdicom takes a status only
    after a destination and a count, and would open a sub-association to it first (a destination down or
    on TLS then answered the requester 0xA801 instead); NO_DESTINATION stands for none (retrieve.py).
    PS3.4 C.4.2.1.4 requires no sub-association before a failure. pynetdicom counts the one sub-operation
    announced as failed."""
    yield NO_DESTINATION, 0
    yield 1
    yield status, None
