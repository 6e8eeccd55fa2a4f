"""Which transfer syntax the receiver accepts in a presentation context: the encoding the sender chose.

pynetdicom accepts the first of *its own* supported transfer syntaxes that the requestor proposed,
and ``ALL_TRANSFER_SYNTAXES`` starts with Implicit VR Little Endian. dcmtk's ``dcmsend`` proposes
Explicit VR Little Endian, Explicit VR Big Endian and Implicit VR Little Endian in one context; so
the sender re-encoded explicit-VR objects as implicit VR, and the archive lost the VR of every
private attribute (a GE private string came back as raw bytes). Here each proposed context is
answered with, in this order:

1. the sender's first proposal if it is compressed or deflated: an SCU proposes a file's own
   syntax first, and accepting it stores the object unchanged;
2. Explicit VR Little Endian, then Explicit VR Big Endian (the VRs stay), then Implicit VR
   Little Endian;
3. otherwise the sender's first proposal that the receiver supports.

Installed by ``install()``, which replaces the negotiation function pynetdicom's ACSE calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import acse
from pynetdicom.presentation import PresentationContext

__all__ = ["preferred_transfer_syntax", "install"]

_UNCOMPRESSED_PREFERENCE = (ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian)
_original = acse.negotiate_as_acceptor


def preferred_transfer_syntax(proposed: Sequence[str], supported: Sequence[str]) -> str | None:
    """The transfer syntax to accept of those ``proposed`` (in the sender's order), or None."""
    offered = [str(ts) for ts in proposed if ts in supported]
    if not offered:
        return None
    first = UID(offered[0])
    if first.is_compressed or first.is_deflated:
        return offered[0]
    for ts in _UNCOMPRESSED_PREFERENCE:
        if ts in offered:
            return ts
    return offered[0]


def _negotiate(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext], roles: Any = None):
    supported = {cx.abstract_syntax: list(cx.transfer_syntax) for cx in ac_contexts}
    narrowed = []
    for rq in rq_contexts:
        choice = preferred_transfer_syntax(rq.transfer_syntax, supported.get(rq.abstract_syntax, []))
        if choice is None:
            narrowed.append(rq)  # pynetdicom rejects it with the right reason
            continue
        context = PresentationContext()
        context.context_id = rq.context_id
        context.abstract_syntax = rq.abstract_syntax
        context.transfer_syntax = [choice]
        narrowed.append(context)
    return _original(narrowed, ac_contexts, roles)


def install() -> None:
    acse.negotiate_as_acceptor = _negotiate
