"""DICOM UID syntax, part of the contract: every UID in every event satisfies ``is_valid_uid``.

``is_valid_uid``: components of digits separated by '.', at most 64 characters, no empty component.
Such a string can never hold '/', '..' or a control character, and is never '.' or '..', which is why
UIDs (and only UIDs) may become file names and keys. Leading zeros in a component (``1.2.03.4``) are
accepted: PS3.5 9.1 forbids them, but they exist in the wild (pynetdicom#88, fo-dicom#859 and #1160)
and refusing them for good made a PACS migration fail on those objects.

``is_conformant_uid``: PS3.5 9.1 exactly (no leading zero in a multi-digit component): counted and
noted at debug level by the receiver, never a reason to refuse.
"""

from __future__ import annotations

import re

__all__ = ["is_conformant_uid", "is_valid_uid"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONFORMANT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """Safe as a key and a path component: digits and dots, no empty component, 1 to 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def is_conformant_uid(value: object) -> bool:
    """``is_valid_uid`` and no leading zero in a multi-digit component (PS3.5 9.1)."""
    return isinstance(value, str) and is_valid_uid(value) and _CONFORMANT_RE.fullmatch(value) is not None
