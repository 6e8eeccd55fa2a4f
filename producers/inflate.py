"""Deflated Explicit VR Little Endian objects, inflated as a stream with a size cap.

pydicom inflates a deflated data set whole, pixel data included, in memory and with no bound:
a few MB of deflated zeros would take the receiver down. Here the data set is inflated in chunks
into a temporary Part-10 file beside the object (same filesystem), declared Explicit VR Little
Endian, and given up on as soon as it passes ``max_inflated_bytes``. The header is then read from
that file, so its length checks compare offsets with the inflated size. The object itself is
stored as it came, deflated.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from diana.scratch import ScratchFile

__all__ = ["DEFAULT_MAX_INFLATED_BYTES", "InflateError", "file_meta", "inflated_copy"]

DEFAULT_MAX_INFLATED_BYTES = 1 << 30
_CHUNK = 1 << 20
# Inflated output per decompress call: memory stays bounded whatever the ratio.
_OUT = 4 << 20


class InflateError(ValueError):
    """The deflated data set is corrupt, or inflates past the cap."""


def file_meta(fh: BinaryIO) -> FileMetaDataset | None:
    """The file meta of a Part-10 stream (left positioned after it), or None if it has none."""
    try:
        read_preamble(fh, False)
        return _read_file_meta_info(fh)
    except Exception:  # not Part-10: the header reader says why
        return None


def is_deflated(meta: FileMetaDataset | None) -> bool:
    return meta is not None and str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian


@contextmanager
def inflated_copy(fh: BinaryIO, meta: FileMetaDataset, folder: Path, max_inflated_bytes: int) -> Iterator[Path]:
    """A temporary Part-10 file: ``meta`` as Explicit VR Little Endian + the data set inflated from ``fh``.

    ``fh`` is positioned at the start of the deflated data set. Raises InflateError.
    """
    # Locked while it exists: a receiver starting meanwhile sweeps .incoming, and leaves it (scratch.py).
    scratch = ScratchFile(folder, prefix=".inflate-", suffix=".tmp")
    try:
        with scratch.open("wb") as out:
            plain = FileMetaDataset(meta)
            plain.TransferSyntaxUID = ExplicitVRLittleEndian
            out.write(b"\x00" * 128 + b"DICM")
            meta_writer = DicomFileLike(out)
            meta_writer.is_little_endian, meta_writer.is_implicit_VR = True, False
            write_file_meta_info(meta_writer, plain, enforce_standard=True)
            _inflate(fh, out, max_inflated_bytes)
        yield scratch.path
    finally:
        scratch.remove()


def _inflate(src: BinaryIO, out: BinaryIO, cap: int) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0

    def emit(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if total > cap:
            raise InflateError(f"deflated data set inflates past {cap} bytes (max_inflated_bytes)")
        out.write(data)

    try:
        while not inflater.eof and (chunk := src.read(_CHUNK)):
            emit(inflater.decompress(chunk, _OUT))
            while inflater.unconsumed_tail and not inflater.eof:
                emit(inflater.decompress(inflater.unconsumed_tail, _OUT))
        while not inflater.eof and (rest := inflater.decompress(b"", _OUT)):
            emit(rest)
        emit(inflater.flush())
    except zlib.error as exc:
        raise InflateError(f"deflated data set is corrupt: {exc}") from None
