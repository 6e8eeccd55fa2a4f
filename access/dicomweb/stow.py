"""STOW-RS: one more ingress, through the same path as a C-STORE (producers/ingest.py).

The request body is streamed to a file in the landing store's ``.incoming/`` (same filesystem as
the store, never whole in memory), split into its parts there, and each part is accepted exactly
like a received data set: header validated, bytes fsync'd, InstanceArrived acknowledged by the
broker. Only then does the instance count as stored. The answer is DICOM JSON (PS3.18 10.5.3):
ReferencedSOPSequence for the stored, FailedSOPSequence with a FailureReason per refused instance
(the C-STORE statuses: 0xA900 identifiers, 0xC210 unparseable, 0xA700 broker or disk), and the
status 200 (all stored), 202 (some refused) or 409 (none stored).
"""

from __future__ import annotations

import mmap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from diana.producers.header import HeaderError, InvalidIdentifiers, read_header_file
from diana.producers.ingest import Ingest
from diana.producers.publisher import PublishError
from diana.scratch import ScratchFile

__all__ = ["StowError", "StowResult", "StowTooLarge", "receive_body", "split_and_store", "split_parts", "store_parts"]

log = structlog.get_logger("diana.stow")

INVALID_DATASET = 0xA900
CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0xC211
STUDY_MISMATCH = 0xA900


class StowError(ValueError):
    """The request as a whole cannot be read (400/415); the message says why."""


class StowTooLarge(StowError):
    """The body is larger than ``[dicomweb] max_stow_bytes`` (413); nothing of it is kept."""

    def __init__(self, max_bytes: int):
        super().__init__(
            f"the body is larger than {max_bytes} bytes ([dicomweb] max_stow_bytes): "
            "send the study in several requests, e.g. series by series"
        )


@dataclass
class StowResult:
    stored: list[tuple[str, str, str, str]] = field(default_factory=list)  # class, instance, study, series
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # class, instance, reason, why


def boundary_of(content_type: str) -> str:
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise StowError(f'Content-Type {media or "missing"}: STOW-RS takes multipart/related; type="application/dicom"')
    values = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
    kind = values.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        raise StowError(f"multipart/related type {kind}: only application/dicom instances are accepted")
    if not values.get("boundary"):
        raise StowError("multipart/related without a boundary parameter")
    return values["boundary"]


async def receive_body(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> ScratchFile:
    """The request body, streamed to a file in ``folder``; StowTooLarge once it passes ``max_bytes``.
    The file is removed if the body does not arrive whole (too large, the client gone, any error); else
    the caller removes it (``remove``). Held locked while it exists (diana/scratch.py): a receiver
    starting meanwhile sweeps ``.incoming/`` and removed it under the request."""
    body = ScratchFile(folder, prefix="stow-")
    try:
        size = 0
        async with anyio.wrap_file(body.open("wb")) as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise StowTooLarge(max_bytes)
                await out.write(chunk)
    except BaseException:
        body.remove()
        raise
    return body


def split_parts(body: Path, boundary: str, folder: Path) -> list[ScratchFile]:
    """Each part's content as a file in ``folder`` (headers dropped; only application/dicom parts come),
    held locked until removed (``store_parts`` removes them): a receiver starting meanwhile leaves them."""
    if body.stat().st_size == 0:
        raise StowError("the request body is empty")
    parts: list[ScratchFile] = []
    try:
        _split_into(body, boundary.encode(), folder, parts)
    except BaseException:
        remove(parts)  # a request refused whole keeps none of its parts
        raise
    if not parts:
        raise StowError("the body holds no instance")
    return parts


def remove(parts: list[ScratchFile]) -> None:
    for part in parts:
        part.remove()


def _split_into(body: Path, boundary: bytes, folder: Path, parts: list[ScratchFile]) -> None:
    """Append to ``parts`` each part's content written to a file of its own, as the body is read."""
    delimiter = b"--" + boundary
    with open(body, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = data.find(delimiter)
        if position < 0:
            raise StowError("the body holds no part with the declared boundary")
        while True:
            start = position + len(delimiter)
            if data[start : start + 2] == b"--":
                break  # the close delimiter
            headers_end = data.find(b"\r\n\r\n", start)
            following = data.find(b"\r\n" + delimiter, start)
            if headers_end < 0 or following < 0 or headers_end > following:
                raise StowError("a part is not terminated by the boundary (truncated body?)")
            headers = data[start:headers_end].decode("latin-1").lower()
            if "content-type" in headers and "application/dicom" not in headers:
                raise StowError("a part is not application/dicom")
            held = ScratchFile(folder, prefix="stow-part-")
            parts.append(held)
            with held.open("wb") as part:
                offset, end = headers_end + 4, following
                while offset < end:
                    piece = min(end - offset, 1 << 20)
                    part.write(data[offset : offset + piece])
                    offset += piece
            position = following + 2


def split_and_store(ingest: Ingest, body: Path, boundary: str, study_uid: str | None) -> StowResult:
    """The body's parts accepted one by one (StowError if the body cannot be read); one call, so that
    no part is left behind between the two steps by a request cancelled meanwhile."""
    return store_parts(ingest, split_parts(body, boundary, ingest.landing.incoming), study_uid)


def store_parts(ingest: Ingest, parts: list[ScratchFile], study_uid: str | None) -> StowResult:
    """Accept each part as a received data set; every part file is gone when this returns or raises, and
    held until then (its hard link beside the landed objects too: the same inode)."""
    try:
        return _store_each(ingest, parts, study_uid)
    finally:
        remove(parts)  # those landed were hard-linked: their names here are no longer needed


def _store_each(ingest: Ingest, parts: list[ScratchFile], study_uid: str | None) -> StowResult:
    result = StowResult()
    for held in parts:
        part = held.path
        try:
            header = read_header_file(part, ingest.header_budget, ingest.max_inflated_bytes, ingest.landing.incoming)
        except (HeaderError, InvalidIdentifiers) as exc:
            code = INVALID_DATASET if isinstance(exc, InvalidIdentifiers) else CANNOT_UNDERSTAND
            result.failed.append(("", "", code, str(exc)))
            held.remove()
            continue
        except OSError as exc:  # e.g. no room for an inflated copy
            result.failed.append(("", "", OUT_OF_RESOURCES, f"landing store: {exc.strerror}"))
            held.remove()
            continue
        ids = (header.sop_class_uid, header.sop_instance_uid)
        if study_uid and header.study_instance_uid != study_uid:
            result.failed.append((*ids, STUDY_MISMATCH, "the instance belongs to another study than the URL's"))
            held.remove()
            continue
        try:
            ingest.accept_file(part, "STOW_RS", owned=True, called_ae="DICOMWEB")
        except InvalidIdentifiers as exc:
            result.failed.append((*ids, INVALID_DATASET, str(exc)))
        except HeaderError as exc:
            result.failed.append((*ids, CANNOT_UNDERSTAND, str(exc)))
        except PublishError:
            result.failed.append((*ids, OUT_OF_RESOURCES, "the broker did not acknowledge: retry later"))
        except OSError as exc:
            result.failed.append((*ids, OUT_OF_RESOURCES, f"landing store: {exc.strerror}"))
        except Exception:
            log.exception("stow.failed")
            result.failed.append((*ids, PROCESSING_FAILURE, "unexpected failure (logged)"))
        else:
            result.stored.append((*ids, header.study_instance_uid, header.series_instance_uid))
        held.remove()  # landed by hard link: this name is no longer needed
    return result


def response_json(result: StowResult, base: str) -> dict:
    """PS3.18 Table 10.5.3-1 as DICOM JSON."""
    body: dict = {}
    if result.stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [sop_class]},
                    "00081155": {"vr": "UI", "Value": [sop]},
                    "00081190": {"vr": "UR", "Value": [f"{base}/studies/{study}/series/{series}/instances/{sop}"]},
                }
                for sop_class, sop, study, series in result.stored
            ],
        }
    if result.failed:
        items = []
        for sop_class, sop, reason, _why in result.failed:
            item: dict = {"00081197": {"vr": "US", "Value": [reason]}}
            if sop_class:
                item["00081150"] = {"vr": "UI", "Value": [sop_class]}
            if sop:
                item["00081155"] = {"vr": "UI", "Value": [sop]}
            items.append(item)
        body["00081198"] = {"vr": "SQ", "Value": items}
    return body
