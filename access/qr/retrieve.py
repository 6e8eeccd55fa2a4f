"""What C-MOVE and C-GET send: archived objects, streamed from their files as stored.

The archive is an object store (diana/storage): a folder's objects are sent from their own files,
other stores' are fetched into a temp file for the sub-operation first.

pynetdicom's Q/R service classes accept only ``Dataset`` objects from a handler and then re-encode
them. Objects must come back data-set-identical and a large one must not sit in memory, so the
handlers yield an ``ArchivedInstance`` (a Dataset that only names its file) and ``send_c_store`` is
wrapped once to send such a file as it is (pynetdicom streams a file given by path). Only when the
peer did not accept the file's transfer syntax is the object read and re-encoded by pydicom in one
the peer accepted (between uncompressed syntaxes: the same data set; a compressed object is decoded
to Explicit VR Little Endian, access/transcode.py).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import _config, build_context
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext

from diana.access.qr.file_meta import file_meta_uids
from diana.access.transcode import TranscodeError, explicit_little_endian
from diana.schemas.layout import archive_path
from diana.storage import ObjectStore, local_file

__all__ = [
    "NO_DESTINATION",
    "ArchivedInstance",
    "archive_key",
    "as_archived",
    "even_length",
    "install_file_sending",
    "move_contexts",
]

# pynetdicom sends a data set given by path straight from the file, in PDU-sized reads.
_config.STORE_SEND_CHUNKED_DATASET = True
MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
log = structlog.get_logger("diana.qr")


class ArchivedInstance(Dataset):
    """Stands for the archived object ``key`` of ``archive`` in a Q/R handler's yields; never encoded itself."""

    def __init__(self, archive: ObjectStore, key: str, sop_class_uid: str, sop_instance_uid: str):
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid  # pynetdicom lists it in FailedSOPInstanceUIDList
        self.archive_store = archive
        self.archive_key = key


def archive_key(doc: dict[str, Any]) -> str | None:
    """The archive key ``<Study>/<Series>/<SOP>.dcm`` of an index document; None when a UID is not a valid UID."""
    try:  # archive_path checks the UIDs (once: checking them here first too was 3 % of a WADO-RS series)
        return archive_path(doc["study_instance_uid"], doc["series_instance_uid"], doc["sop_instance_uid"])
    except (KeyError, ValueError):
        return None


_original_send_c_store = Association.send_c_store


# Associations whose peer gave no C-STORE response (connection closed, or the DIMSE timeout passed).
_NO_RESPONSE: weakref.WeakSet[Association] = weakref.WeakSet()


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    if isinstance(dataset, ArchivedInstance):
        if not self.is_established or self in _NO_RESPONSE:
            # The destination went away mid-move: every remaining sub-operation fails at once (pynetdicom
            # counts the exception as a failure), without fetching its object from the archive first.
            raise RuntimeError("the association with the destination has ended")
        # A missing object raises here, and pynetdicom fails that sub-operation (FailedSOPInstanceUIDList).
        with local_file(dataset.archive_store, dataset.archive_key) as path, even_length(Path(path)) as sendable:
            status = _send_file(self, sendable, *args, **kwargs)
        if getattr(status, "Status", None) is None:
            # No response. pynetdicom marks the association ended only when its reactor thread next runs; a
            # send before that goes out on the closed connection and waits for the DIMSE timeout (seen: a
            # move whose destination was killed still hung 60 s later, nothing sent after the first failure).
            _NO_RESPONSE.add(self)
        return status
    return _original_send_c_store(self, dataset, *args, **kwargs)


@contextmanager
def even_length(path: Path) -> Iterator[Path]:
    """``path``, or a temp copy padded with one trailing 00H when its deflated data set has an odd length.

    A deflate stream may end on an odd byte, and senders store it so; but PDV values must have an even
    length (PS3.8 9.3.5.1) and dcmtk aborts the association on an odd fragment (0006:020d), failing
    every sub-operation after it. One trailing null after the stream is the standard's padding of a
    deflated data set; inflating ignores it, so the data set sent is the one stored.
    """
    if path.stat().st_size % 2 == 0:  # the file meta group is even, so the data set is even too
        yield path
        return
    meta, offset = split_dataset(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian or (path.stat().st_size - offset) % 2 == 0:
        yield path  # an odd non-deflated data set is malformed: sent as stored, the peer decides
        return
    with tempfile.TemporaryDirectory(prefix="diana-send-") as folder:
        padded = Path(folder) / path.name
        shutil.copyfile(path, padded)
        with open(padded, "ab") as fh:
            fh.write(b"\x00")
        yield padded


def convertible_context(assoc: Association, sop_class: str) -> bool:
    """Whether ``assoc`` accepted ``sop_class`` for our C-STORE in a syntax an object can be converted to:
    an uncompressed little endian one (what pynetdicom converts between, and what transcoding makes)."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != sop_class or not cx.as_scu or not cx.transfer_syntax:
            continue
        syntax = UID(cx.transfer_syntax[0])
        if not syntax.is_compressed and syntax.is_little_endian:
            return True
    return False


def _send_file(self: Association, path: Any, *args: Any, **kwargs: Any) -> Dataset:
    """Send the file as stored; converted by pydicom only when the peer took none of its syntax."""
    try:
        return _original_send_c_store(self, path, *args, **kwargs)
    except ValueError:
        # No accepted context for the file's own transfer syntax: pynetdicom converts between implicit and
        # explicit VR little endian itself; anything else is made Explicit VR Little Endian here
        # (access/transcode.py: compressed objects decoded). What cannot be fails its sub-operation only.
        sop_class, syntax = file_meta_uids(path)
        if not convertible_context(self, sop_class):
            # The peer (a C-GET requester: it chose what to propose) took this SOP class in no syntax an
            # object can be converted to, or not at all: fail now, not after reading and decoding it whole.
            log.debug("retrieve.not_negotiated", sop_class=UID(sop_class).name, syntax=UID(syntax).name)
            raise
        ds: Dataset = dcmread(path)
        try:
            return _original_send_c_store(self, ds, *args, **kwargs)
        except ValueError:
            try:
                ds = explicit_little_endian(ds)
            except TranscodeError as exc:
                log.warning("retrieve.not_decodable", reason=str(exc))
                raise
            return _original_send_c_store(self, ds, *args, **kwargs)


class _NoDestination:
    """The "address" a C-MOVE handler yields to end the move with a status and connect nowhere."""

    def __repr__(self) -> str:
        return "NO_DESTINATION"


NO_DESTINATION = _NoDestination()


class _NoSubAssociation:
    """What pynetdicom's C-MOVE service class gets instead of a sub-association for NO_DESTINATION: it
    only asks whether it is established and releases it before sending the handler's status."""

    is_established = True

    def release(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def send_c_store(self, *_args: Any, **_kwargs: Any) -> Dataset:
        raise RuntimeError("a refused C-MOVE sends nothing")


_original_associate = ApplicationEntity.associate


def _associate(self: ApplicationEntity, addr: Any, *args: Any, **kwargs: Any) -> Any:
    if addr is NO_DESTINATION:
        return _NoSubAssociation()
    return _original_associate(self, addr, *args, **kwargs)


def install_file_sending() -> None:
    """Make ``send_c_store`` send an ArchivedInstance from its file, and ``associate`` take NO_DESTINATION
    (idempotent)."""
    Association.send_c_store = _send_c_store  # type: ignore[method-assign]
    ApplicationEntity.associate = _associate  # type: ignore[method-assign]


def as_archived(archive: ObjectStore, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The instances with SOP class and transfer syntax read from the archived files' meta.

    The index holds the latest event of a SOP Instance UID; the archive may hold other bytes for it
    (KEEP_FIRST kept an earlier object in another transfer syntax), and those bytes are what is sent.
    """
    out = []
    for doc in instances:
        key = archive_key(doc)
        doc = dict(doc)
        if key is not None:
            try:
                with local_file(archive, key) as path:
                    doc["sop_class_uid"], doc["transfer_syntax_uid"] = file_meta_uids(path)
            except (OSError, AttributeError, InvalidDicomError):
                pass  # missing or unreadable: its sub-operation fails and is reported
        out.append(doc)
    return out


def move_contexts(instances: list[dict[str, Any]]) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE sub-association: one per (SOP class, the objects' own
    transfer syntax), since the peer accepts one syntax per context; then per SOP class one with the
    uncompressed syntaxes, for objects whose own syntax the peer refused (sent converted)."""
    pairs: dict[tuple[str, str], None] = {}
    classes: dict[str, None] = {}
    for doc in instances:
        sop_class, ts = doc.get("sop_class_uid"), doc.get("transfer_syntax_uid")
        if sop_class:
            classes[sop_class] = None
            if ts:
                pairs[(sop_class, ts)] = None
    contexts = [build_context(sop_class, list(_UNCOMPRESSED)) for sop_class in classes]
    contexts += [build_context(sop_class, ts) for sop_class, ts in pairs]
    if len(contexts) > MAX_CONTEXTS:
        log.warning("move.contexts_truncated", proposed=MAX_CONTEXTS, needed=len(contexts))
    return contexts[:MAX_CONTEXTS]
