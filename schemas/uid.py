"""DICOM UID syntax (PS3.5 9.1), part of the contract: every UID in every event satisfies it.

Components of digits separated by '.', no leading zero in a multi-digit component, at most
64 characters. Such a string can never hold '/', '..' or a control character, which is why
UIDs (and only UIDs) may become file names.
"""

from __future__ import annotations

import re

__all__ = ["is_valid_uid"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None
