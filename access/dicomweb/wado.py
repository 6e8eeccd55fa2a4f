"""WADO-RS bodies: archived objects as multipart/related, streamed file by file, and metadata.

A series is never held in memory: each part is read from its archive file in 256 KiB chunks as the
client takes them. Metadata is the DICOM JSON header the receiver stored with each indexed
instance, its BulkDataURIs made absolute under this service's base URL.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio

from diana.schemas.series_metadata import absolute_bulk_uris
from diana.storage import ObjectStore

__all__ = ["multipart_dicom", "metadata", "new_boundary", "frame_bytes"]

CHUNK = 256 * 1024


def new_boundary() -> str:
    return f"diana-{uuid.uuid4().hex}"


async def multipart_dicom(
    archive: ObjectStore, keys: list[str], boundary: str, content_type: str = "application/dicom"
) -> AsyncIterator[bytes]:
    """The objects as stored, streamed part by part; the store's blocking reads run in worker threads."""
    for key in keys:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        opened = archive.open(key)
        stream = await anyio.to_thread.run_sync(opened.__enter__)
        try:
            while chunk := await anyio.to_thread.run_sync(stream.read, CHUNK):
                yield chunk
        finally:
            opened.__exit__(None, None, None)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def metadata(documents: Iterator[dict[str, Any]], base: str) -> Iterator[bytes]:
    """A JSON array of DICOM JSON data sets, written as it is read."""
    import json

    yield b"["
    first = True
    for doc in documents:
        header = doc.get("dicom")
        if not header:
            continue
        yield (b"" if first else b",") + json.dumps(absolute_bulk_uris(header, base), separators=(",", ":")).encode()
        first = False
    yield b"]"


def frame_bytes(path: Path, numbers: list[int]) -> list[bytes]:
    """The frames (1-based) of an archived object: native pixel data sliced, encapsulated frames as stored."""
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise LookupError("the object has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise IndexError(f"frame {bad[0]} does not exist: the object has {count} frame(s)")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [frames[n - 1] for n in numbers]
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return [bytes(ds.PixelData[(n - 1) * size : n * size]) for n in numbers]
