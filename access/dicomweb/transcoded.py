"""WADO-RS bodies for a client that did not ask for objects as stored (access/dicomweb/negotiation.py).

Objects already in Explicit VR Little Endian are streamed as stored; others are read whole, made Explicit
VR Little Endian (access/transcode.py: compressed ones decoded) and sent, one object in memory at a
time. An object that cannot be decoded here is left out of the body (its headers have gone out already,
so the status cannot change any more) and counted in the log line, like one not archived yet.
Frames of a compressed object are decoded one by one when native pixels are asked for.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from diana.access.dicomweb.wado import (
    BLOCK,
    check_native_length,
    compressed,
    frame_count,
    held_length,
    located_frames,
    native_frame_size,
    read_to_pixel_data,
)
from diana.access.qr.file_meta import transfer_syntax_in
from diana.access.transcode import (
    MAX_DECODED_BYTES,
    TranscodeError,
    decoded_size,
    decoder_reason,
    explicit_little_endian,
)
from diana.storage import ObjectNotFound, ObjectStore

__all__ = ["decoded_frames", "iter_decoded_frames", "multipart_explicit_le"]

# The file meta group ends within this many bytes in any object seen; a longer one is read whole.
_META_PREFIX = 64 << 10

log = structlog.get_logger("diana.dicomweb")


class _Counts:
    sent = missing = undecodable = 0


def _object_parts(archive: ObjectStore, key: str, head: bytes, counts: _Counts) -> Iterator[bytes]:
    """The part of one object (head, Explicit VR Little Endian bytes, CRLF); nothing when it cannot be sent."""
    try:
        with archive.open(key) as stream:
            prefix = stream.read(_META_PREFIX)
            syntax = transfer_syntax_in(prefix)  # None (meta past the prefix, or no meta): read whole below
            if syntax == ExplicitVRLittleEndian:
                counts.sent += 1
                yield head + prefix
                while chunk := stream.read(BLOCK):
                    yield chunk
                yield b"\r\n"
                return
            whole = prefix + stream.read()
    except ObjectNotFound:
        counts.missing += 1
        return
    try:
        ds = explicit_little_endian(dcmread(BytesIO(whole)))
        out = BytesIO()
        try:
            ds.save_as(out, enforce_file_format=True)
        except AttributeError:  # a file meta group without its required elements, as stored: kept so
            out = BytesIO()
            ds.save_as(out, enforce_file_format=False)
    except (TranscodeError, InvalidDicomError) as exc:
        counts.undecodable += 1
        log.warning("wado.not_decodable", reason=str(exc))
        return
    except Exception as exc:  # one odd object must not cut the body short for every object after it
        counts.undecodable += 1
        log.warning("wado.not_convertible", error=type(exc).__name__)  # no message: it may quote a value
        return
    counts.sent += 1
    yield head + out.getvalue() + b"\r\n"


def _body(archive: ObjectStore, keys: list[str], boundary: str, counts: _Counts) -> Generator[bytes, None, None]:
    head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={ExplicitVRLittleEndian}\r\n\r\n".encode()
    for key in keys:
        yield from _object_parts(archive, key, head, counts)
    yield f"--{boundary}--\r\n".encode()


def _next_block(pieces: Iterator[bytes]) -> bytes:
    """About BLOCK bytes of ``pieces`` (blocking); b"" at their end."""
    block = bytearray()
    for piece in pieces:
        block += piece
        if len(block) >= BLOCK:
            break
    return bytes(block)


async def multipart_explicit_le(archive: ObjectStore, keys: list[str], boundary: str) -> AsyncIterator[bytes]:
    """The objects in Explicit VR Little Endian as multipart/related parts, read in worker threads."""
    counts = _Counts()
    pieces = _body(archive, keys, boundary, counts)
    try:
        while block := await anyio.to_thread.run_sync(_next_block, pieces):
            yield block
    finally:
        await anyio.to_thread.run_sync(pieces.close)
        if counts.missing or counts.undecodable:
            log.warning(
                "wado.left_out", not_archived=counts.missing, not_decodable=counts.undecodable, sent=counts.sent
            )


def decoded_frames(source: Path | BinaryIO, numbers: list[int]) -> list[bytes]:
    """Frames (1-based) of a compressed or big endian object (its path, or its open file) as native little
    endian pixels, decoded one by one (iter_decoded_frames), all of them before this returns."""
    return list(iter_decoded_frames(source, numbers))


def iter_decoded_frames(source: Path | BinaryIO, numbers: list[int]) -> Iterator[bytes]:
    """The frames of decoded_frames, each decoded when its turn comes; the first one before this returns,
    so an object whose frames cannot be decoded here is refused before a body is started.

    The header is read once and the frames located as the as-stored path locates them (wado.located_frames:
    the offset tables checked against the items, each frame's bytes read alone); each frame is then decoded
    by itself, as the one frame of the header's data set. pydicom's ``pixel_array(file, index=n)`` read the
    header again for every frame and walked the items up to it (through S3, a request each), trusting the
    offset tables.

    LookupError when the object has no pixel data, IndexError for a frame it does not have, CorruptObject
    when its header, its tables or the length of its pixel data are wrong, TranscodeError when a frame
    cannot be decoded here."""
    if isinstance(source, Path | str):
        with open(source, "rb") as stream:
            return iter(list(iter_decoded_frames(stream, numbers)))
    ds, element = read_to_pixel_data(source)  # the header; the pixel data's length, its value not read
    if element is None:
        raise LookupError("the object has no pixel data")  # as from wado.frame_bytes: 404 either way
    count = frame_count(ds, numbers)
    _, needed = native_frame_size(ds, count)
    stored = held_length(source, element) if element.value is None else len(element.value)
    if not compressed(ds):
        check_native_length(stored, count, needed)
    if decoded_size(ds) // count * len(numbers) > MAX_DECODED_BYTES:
        raise TranscodeError(f"the frames asked for would take more than {MAX_DECODED_BYTES >> 20} MiB decoded")
    if not numbers:
        return iter(())
    if (
        element.VR == "OW"
        and int(ds.BitsAllocated) == 8  # pydicom never swaps 1-bit data by words
        and not compressed(ds)
        and not getattr(element, "is_little_endian", True)
    ):
        # 8-bit pixels stored big endian as OW: swapped by words, so a frame is not a slice of the value as
        # stored (its edges can split a word). Rare: pydicom reads each frame of the whole value.
        return iter([_whole_value_frame(source, number) for number in numbers])
    frames = located_frames(source, ds, element, numbers)
    encapsulated = compressed(ds)
    # The header made the header of one frame: the frame replaces the pixel data, no offset table says
    # where frames were in the whole value.
    for tag in (0x7FE00001, 0x7FE00002):
        if tag in ds:
            del ds[tag]
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = 1
    # The value's VR as stored: a big-endian object's 8-bit pixels stored as OW are swapped by words.
    vr = str(element.VR) if element.VR in ("OB", "OW") else "OB" if encapsulated or int(ds.BitsAllocated) <= 8 else "OW"
    pairs = zip(numbers, frames, strict=True)
    number, frame = next(pairs)
    first = _decoded_frame(ds, number, frame, encapsulated, vr)
    return itertools.chain([first], (_decoded_frame(ds, n, f, encapsulated, vr) for n, f in pairs))


def _decoded_frame(ds: Any, number: int, frame: bytes, encapsulated: bool, vr: str) -> bytes:
    """``frame`` (as stored) decoded, little endian, with the header ``ds`` describing it as its one frame."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    ds.PixelData = encapsulate([frame]) if encapsulated else frame
    ds["PixelData"].VR = vr
    return _little_endian_pixels(number, lambda: get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=0)[0])


def _whole_value_frame(source: BinaryIO, number: int) -> bytes:
    from pydicom.pixels import pixel_array

    source.seek(0)
    return _little_endian_pixels(number, lambda: pixel_array(source, index=number - 1))


def _little_endian_pixels(number: int, decode: Callable[[], Any]) -> bytes:
    """The pixels ``decode`` gives frame ``number`` as little-endian bytes; TranscodeError if it cannot."""
    try:
        array = decode()
    except OSError:
        raise  # the archive's fault (on S3: ObjectChanged, StorageError), not the frame's
    except Exception as exc:  # pydicom raises by plugin: RuntimeError, ValueError, NotImplementedError...
        raise TranscodeError(f"frame {number} is not decodable here ({decoder_reason(exc)})") from exc
    return bytes(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
