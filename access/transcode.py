"""Compressed objects decoded to Explicit VR Little Endian, for a peer that accepts no compressed syntax.

A viewer or PACS that proposes only the uncompressed syntaxes (dcmtk's getscu and storescp by default,
many older modalities) would otherwise get a failed sub-operation for every JPEG, JPEG-LS, JPEG 2000
or RLE object: Orthanc and dcm4chee decompress, and so does diana-star. pydicom decodes with the
plugins installed beside it (GDCM for JPEG Lossless and JPEG-LS, which nothing else permissively
licensed decodes; Pillow; pydicom's own RLE decoder).

What stays the same: the SOP Instance UID and every attribute outside the pixel module (a change
of transfer syntax is the same object, PS3.5 10.1). What changes: pixel data, the transfer syntax,
and colour images come back as RGB (YBR is a property of the compressed form). An image that was
lossy compressed says so after decoding (Lossy Image Compression "01", PS3.3 C.7.6.1.1.5), so
nobody mistakes the decoded pixels for an original.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit

__all__ = ["MAX_DECODED_BYTES", "TranscodeError", "decompressed"]

# Decoding holds the whole decoded object in memory, and pynetdicom encodes it once more to send it;
# a multi-frame object decoding to more than this is refused (its sub-operation fails, the reason is
# logged) rather than letting one retrieve take the memory of every other association.
MAX_DECODED_BYTES = 1 << 30

# Syntaxes that are lossy whatever their parameters; JPEG 2000 and JPEG-LS near-lossless may be
# either, and only the creator's Lossy Image Compression says which.
_ALWAYS_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit}
_LOSSY_METHOD = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}


class TranscodeError(ValueError):
    """The object cannot be decoded here; the message says why (no patient data in it)."""


def decoded_size(ds: Dataset) -> int:
    """Bytes of the decoded pixel data, from the image pixel module."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * frames * samples * ((int(ds.BitsAllocated) + 7) // 8)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TranscodeError(f"the image pixel module is incomplete ({exc})") from exc


def decompressed(ds: Dataset) -> Dataset:
    """``ds`` (read with its pixel data) decoded in place to Explicit VR Little Endian, and returned."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_compressed:
        return ds
    if "PixelData" not in ds:
        raise TranscodeError(f"{syntax.name}: no pixel data to decode")
    size = decoded_size(ds)
    if size > MAX_DECODED_BYTES:
        raise TranscodeError(
            f"{syntax.name}: decoded it would take {size >> 20} MiB, over the limit of {MAX_DECODED_BYTES >> 20}"
        )
    try:
        # generate_instance_uid=False: the same object in another syntax keeps its UID (pydicom's default
        # makes a new one, which would leave the receiver with an object nobody sent).
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # pydicom raises RuntimeError, ValueError, NotImplementedError... by plugin
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TranscodeError(f"{syntax.name}: not decodable here ({first_line})") from exc
    if syntax in _ALWAYS_LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY_METHOD[syntax]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
