"""WADO-RS bodies: archived objects as multipart/related, streamed file by file, and metadata.

A series is never held in memory: the body is read from the archive files in blocks of about 4 MiB
(as many objects per block as fit) as the client takes them. An object that is not in the archive
(indexed, not archived yet) is left out of the body when its turn comes, not looked up beforehand:
one existence check per object before the first byte was a quarter of a series' retrieval time
(and would be one HEAD request per object on S3). Metadata is the DICOM JSON header the
receiver stored with each indexed instance, its BulkDataURIs made absolute under this service's base URL.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from diana.schemas.series_metadata import absolute_bulk_uris
from diana.storage import ObjectNotFound, ObjectStore

__all__ = [
    "CorruptObject",
    "EncapsulatedPixels",
    "BULK_VRS",
    "BulkTooLarge",
    "BulkValue",
    "bulk_chunks",
    "bulk_is_encapsulated_pixels",
    "bulk_steps",
    "little_endian",
    "read_bulk",
    "multipart_dicom",
    "metadata",
    "new_boundary",
    "frame_bytes",
    "stored_frames",
    "located_frames",
    "held_length",
    "frame_count",
    "frame_numbers",
    "check_native_length",
    "compressed",
    "native_frame_size",
    "read_archived",
    "read_to_pixel_data",
    "stored_syntax",
    "transfer_syntax",
]

# One worker-thread call reads about this much of the body (boundaries and as many objects as fit):
# one thread hop and one ASGI send per block, not three hops and three sends per object. Each hop
# wakes the event loop from the worker thread, and on a loaded machine a wake-up waits for a CPU:
# 4 MiB blocks made a quarter of the hops of 1 MiB ones (docs/PERFORMANCE.md, issue 17).
BLOCK = 4 << 20

log = structlog.get_logger("diana.dicomweb")


def new_boundary() -> str:
    return f"diana-{uuid.uuid4().hex}"


class _MultipartBody:
    """The multipart/related body over ``keys``, read block by block (blocking; run in a worker thread).

    At most one object is open at a time, and at most one block is in memory.
    """

    def __init__(self, archive: ObjectStore, keys: list[str], boundary: str, content_type: str):
        self._archive = archive
        self._keys = iter(keys)
        self._head = f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        tail = f"--{boundary}--\r\n".encode()
        self._tail: bytes | None = tail
        self._opened: AbstractContextManager[BinaryIO] | None = None
        self._stream: BinaryIO | None = None
        self.sent = 0
        self.missing = 0
        # A head, a closing CRLF or the tail may start just below BLOCK: room for them past it.
        self._capacity = BLOCK + len(self._head) + len(tail) + 2

    def read_block(self) -> memoryview | bytes:
        """The next ~BLOCK bytes of the body; b"" at its end.

        Objects are read straight into one new buffer per block (``readinto``), handed on as a view of
        it: not each object into a ``bytes`` that is then joined, nor the block copied into a ``bytes``
        (a quarter less server CPU per series together with httptools and uvloop, docs/PERFORMANCE.md).
        A new buffer per block, not one reused: the server may still hold the last one when this runs."""
        view = memoryview(bytearray(self._capacity))
        size = 0

        def put(data: bytes) -> None:
            nonlocal size
            view[size : size + len(data)] = data
            size += len(data)

        while size < BLOCK:
            if self._stream is None:
                key = next(self._keys, None)
                if key is None:
                    if self._tail is not None:
                        put(self._tail)
                        self._tail = None
                    break
                try:
                    opened = self._archive.open(key)
                    self._stream = opened.__enter__()
                except ObjectNotFound:
                    self.missing += 1
                    continue
                self._opened = opened
                self.sent += 1
                put(self._head)
                if size >= BLOCK:
                    break
            count = self._stream.readinto(view[size:BLOCK])  # type: ignore[attr-defined]
            if count:
                size += count
            else:
                self.close()
                put(b"\r\n")
        return view[:size] if size else b""

    def after_read(self, read: asyncio.Future[memoryview | bytes]) -> None:
        """Close, once the read ``read`` has ended; what it read or raised is of no use any more."""
        if not read.cancelled():
            read.exception()  # taken, so that asyncio does not log it as never retrieved
        self.close()

    def close(self) -> None:
        if self._opened is not None:
            opened, self._opened, self._stream = self._opened, None, None
            opened.__exit__(None, None, None)


async def multipart_dicom(
    archive: ObjectStore, keys: list[str], boundary: str, content_type: str = "application/dicom"
) -> AsyncIterator[memoryview | bytes]:
    """The objects as stored, streamed in blocks of about 4 MiB; the store's blocking reads run in a
    worker thread, one block ahead: the next block is read while the event loop sends this one (one
    after the other, the two CPUs took turns; 15 % faster on the shared machine, docs/PERFORMANCE.md).
    At most two blocks are in memory besides what the transport holds."""
    body = _MultipartBody(archive, keys, boundary, content_type)
    loop = asyncio.get_running_loop()
    ahead = loop.run_in_executor(None, body.read_block)
    try:
        while block := await ahead:
            ahead = loop.run_in_executor(None, body.read_block)
            yield block
    finally:
        # Not awaited (the response may be ending because its task was cancelled): the file is closed
        # when the read in flight, if any, has returned.
        if ahead.done():
            body.after_read(ahead)
        else:
            ahead.add_done_callback(body.after_read)
        if body.missing:
            log.warning("wado.not_archived", left_out=body.missing, sent=body.sent)


def metadata(documents: Iterator[dict[str, Any]], base: str, chunk_bytes: int = BLOCK) -> Iterator[bytes]:
    """A JSON array of DICOM JSON data sets, written as it is read, in chunks of about ``chunk_bytes``
    (one worker-thread hop each, as the objects' BLOCKs)."""
    import json

    parts, size, first = [b"["], 1, True
    for doc in documents:
        header = doc.get("dicom")
        if not header:
            continue
        part = (b"" if first else b",") + json.dumps(absolute_bulk_uris(header, base), separators=(",", ":")).encode()
        first = False
        parts.append(part)
        size += len(part)
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    parts.append(b"]")
    yield b"".join(parts)


def frame_numbers(text: str) -> list[int]:
    """The frame list of a WADO-RS frames URL (PS3.18: one or more frame numbers, none twice); ValueError
    saying what is wrong. A number asked twice is refused: each would be a copy of the frame in the body."""
    items = text.split(",")
    if not all(item.isascii() and item.isdigit() and len(item) <= 9 for item in items):
        raise ValueError("frames: a comma-separated list of frame numbers, e.g. 1,3")
    numbers = [int(item) for item in items]
    seen: set[int] = set()
    for number in numbers:
        if number == 0:
            raise ValueError("frames: frame numbers start at 1")
        if number in seen:
            raise ValueError(f"frames: frame {number} is asked for more than once")
        seen.add(number)
    return numbers


class CorruptObject(ValueError):
    """An archived object whose frames cannot be read as its own header describes them. The text names
    attributes and sizes, never a value of the data set."""


def frame_count(ds: Any, numbers: list[int]) -> int:
    """The object's number of frames; IndexError naming the first of ``numbers`` (1-based) it does not have."""
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise CorruptObject("its Number of Frames (0028,0008) is not a number") from None
    if count < 1:
        raise CorruptObject(f"its Number of Frames (0028,0008) is {count}")
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise IndexError(f"frame {bad[0]} does not exist: the object has {count} frame(s)")
    return count


def native_frame_size(ds: Any, count: int) -> tuple[int, int]:
    """(bytes of one native frame, bytes ``count`` frames need), from the image pixel module;
    CorruptObject naming what is missing."""
    try:
        rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except AttributeError as exc:  # "... has no attribute 'Rows'"
        raise CorruptObject(f"its image pixel module has no {str(exc).rsplit(' ', 1)[-1]}") from None
    except (TypeError, ValueError):
        raise CorruptObject("its image pixel module holds a value that is not a number") from None
    if min(rows, columns, bits, samples) < 1:
        raise CorruptObject("its image pixel module has a size of 0")
    pixels = rows * columns * samples
    if bits == 1:  # bit-packed: the frames follow each other bit by bit
        return pixels // 8, (pixels * count + 7) // 8
    frame = pixels * bits // 8
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        frame = frame // 3 * 2  # one Cb and one Cr for every two pixels (PS3.3 C.7.6.3.1.2)
    return frame, frame * count


def transfer_syntax(meta: Any) -> Any:
    """The Transfer Syntax UID of an object's file meta information; CorruptObject if it names none."""
    syntax = meta.get("TransferSyntaxUID")
    if not syntax:
        raise CorruptObject("its file meta information has no Transfer Syntax UID")
    return syntax


def compressed(ds: Any) -> bool:
    """Whether the object's transfer syntax encapsulates its pixel data; CorruptObject if it names none."""
    return bool(transfer_syntax(ds.file_meta).is_compressed)


def check_native_length(stored: int, count: int, needed: int) -> None:
    """CorruptObject when native pixel data of ``stored`` bytes is shorter than its ``count`` frames
    need: sliced as it is, the last frames would be short or empty, and served as if whole."""
    if stored < needed:
        raise CorruptObject(f"its pixel data holds {stored} bytes, its {count} frame(s) need {needed}")


def stored_syntax(source: Path | BinaryIO) -> Any:
    """The Transfer Syntax UID of the archived object at ``source`` (a path, or its open file, left at
    its start), from its file meta information only; InvalidDicomError when it has none, CorruptObject
    when it names no transfer syntax."""
    from pydicom.filereader import _read_file_meta_info, read_file_meta_info, read_preamble

    if isinstance(source, Path | str):
        return transfer_syntax(read_file_meta_info(source))
    source.seek(0)
    try:
        read_preamble(source, False)
        return transfer_syntax(_read_file_meta_info(source))
    finally:
        source.seek(0)


def _deflated(source: Path | BinaryIO) -> bool:
    """Whether the object is Deflated Explicit VR Little Endian (no when its file meta cannot say: pydicom
    then reads it as before, and says what is wrong)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        return bool(stored_syntax(source) == DeflatedExplicitVRLittleEndian)
    except OSError:
        raise
    except Exception:
        if not isinstance(source, Path | str):
            source.seek(0)
        return False


def read_archived(source: Path | BinaryIO, **options: Any) -> Any:
    """The archived object's data set (pydicom's ``dcmread`` ``options``), from its path or its open file
    (read from its start; a deferred value is then read from that same file, not from the path again);
    CorruptObject when pydicom cannot read it, which pydicom says in many kinds of errors.

    A Deflated Explicit VR Little Endian object is read without ``defer_size``: pydicom inflates it whole
    in memory, and a deferred value's position is one in the inflated data set, which pydicom would look
    for in the deflated file (another element's bytes, or an error)."""
    import pydicom

    if options.get("defer_size") is not None and _deflated(source):
        options = {**options, "defer_size": None}
    try:
        if isinstance(source, Path | str):
            return pydicom.dcmread(source, **options)
        source.seek(0)
        ds = pydicom.dcmread(source, **options)
        # pydicom reads a deferred value of an io.BufferedReader by opening its name again: the file now
        # at that path, perhaps another version (an archive REPLACE renamed over it). Its open buffer, if
        # set, comes first: the version opened.
        ds.buffer = source
        return ds
    except OSError:
        raise  # the archive's fault, not the object's
    except Exception as exc:
        raise CorruptObject(f"pydicom cannot read it ({type(exc).__name__})") from None


def frame_bytes(source: Path | BinaryIO, numbers: list[int]) -> list[bytes]:
    """The frames (1-based) of an archived object (its path or its open file): native pixel data sliced,
    encapsulated frames as stored. Only the frames asked for are read (stored_frames)."""
    if isinstance(source, Path | str):
        with open(source, "rb") as stream:
            return list(stored_frames(stream, numbers))
    return list(stored_frames(source, numbers))


def stored_frames(stream: BinaryIO, numbers: list[int]) -> Iterator[bytes]:
    """The frames (1-based) of the archived object open as ``stream``, as stored, each read from the file
    when its turn comes: a frame request of a multi-frame object (a viewer asks for them one by one) reads
    that frame, not the whole pixel data. The header is read and checked first (LookupError without pixel
    data, IndexError for a frame the object does not have, CorruptObject when its native pixel data is
    shorter than its frames); a frame that cannot be read raises CorruptObject when its turn comes.

    The header is read up to the pixel data (read_to_pixel_data), not past it. A value pydicom holds in
    memory (a deflated object's, whose offsets are in the inflated data set) is sliced as it is."""
    ds, element = read_to_pixel_data(stream)  # other large values are not read
    return located_frames(stream, ds, element, numbers)


def located_frames(stream: BinaryIO, ds: Any, element: Any, numbers: list[int]) -> Iterator[bytes]:
    """stored_frames of the object whose header (``ds``, its Pixel Data ``element``) read_to_pixel_data
    read from ``stream``: every check made and every frame located on this call, each read lazily."""
    if element is None:
        raise LookupError("the object has no pixel data")
    count = frame_count(ds, numbers)
    deferred = element.value is None
    if compressed(ds):
        extended = _extended_offsets(ds)
        if deferred:
            return _encapsulated_frames(stream, element.value_tell, numbers, count, extended)
        return _encapsulated_frames(bytes(element.value), 0, numbers, count, extended)
    size, needed = native_frame_size(ds, count)
    if deferred and element.length != _UNDEFINED_LENGTH:
        source, start, held = stream, element.value_tell, held_length(stream, element)
    else:  # held in memory (a deflated object's, native pixel data of undefined length): read as a file
        pixels = bytes(ds.PixelData)
        source, start, held = io.BytesIO(pixels), 0, len(pixels)
    check_native_length(held, count, needed)
    bits = _bits_a_frame(ds)
    if bits % 8:
        return (_bit_packed_frame(source, start, bits, n) for n in numbers)
    return _native_frames(source, start, size, numbers)


def held_length(stream: BinaryIO, element: Any) -> int:
    """The bytes the object open as ``stream`` holds of a deferred value: its length, or fewer when the
    file ends first (a cut file's element still claims its whole length)."""
    end = stream.seek(0, io.SEEK_END)
    return min(int(element.length), end - int(element.value_tell))


def _bits_a_frame(ds: Any) -> int:
    """Bits of one native frame: a multiple of 8 but for bit-packed (BitsAllocated 1) frames whose pixel
    count is not, where frames follow each other bit by bit (PS3.5 8.1.1)."""
    if int(ds.BitsAllocated) != 1:
        return 8
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)


def _bit_packed_frame(stream: BinaryIO, start: int, bits: int, number: int) -> bytes:
    """Frame ``number`` of bit-packed pixels whose frames do not begin on a byte, made a frame of its own:
    its bits from the first of its own, packed from the first bit of its first byte (as a single-frame
    object holds it; the bytes as stored would begin with the previous frame's last pixels)."""
    import numpy as np

    first = (number - 1) * bits
    stream.seek(start + first // 8)
    span = (first % 8 + bits + 7) // 8
    data = stream.read(span)
    if len(data) < span:
        raise CorruptObject(f"the object ends inside its frame {number}")
    unpacked = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return bytes(np.packbits(unpacked[first % 8 : first % 8 + bits], bitorder="little").tobytes())


_UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs whose element header has a 4-byte length after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def _encoding_read(ds: Any) -> tuple[bool, bool]:
    """(implicit VR, little endian) as pydicom found the data set encoded, which may differ from what its
    file meta says (pydicom reads such a file; so must what reads on from where pydicom stopped): from its
    last top-level element still raw; the file meta's word when there is none."""
    from pydicom.dataelem import RawDataElement

    # The latest still raw: pydicom converts a sequence of undefined length (often the last before the
    # pixel data: per-frame functional groups, an icon) as it reads it, and a converted one says nothing.
    for key in reversed(list(ds.keys())):
        raw = ds.get_item(key, keep_deferred=True)
        if isinstance(raw, RawDataElement):
            return bool(raw.is_implicit_VR), bool(raw.is_little_endian)
    implicit, little = ds.original_encoding
    return bool(implicit), bool(little)


def read_to_pixel_data(stream: BinaryIO) -> tuple[Any, Any]:
    """The archived object open as ``stream``: its data set (pydicom's, values over 1 KiB deferred) and its
    Pixel Data (7FE0,0010) element as a pydicom RawDataElement, its value not read (None when the object
    has no pixel data).

    The data set is read up to the pixel data and the element's header from there: pydicom reading past
    it walks an encapsulated value's items to find where it ends, an item header for every frame, and
    each is a request when the object is on S3. A deflated object (its offsets are the inflated data's)
    and native pixel data of undefined length (its end only a delimiter tells) are read whole, as
    before: then the element holds its value."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    if not _deflated(stream):
        ds = read_archived(stream, defer_size=_DEFER, stop_before_pixels=True)
        implicit, little = _encoding_read(ds)
        start = stream.tell()
        head = stream.read(8)
        if len(head) < 8 or struct.unpack("<HH" if little else ">HH", head[:4]) != (0x7FE0, 0x0010):
            return ds, None  # no pixel data (or Float Pixel Data, where pydicom stopped too)
        endian = "<" if little else ">"
        vr, offset = "OB or OW", 8
        if implicit:
            length = struct.unpack(endian + "L", head[4:8])[0]
        else:
            vr = head[4:6].decode("latin-1")
            if vr in _LONG_VRS:
                more = stream.read(4)
                if len(more) < 4:
                    raise CorruptObject("it ends inside its pixel data's header")
                length, offset = struct.unpack(endian + "L", more)[0], 12
            else:
                length = struct.unpack(endian + "H", head[6:8])[0]
        if length != _UNDEFINED_LENGTH or transfer_syntax(ds.file_meta).is_encapsulated:
            return ds, RawDataElement(Tag(0x7FE00010), vr, length, None, start + offset, implicit, little)
    ds = read_archived(stream, defer_size=_DEFER)
    return ds, (ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None)


def _extended_offsets(ds: Any) -> tuple[list[int], list[int]] | None:
    """The Extended Offset Table and its lengths (7FE0,0001-0002), decoded, when the object has both and
    they are not empty (an empty pair says nothing: as if absent)."""
    if 0x7FE00001 not in ds or 0x7FE00002 not in ds:
        return None
    try:
        offsets, lengths = bytes(ds[0x7FE00001].value or b""), bytes(ds[0x7FE00002].value or b"")
        little = ds.original_encoding[1] is not False
        if not offsets and not lengths:
            return None
        if len(offsets) % 8 or len(lengths) % 8:
            raise ValueError("not 64-bit values")
        endian = "<" if little else ">"
        return (
            list(struct.unpack(f"{endian}{len(offsets) // 8}Q", offsets)),
            list(struct.unpack(f"{endian}{len(lengths) // 8}Q", lengths)),
        )
    except OSError:
        raise
    except Exception:
        raise CorruptObject("its Extended Offset Table cannot be read") from None


def _native_frames(stream: BinaryIO, start: int, size: int, numbers: list[int]) -> Iterator[bytes]:
    for number in numbers:
        stream.seek(start + (number - 1) * size)
        frame = stream.read(size)
        if len(frame) < size:
            raise CorruptObject(f"the object ends inside its frame {number}")
        yield frame


_ITEM_TAG, _DELIMITER_TAG = 0xFFFEE000, 0xFFFEE0DD
# A fragment: where its data starts in the stream, and its length.
Fragment = tuple[int, int]


class _Items:
    """The items of an encapsulated value (PS3.5 A.4), read by their 8-byte headers, never their data:
    where each fragment's data is and how long it is. Offsets of the offset tables count from the first
    fragment's item, the byte after the Basic Offset Table."""

    def __init__(self, stream: BinaryIO, start: int):
        self.stream = stream
        stream.seek(start)
        tag, length = self.header(start)
        if tag != _ITEM_TAG or length % 4:
            raise CorruptObject("its encapsulated pixel data does not begin with a Basic Offset Table item")
        table = stream.read(length)
        if len(table) < length:
            raise CorruptObject("it ends inside its Basic Offset Table")
        self.basic = list(struct.unpack(f"<{length // 4}L", table))
        self.first = start + 8 + length

    def header(self, at: int, exact: bool = False) -> tuple[int, int]:
        """The item's (tag, length) at ``at``; ``exact``: read those 8 bytes only where the stream reads
        ahead (S3's view, ``read_exact``), not a window of the data after them."""
        self.stream.seek(at)
        read_exact = getattr(self.stream, "read_exact", None) if exact else None
        head = read_exact(8) if read_exact is not None else self.stream.read(8)
        if len(head) < 8:
            raise CorruptObject("its encapsulated pixel data ends before its sequence delimiter")
        group, element, length = struct.unpack("<HHL", head)
        return group << 16 | element, length

    def walk(self, at: int, until: int | None = None) -> list[Fragment]:
        """The fragments from the item at ``at`` to the item at ``until`` (exactly) or the delimiter.

        On a stream that reads ahead (S3's view: a small read fetches ``read_ahead`` bytes from where it
        starts), a header after a fragment too long for a window fetched at its own header to reach the
        next one is read exactly: the window would hold the fragment's data, which the walk skips, and
        no other header (frames of a MiB or more: a MiB a header before). The previous fragment's
        length tells: the items of one object are alike. Smaller fragments keep the window, which holds
        the next headers: fewer requests."""
        read_ahead = getattr(self.stream, "read_ahead", None)
        fragments: list[Fragment] = []
        previous = 0  # the length of the fragment before the header read next
        while at != until:
            if until is not None and at > until:
                raise CorruptObject("its Basic Offset Table does not fall on its items")
            exact = isinstance(read_ahead, int) and 8 + previous + 8 > read_ahead
            tag, length = self.header(at, exact)
            previous = length
            if tag == _DELIMITER_TAG and until is None:
                return fragments
            if tag != _ITEM_TAG or length == _UNDEFINED_LENGTH:
                raise CorruptObject("an item of its encapsulated pixel data is malformed")
            fragments.append((at + 8, length))
            at += 8 + length
        return fragments


def _frame_fragments(
    items: _Items, count: int, numbers: list[int], extended: tuple[list[int], list[int]] | None
) -> list[list[Fragment]] | None:
    """The fragments of each frame asked for, every one checked against the items before any is read; None
    for several fragments a frame without an offset table (only the JPEG markers in the data tell those apart).

    An Extended Offset Table must give every frame, each at an item of its length (PS3.5 A.4: one
    fragment a frame); a Basic Offset Table, every frame's first item in order, the frame then being the
    items up to the next one's (or the delimiter). Without a table: one fragment a frame, or one frame."""
    if extended is not None:
        offsets, lengths = extended
        if len(offsets) != count or len(lengths) != count:
            raise CorruptObject(f"its Extended Offset Table has {len(offsets)} entries for its {count} frames")
        if any(offsets[i + 1] < offsets[i] + 8 + lengths[i] for i in range(count - 1)):
            raise CorruptObject("its Extended Offset Table's frames are not one after the other")
        out = []
        for number in numbers:
            at, length = items.first + offsets[number - 1], lengths[number - 1]
            tag, item_length = items.header(at)
            # The frame's own length; its item may hold one byte more (padded to even length).
            if tag != _ITEM_TAG or item_length not in (length, length + 1):
                raise CorruptObject(f"its Extended Offset Table does not point at frame {number}'s item")
            out.append([(at + 8, length)])
        return out
    if count == 1:
        return [items.walk(items.first)]  # every fragment, whatever a Basic Offset Table says of them
    basic = items.basic
    if basic:
        if len(basic) != count or basic[0] != 0 or any(b <= a for a, b in zip(basic, basic[1:], strict=False)):
            raise CorruptObject(f"its Basic Offset Table has {len(basic)} entries, not {count} from 0 ascending")
        return [items.walk(items.first + basic[n - 1], items.first + basic[n] if n < count else None) for n in numbers]
    fragments = items.walk(items.first)
    if len(fragments) == count:
        return [[fragments[n - 1]] for n in numbers]
    return None


def _encapsulated_frames(
    source: BinaryIO | bytes,
    start: int,
    numbers: list[int],
    count: int,
    extended: tuple[list[int], list[int]] | None,
) -> Iterator[bytes]:
    """The frames asked for of the encapsulated value at ``start`` of ``source``. Where each frame lies is
    found and checked first, from the items' headers and the offset tables (before a body is started: a
    wrong table is refused, never served as another frame's bytes); each frame's data is read when its
    turn comes. Several fragments a frame without a table is the one layout where only the data can tell
    where a frame ends (JPEG markers): all of it is read first, through pydicom's generate_frames, and
    served only if it holds all ``count`` frames."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    size = stream.seek(0, io.SEEK_END)
    items = _Items(stream, start)
    located = _frame_fragments(items, count, numbers, extended)
    if located is None:
        return iter(_frames_by_markers(stream, start, numbers, count))
    if any(at + length > size for fragments in located for at, length in fragments):
        raise CorruptObject("its encapsulated pixel data runs past the end of the object")
    return (_read_fragments(stream, fragments) for fragments in located)


def _read_fragments(stream: BinaryIO, fragments: list[Fragment]) -> bytes:
    parts = []
    for at, length in fragments:
        stream.seek(at)
        data = stream.read(length)
        if len(data) < length:
            raise CorruptObject("the object ends inside a frame")
        parts.append(data)
    return b"".join(parts)


def _frames_by_markers(stream: BinaryIO, start: int, numbers: list[int], count: int) -> list[bytes]:
    from pydicom.encaps import generate_frames

    wanted, kept, found = set(numbers), {}, 0
    stream.seek(start)
    try:
        for found, frame in enumerate(generate_frames(stream, number_of_frames=count), start=1):
            if found in wanted:
                kept[found] = frame
    except OSError:
        raise
    except Exception as exc:
        raise CorruptObject(f"its encapsulated pixel data cannot be split in frames ({type(exc).__name__})") from None
    if found < count:
        raise CorruptObject(f"its encapsulated pixel data holds {found} of its {count} frames")
    return [kept[number] for number in numbers]


# Bulk data (PS3.18 10.4.1.1.5): the values the stored headers point to with BulkDataURIs
# (``.../instances/{i}/bulk/{tag}``, producers/header_model.py), read from the archived object.
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_ITEM = re.compile(r"^[0-9]{1,9}$")
# Values above this many bytes (every value a BulkDataURI names: producers/header_model.py) are read
# only if they are the one asked for (pydicom's defer_size).
_DEFER = 1024


def bulk_steps(text: str) -> list[int]:
    """The path after ``/bulk/``: a tag (8 hex digits), or a path into sequences ``TAG/ITEM/TAG...``
    (items counted from 0); ValueError saying what is wrong."""
    parts = text.split("/")
    if len(parts) % 2 == 0 or not all((_TAG if i % 2 == 0 else _ITEM).match(part) for i, part in enumerate(parts)):
        raise ValueError(
            f"bulk/{text}: a tag of 8 hexadecimal digits (e.g. bulk/7FE00010), or a path into sequences "
            "TAG/ITEM/TAG (items from 0)"
        )
    return [int(part, 16) if i % 2 == 0 else int(part) for i, part in enumerate(parts)]


@dataclass(frozen=True)
class EncapsulatedPixels:
    """The value asked for is the object's encapsulated pixel data: it is sent frame by frame."""

    syntax: str
    count: int


# Bulk data VRs (PS3.18 F.2.7: the VRs a BulkDataURI may stand for): only their values are served.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Bytes per value swapped to send a big-endian object's value in little endian (OB and UN: bytes, as they are).
_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
# A value inside a sequence (pydicom reads the sequence holding it), or any value of a deflated object
# (pydicom inflates it whole), is in memory once: no larger than this.
MAX_NESTED_BULK = 256 << 20


class BulkTooLarge(ValueError):
    """A value held in memory (inside a sequence, or of a deflated object) larger than MAX_NESTED_BULK (413)."""


@dataclass(frozen=True)
class BulkValue:
    """A bulk data value to send, little endian: ``length`` bytes at ``offset`` of the object's file (a
    top-level value, read as it is sent), or ``data`` (a value inside a sequence, or a small one), each
    group of ``swap`` bytes reversed (a big-endian object's OW, OF, OL, OD, OV; 0: sent as encoded)."""

    offset: int = 0
    length: int = 0
    data: bytes | None = None
    swap: int = 0


def little_endian(block: bytes | memoryview, width: int) -> bytes | memoryview:
    """``block`` with each group of ``width`` bytes reversed (a trailing partial group as it is); as it is for 0."""
    if width < 2:
        return block
    data = bytes(block)
    out = bytearray(data)
    whole = len(data) - len(data) % width
    for i in range(width):
        out[i:whole:width] = data[width - 1 - i : whole : width]
    return memoryview(out)  # not a bytearray: the ASGI response takes bytes or a memoryview


def bulk_chunks(stream: BinaryIO, value: BulkValue, block: int = BLOCK) -> Iterator[bytes | memoryview]:
    """The value's bytes, little endian, in blocks of at most ``block`` bytes (a multiple of 8: no value
    split across two); from ``stream`` (the object's file, open) when the value was not read."""
    if value.data is not None:
        for start in range(0, len(value.data), block):
            yield little_endian(memoryview(value.data)[start : start + block], value.swap)
        return
    stream.seek(value.offset)
    remaining = value.length
    while remaining:
        chunk = stream.read(min(block, remaining))
        if not chunk:
            raise CorruptObject(f"the object ends {remaining} bytes before the end of the value asked for")
        remaining -= len(chunk)
        yield little_endian(chunk, value.swap)


def _vr_of(elem: Any, tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    vr = getattr(elem, "VR", None)
    if vr is None:  # implicit VR
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    return str(vr)


def _bulk_value(ds: Any, tag: int) -> BulkValue:
    """An element's value as encoded in the object, if it has a bulk data VR; LookupError otherwise."""
    from pydicom.dataelem import RawDataElement

    try:
        elem = ds.get_item(tag, keep_deferred=True)  # a deferred value is not read here
    except OSError:
        raise
    except Exception:
        raise CorruptObject(f"its {tag:08X} cannot be read") from None
    vr = _vr_of(elem, tag)
    if vr == "SQ" or isinstance(getattr(elem, "value", None), list):
        raise LookupError(f"{tag:08X} is a sequence, not a bulk data value")
    # An implicit VR the dictionary gives as "OB or OW" is binary; "US or SS" is not.
    choices = {choice.strip() for choice in vr.split(" or ")}
    if not choices & BULK_VRS:
        raise LookupError(
            f"{tag:08X} has VR {vr}: only bulk data values (VR {', '.join(sorted(BULK_VRS))}) are served here"
        )
    little = getattr(elem, "is_little_endian", None)
    if little is None:  # converted already (pydicom's DataElement): the data set's encoding
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
    swap = 0 if little else _SWAP.get(vr, 0)
    if isinstance(elem, RawDataElement) and elem.value is None:  # deferred: read as it is sent
        return BulkValue(offset=elem.value_tell, length=elem.length, swap=swap)
    value = elem.value
    if value is None:
        return BulkValue(data=b"", swap=swap)
    if not isinstance(value, bytes | bytearray):
        raise LookupError(f"{tag:08X} holds no binary value")
    if len(value) > MAX_NESTED_BULK:
        raise BulkTooLarge(
            f"its {tag:08X} holds {len(value)} bytes, over the {MAX_NESTED_BULK >> 20} MiB this server sends of "
            "a value it cannot stream from the file (inside a sequence, or of a deflated object)"
        )
    return BulkValue(data=bytes(value), swap=swap)


def _sequence_items(ds: Any, tag: int) -> list[Any]:
    from pydicom.datadict import dictionary_VR

    raw = ds.get_item(tag, keep_deferred=True)
    vr = getattr(raw, "VR", None)
    if vr is None or vr == "UN":
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return []
    if vr != "SQ":
        return []
    try:
        return list(ds[tag].value)
    except OSError:
        raise  # the archive's (a deferred sequence read through the store), not the object's
    except Exception:
        raise CorruptObject(f"its sequence {tag:08X} cannot be read") from None


def _occurrences(ds: Any, tag: int) -> list[Any]:
    """The items (at any depth) of ``ds``'s sequences holding ``tag``."""
    found = []
    for key in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements, not tags
        for item in _sequence_items(ds, int(key)):
            if tag in item:
                found.append(item)
            found.extend(_occurrences(item, tag))
    return found


def bulk_is_encapsulated_pixels(source: Path | BinaryIO, steps: list[int]) -> str | None:
    """The stored transfer syntax when ``steps`` names the top-level pixel data of an object whose syntax
    encapsulates it (sent frame by frame); else None. Reads only the file meta information."""
    if steps != [0x7FE00010]:
        return None
    syntax = stored_syntax(source)
    return str(syntax) if syntax.is_encapsulated else None


def read_bulk(source: Path | BinaryIO, steps: list[int]) -> BulkValue | EncapsulatedPixels:
    """Where the value ``steps`` (bulk_steps) names is in the archived object at ``source`` (its path, or
    its open file: then the file the value is streamed from, so that both are the same version of the
    object): a BulkValue, or EncapsulatedPixels. Values are not read here (defer_size), but for one inside
    a sequence and those of a deflated object.

    A single tag names a top-level element. Stored headers written before BulkDataURIs carried paths name
    a value inside a sequence by its tag alone: such a tag, not at the top level, is served when it occurs
    exactly once in the object's sequences (it can be no other element's bytes), and is 404 saying how to
    name one by its path when it occurs more often. LookupError (404) naming what is not there or not bulk
    data; BulkTooLarge (413); CorruptObject when pydicom cannot read the object."""
    ds = read_archived(source, defer_size=_DEFER)
    tag = steps[-1]
    if len(steps) == 1 and tag == 0x7FE00010 and tag in ds:
        syntax = transfer_syntax(ds.file_meta)
        if syntax.is_encapsulated:
            return EncapsulatedPixels(str(syntax), frame_count(ds, []))
    holder = ds
    for seq_tag, index in zip(steps[:-1:2], steps[1:-1:2], strict=True):
        items = _sequence_items(holder, seq_tag) if seq_tag in holder else []
        if index >= len(items):
            raise LookupError(f"the object has no item {index} in a sequence {seq_tag:08X}")
        holder = items[index]
    if tag not in holder:
        if len(steps) > 1:
            raise LookupError(f"the object has no {tag:08X} there")
        places = _occurrences(ds, tag)
        if not places:
            raise LookupError(f"the object has no {tag:08X}")
        if len(places) > 1:
            raise LookupError(
                f"the object has no {tag:08X} at its top level, and {len(places)} in its sequences: name one by "
                "its path TAG/ITEM/TAG (the BulkDataURIs of the metadata this service answers now)"
            )
        holder = places[0]
    return _bulk_value(holder, tag)
