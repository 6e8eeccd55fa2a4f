"""The SOP class and transfer syntax of a stored DICOM file, read from its file meta group without pydicom.

A C-MOVE proposes its sub-association's presentation contexts from every object's file meta before it
sends the first one (retrieve.py ``as_archived``). pydicom's ``read_file_meta_info`` parses the group
element by element in Python, with a Dataset and DataElements around it: a few hundred microseconds
per file, a tenth of a second or more for a 1,000-instance series before its first C-STORE
(docs/PERFORMANCE.md, the C-MOVE floor). The group is always explicit VR little endian (PS3.10 7.1),
so two UIDs in it are found by walking the element headers. Anything unexpected (no "DICM", a VR
that is not one, an element that runs past what was read, a UID missing) is left to pydicom, whose
errors the caller already handles.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.filereader import read_file_meta_info

__all__ = ["file_meta_uids", "transfer_syntax_in"]

# What is read of the file: the preamble, "DICM" and a file meta group of ordinary size.
_HEAD = 2048
# Explicit VR elements whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SOP_CLASS = 0x0002  # (0002,0002) Media Storage SOP Class UID
_TRANSFER_SYNTAX = 0x0010  # (0002,0010) Transfer Syntax UID


class _Unexpected(Exception):
    pass


def _walk(head: bytes) -> dict[int, str]:
    """The SOP class and transfer syntax UIDs found in the file meta group at the start of ``head``."""
    if head[128:132] != b"DICM":
        raise _Unexpected
    found: dict[int, str] = {}
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            raise _Unexpected
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                raise _Unexpected
            (length,) = struct.unpack_from("<I", head, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            pos += 8
        if element in (_SOP_CLASS, _TRANSFER_SYNTAX):
            if pos + length > len(head):
                raise _Unexpected
            found[element] = head[pos : pos + length].rstrip(b"\x00 ").decode("ascii")
        pos += length
    return found


def transfer_syntax_in(head: bytes) -> str | None:
    """The Transfer Syntax UID of the file meta group at the start of ``head`` (a file's first bytes);
    None when ``head`` does not hold one whole (no "DICM", no such element, a group longer than ``head``)."""
    try:
        return _walk(head).get(_TRANSFER_SYNTAX) or None
    except (_Unexpected, UnicodeDecodeError, struct.error):
        return None


def file_meta_uids(path: Path | str) -> tuple[str, str]:
    """(Media Storage SOP Class UID, Transfer Syntax UID) of the DICOM file at ``path``.

    Raises what pydicom's ``read_file_meta_info`` raises for a file it cannot read (OSError,
    InvalidDicomError), or AttributeError when either UID is missing."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
    try:
        found = _walk(head)
        if not found.get(_SOP_CLASS) or not found.get(_TRANSFER_SYNTAX):
            raise _Unexpected
        return found[_SOP_CLASS], found[_TRANSFER_SYNTAX]
    except (_Unexpected, UnicodeDecodeError, struct.error):
        meta = read_file_meta_info(path)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
