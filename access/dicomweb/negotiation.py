"""Which transfer syntax a WADO-RS request asked for, from its Accept header (PS3.18 8.7.3).

Since DICOM 2016c a retrieve without a ``transfer-syntax`` parameter is answered in Explicit VR Little
Endian, and ``transfer-syntax=*`` lets the origin server send each object as it holds it (Orthanc's
DICOMweb plugin follows this since its version 1.5). Frames without one are native (uncompressed)
pixel data. diana-star holds objects as received, so it offers exactly two things: the object as
stored (``*``, or the object's own syntax) and Explicit VR Little Endian (decoded when compressed,
access/transcode.py). Any other syntax gets 406 with what can be asked for instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian

__all__ = [
    "AS_STORED",
    "MediaRange",
    "NotAcceptable",
    "bulk_multipart",
    "dicom_syntax",
    "frame_syntax",
    "parse_accept",
]

AS_STORED = "*"
EXPLICIT_LE = str(ExplicitVRLittleEndian)

# Single-frame media types of compressed frames, and the syntaxes whose frames they are (PS3.18 Table 8.7.4-2).
FRAME_MEDIA = {
    "image/jpeg": {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    },
    "image/jls": {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"},
    "image/jp2": {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"},
    "image/jpx": {"1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"},
    "image/dicom-rle": {"1.2.840.10008.1.2.5"},
}


class NotAcceptable(ValueError):
    """No media range of the Accept header can be served; the message says what can."""


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header: ``multipart/related; type="application/dicom"; transfer-syntax=*``."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def quality(self) -> float:
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 0.0

    @property
    def part_type(self) -> str:
        """The media type of each part: ``type=`` of a multipart range, else the range itself."""
        if self.media_type == "multipart/related":
            return self.params.get("type", "").lower()
        return self.media_type


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (by q, then in the order given); q=0 left out."""
    ranges = []
    for element in _split(header or "*/*", ","):
        pieces = [piece.strip() for piece in _split(element, ";")]
        if not pieces[0]:
            continue
        params = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        ranges.append(MediaRange(pieces[0].lower(), params))
    ordered = sorted(enumerate(ranges), key=lambda item: (-item[1].quality, item[0]))
    return [r for _, r in ordered if r.quality > 0]


def dicom_syntax(header: str | None) -> str:
    """For a study, series or instance retrieve: ``AS_STORED`` or ``EXPLICIT_LE``, from the first range served."""
    refused: list[str] = []
    for media in parse_accept(header):
        if syntax := _multipart_syntax(media, "application/dicom", refused):
            return syntax
    raise NotAcceptable(
        f"cannot produce {', '.join(refused) or 'nothing asked'}: this server sends "
        f'multipart/related; type="application/dicom" with transfer-syntax=* (each object as stored) '
        f"or transfer-syntax={EXPLICIT_LE} (the default)"
    )


def frame_syntax(header: str | None, stored: str) -> tuple[str, str]:
    """For frames of an object stored in ``stored``: (``AS_STORED`` or ``EXPLICIT_LE``, the parts' Content-Type)."""
    compressed = stored != EXPLICIT_LE and any(stored in syntaxes for syntaxes in FRAME_MEDIA.values())
    for media in parse_accept(header):
        part = media.part_type
        # A wildcard part type (dicomweb-client's default is type="*/*") gets the standard's default: native.
        if media.media_type in ("*/*", "multipart/*") or part in (
            "",
            "*/*",
            "application/*",
            "application/octet-stream",
        ):
            syntax = media.params.get("transfer-syntax", EXPLICIT_LE)
            if syntax == AS_STORED and compressed:
                return AS_STORED, f"{_media_of(stored)}; transfer-syntax={stored}"
            if syntax in (AS_STORED, EXPLICIT_LE) or syntax == stored:
                return EXPLICIT_LE, "application/octet-stream"
        elif stored in FRAME_MEDIA.get(part, ()) and media.params.get("transfer-syntax", stored) in (stored, AS_STORED):
            return AS_STORED, f"{part}; transfer-syntax={stored}"
    raise NotAcceptable(
        "cannot produce the frames as asked: this server sends application/octet-stream (native pixels, the "
        "default), or the frames as stored with transfer-syntax=* or their own media type"
        + (f" ({_media_of(stored)}; transfer-syntax={stored})" if compressed else "")
    )


def bulk_multipart(header: str | None) -> bool:
    """For one bulk data value (PS3.18 8.7.3.3.1): True for ``multipart/related; type="application/octet-stream"``
    (the default, and what dicomweb-client asks), False for a single-part ``application/octet-stream``
    asked before it; NotAcceptable saying what can be asked for otherwise."""
    refused: list[str] = []
    for media in parse_accept(header):
        if media.media_type == "application/octet-stream":
            return False
        if _multipart_syntax(media, "application/octet-stream", refused):
            return True
    raise NotAcceptable(
        f"cannot produce {', '.join(refused) or 'nothing asked'}: this server sends a bulk data value as "
        'multipart/related; type="application/octet-stream" (the default) or application/octet-stream'
    )


def _multipart_syntax(media: MediaRange, part_type: str, refused: list[str]) -> str | None:
    """The transfer syntax ``media`` asks of a multipart/related answer of ``part_type`` parts (``AS_STORED``
    or ``EXPLICIT_LE``); None, with what was refused added to ``refused``, if it asks something else."""
    if media.media_type in ("*/*", "multipart/*") or (
        media.media_type == "multipart/related" and media.part_type in ("", "*/*", "application/*", part_type)
    ):
        syntax = media.params.get("transfer-syntax", EXPLICIT_LE)
        if syntax in (AS_STORED, EXPLICIT_LE):
            return syntax
        refused.append(f"transfer-syntax={syntax}")
    else:
        refused.append(media.media_type + (f'; type="{media.part_type}"' if media.part_type else ""))
    return None


def _media_of(stored: str) -> str:
    return next((media for media, syntaxes in FRAME_MEDIA.items() if stored in syntaxes), "application/octet-stream")
