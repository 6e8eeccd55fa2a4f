"""Sending archived objects to one destination: C-STORE (pynetdicom) or STOW-RS (HTTP).

A sender takes a list of deliveries and says, for each, DELIVERED, FAILED (the destination answered
and refused it: its status is kept for the dead letter) or UNAVAILABLE (no answer: nothing can be
said about the object, so it is tried again without counting). Files are sent as stored, with the
same code C-MOVE uses (access/qr/retrieve.py); a de-identifying destination gets the object after
the research export's de-identification and its residual-identifier scan.
"""

from __future__ import annotations

import errno
import io
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import pydicom
import requests
import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from diana.access.deid import Deidentifier, PseudonymKey, Refused
from diana.access.pseudonyms import StudySubjects
from diana.access.qr.retrieve import (
    MAX_CONTEXTS,
    ArchivedInstance,
    as_archived,
    install_file_sending,
    move_contexts,
)
from diana.access.residual import scan
from diana.access.routing.rules import Destination
from diana.outbound_association import outbound_association_handlers
from diana.storage import ObjectStore, StorageRefused, local_file

__all__ = ["Outcome", "Result", "Delivery", "Sender", "DicomSender", "StowSender", "make_sender"]

log = structlog.get_logger("diana.route")
_WARNINGS = (0xB000, 0xB006, 0xB007)  # PS3.4 B.2.3: stored, with a warning
_UNAVAILABLE_HTTP = (408, 429, 502, 503, 504)


class Outcome(Enum):
    DELIVERED = "delivered"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    status: str = ""  # the destination's answer when it refused, or why it could not be reached
    # A refusal for lack of room (C-STORE 0xA7xx, HTTP 507): given up only after [routing] archive_wait_s
    out_of_resources: bool = False


def _os_error(exc: OSError, what: str) -> Result:
    """The network or the object store not answering: the destination is tried again without limit.
    An archived file that cannot be read (a permission, a bad sector, access denied by the store):
    a refusal, counted, so that one object does not hold the destination for ever."""
    unreadable = isinstance(exc, (StorageRefused, *_FILE_ERRORS)) or exc.errno == errno.EIO
    if not unreadable:  # a socket, TLS or the store not answering
        return Result(Outcome.UNAVAILABLE, f"{what}: {exc}")
    return Result(Outcome.FAILED, f"{what}: {type(exc).__name__}: {exc.strerror or exc}")


_FILE_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


@dataclass
class Delivery:
    """One archived instance to send for one consumed message (a message may need several)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    key: str  # in the archive store
    failures: int = 0
    last_status: str = ""
    first_refused_at: float | None = None  # time.monotonic() of its first refusal
    extra: dict[str, Any] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
        }


class Sender(Protocol):
    def send(self, items: list[Delivery], archive: ObjectStore) -> list[Result]: ...

    def close(self) -> None: ...


class _Deidentifying:
    """De-identification before sending, when the destination asks for it."""

    def __init__(self, deidentifier: Deidentifier | None):
        self.deidentifier = deidentifier

    def prepare(self, archive: ObjectStore, key: str) -> Dataset:
        """The de-identified data set of the archived object; Refused when it must not go out."""
        assert self.deidentifier is not None
        try:
            with local_file(archive, key) as path:
                ds = pydicom.dcmread(path)
        except OSError:
            raise  # the store did not answer: the sender reports the destination's attempt as not made
        except Exception as exc:  # unreadable archived file: refused with its kind (its text may quote values)
            raise Refused(f"archived file not readable as DICOM ({type(exc).__name__})") from None
        result = self.deidentifier.deidentify(ds)
        hits = scan(result.dataset, result.identifiers)
        if hits:
            raise Refused(f"residual-identifier scan found {len(hits)} source identifiers; not sent")
        return result.dataset

    def start_batch(self) -> None:
        # The pseudonym key of a long-running sender is not kept: forget it between batches.
        if self.deidentifier is not None:
            self.deidentifier.key = PseudonymKey()
            self.deidentifier.subjects = StudySubjects()


class DicomSender(_Deidentifying):
    """C-STORE SCU: one association per batch, the objects' own transfer syntaxes proposed first."""

    def __init__(
        self,
        destination: Destination,
        calling_ae: str,
        timeout_s: float,
        tls_context: ssl.SSLContext | None = None,
        deidentifier: Deidentifier | None = None,
    ):
        super().__init__(deidentifier)
        install_file_sending()
        self.destination = destination
        self.ae = AE(ae_title=calling_ae)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self.ae.connection_timeout = timeout_s
        self.tls_context = tls_context

    def send(self, items: list[Delivery], archive: ObjectStore) -> list[Result]:
        self.start_batch()
        self.archive = archive
        docs = as_archived(archive, [i.doc() for i in items])
        dest = self.destination
        # Verification too: a destination that accepts none of the objects' classes still associates,
        # so each object gets the destination's refusal (dead-lettered after max_attempts), not "unreachable".
        contexts = [build_context(Verification), *move_contexts(docs)][:MAX_CONTEXTS]
        # Nagle off, as for C-MOVE: otherwise each object's last packet waits ~40 ms for an acknowledgement.
        options: dict[str, Any] = {
            "ae_title": dest.ae_title,
            "contexts": contexts,
            "evt_handlers": outbound_association_handlers(),
        }
        if dest.tls:
            options["tls_args"] = (self.tls_context or ssl.create_default_context(), dest.host)
        try:
            assoc = self.ae.associate(dest.host, dest.port, **options)
        except (OSError, RuntimeError) as exc:
            return [Result(Outcome.UNAVAILABLE, f"association failed: {exc}")] * len(items)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer the association request"
            return [Result(Outcome.UNAVAILABLE, f"{dest.ae_title}@{dest.host}:{dest.port} {why}")] * len(items)
        results: list[Result] = []
        try:
            for item, doc in zip(items, docs, strict=True):
                if not assoc.is_established:
                    results.append(Result(Outcome.UNAVAILABLE, "association aborted"))
                    continue
                results.append(self._store(assoc, item, doc))
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def _store(self, assoc: Any, item: Delivery, doc: dict[str, Any]) -> Result:
        try:
            dataset: Dataset = (
                self.prepare(self.archive, item.key)
                if self.deidentifier
                else ArchivedInstance(self.archive, item.key, doc.get("sop_class_uid", ""), item.sop_instance_uid)
            )
            status = assoc.send_c_store(dataset)
        except Refused as exc:
            return Result(Outcome.FAILED, f"refused by de-identification: {exc}")
        except ValueError as exc:  # no presentation context the destination accepted for this object
            return Result(Outcome.FAILED, f"destination accepted no presentation context: {exc}")
        except OSError as exc:
            return _os_error(exc, "sending failed")
        except RuntimeError as exc:
            return Result(Outcome.UNAVAILABLE, f"sending failed: {exc}")
        except Exception as exc:  # an archived object pydicom cannot read or encode: counted, then dead-lettered
            return Result(Outcome.FAILED, f"archived object cannot be sent ({type(exc).__name__})")
        code = getattr(status, "Status", None)
        if code is None:
            return Result(Outcome.UNAVAILABLE, "no C-STORE response (association lost or timed out)")
        if code == 0 or code in _WARNINGS:
            return Result(Outcome.DELIVERED)
        comment = str(getattr(status, "ErrorComment", "") or "")
        why = f"C-STORE status 0x{int(code):04X}" + (f" ({comment})" if comment else "")
        # Refused: Out of Resources (a full disk, for now or for good: some servers say it of one object)
        return Result(Outcome.FAILED, why, out_of_resources=0xA700 <= code <= 0xA7FF)

    def close(self) -> None:
        pass


def _multipart(parts: list[bytes], boundary: str) -> Iterator[bytes]:
    for part in parts:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield part
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


class StowSender(_Deidentifying):
    """STOW-RS (PS3.18 10.5): one POST per object, so each object gets its own answer."""

    def __init__(self, destination: Destination, timeout_s: float, deidentifier: Deidentifier | None = None):
        super().__init__(deidentifier)
        self.destination = destination
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def _body(self, archive: ObjectStore, item: Delivery) -> bytes:
        if not self.deidentifier:
            with archive.open(item.key) as stream:
                return stream.read()
        buf = io.BytesIO()
        self.prepare(archive, item.key).save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    def send(self, items: list[Delivery], archive: ObjectStore) -> list[Result]:
        self.start_batch()
        results: list[Result] = []
        for item in items:
            if results and results[-1].outcome is Outcome.UNAVAILABLE:
                results.append(results[-1])  # the endpoint is down: do not knock once per object
                continue
            results.append(self._post(archive, item))
        return results

    def _post(self, archive: ObjectStore, item: Delivery) -> Result:
        try:
            body = self._body(archive, item)
        except Refused as exc:
            return Result(Outcome.FAILED, f"refused by de-identification: {exc}")
        except OSError as exc:
            return _os_error(exc, "archived file not readable")
        except Exception as exc:  # de-identification could not handle the object: counted, then dead-lettered
            return Result(Outcome.FAILED, f"archived object cannot be prepared ({type(exc).__name__})")
        boundary = uuid.uuid4().hex
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = self.session.post(
                self.destination.stow_url,
                data=b"".join(_multipart([body], boundary)),
                headers=headers,
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            return Result(Outcome.UNAVAILABLE, f"STOW-RS request failed: {type(exc).__name__}")
        if response.status_code == 200 or (response.status_code == 202 and "00081198" not in response.text):
            return Result(Outcome.DELIVERED)  # 202 without a FailedSOPSequence: stored with a warning
        status = f"STOW-RS HTTP {response.status_code} {response.reason}"
        if response.status_code in _UNAVAILABLE_HTTP:
            return Result(Outcome.UNAVAILABLE, status)
        return Result(Outcome.FAILED, status, out_of_resources=response.status_code == 507)  # Insufficient Storage

    def close(self) -> None:
        self.session.close()


def make_sender(
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    tls_context: ssl.SSLContext | None = None,
    deidentifier: Deidentifier | None = None,
) -> Sender:
    if destination.kind == "stow":
        return StowSender(destination, timeout_s, deidentifier)
    return DicomSender(destination, calling_ae, timeout_s, tls_context, deidentifier)
