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

from prometheus_client import Counter
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit

__all__ = [
    "MAX_DECODED_BYTES",
    "TranscodeError",
    "decoded_size",
    "decoder_reason",
    "decompressed",
    "explicit_little_endian",
]

# Decoding holds the whole decoded object in memory, and pynetdicom encodes it once more to send it;
# a multi-frame object decoding to more than this is refused (its sub-operation fails, the reason is
# logged) rather than letting one retrieve take the memory of every other association.
MAX_DECODED_BYTES = 1 << 30

# Syntaxes that are lossy whatever their parameters; JPEG 2000 and JPEG-LS near-lossless may be
# either, and only the creator's Lossy Image Compression says which.
_ALWAYS_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit}
_LOSSY_METHOD = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}


# Served by whichever service decodes (`diana serve`, `diana route`): how often peers and clients make it
# decode, and how often an object could not be, by stored syntax.
DECODED = Counter(
    "diana_decoded_objects_total",
    "Compressed objects decoded to Explicit VR Little Endian for a peer or client without their syntax",
    ["syntax", "outcome"],
)


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


def decoder_reason(exc: Exception) -> str:
    """pydicom's decoding error on one line (it lists each plugin's reason on lines of their own), shortened."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def decompressed(ds: Dataset) -> Dataset:
    """``ds`` (read with its pixel data) decoded in place to Explicit VR Little Endian, and returned."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_compressed:
        return ds
    if "PixelData" not in ds:
        return ds  # nothing encapsulated: the data set is the same in any syntax
    size = decoded_size(ds)
    if size > MAX_DECODED_BYTES:
        DECODED.labels(syntax.name, "refused").inc()
        raise TranscodeError(
            f"{syntax.name}: decoded it would take {size >> 20} MiB, over the limit of {MAX_DECODED_BYTES >> 20}"
        )
    try:
        # generate_instance_uid=False: the same object in another syntax keeps its UID (pydicom's default
        # makes a new one, which would leave the receiver with an object nobody sent).
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # pydicom raises RuntimeError, ValueError, NotImplementedError... by plugin
        DECODED.labels(syntax.name, "not_decodable").inc()
        raise TranscodeError(f"{syntax.name}: not decodable here ({decoder_reason(exc)})") from exc
    if syntax in _ALWAYS_LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY_METHOD[syntax]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    DECODED.labels(syntax.name, "decoded").inc()
    return ds


def explicit_little_endian(ds: Dataset) -> Dataset:
    """``ds`` (read with its pixel data) in Explicit VR Little Endian, in place: decoded when compressed,
    its values re-read in their stored byte order otherwise (implicit VR, big endian, deflated)."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax == ExplicitVRLittleEndian:
        return ds
    # Every value decoded in the encoding it was read in before that changes: some files' data sets are
    # not in their meta's syntax (pydicom reads SC_rgb_jpeg.dcm's as implicit VR), and an element left
    # raw would then be written without a VR.
    for element in ds.iterall():
        _ = element.value
    if syntax.is_compressed:
        decompressed(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    return ds
