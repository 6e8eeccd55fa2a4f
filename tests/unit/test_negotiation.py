"""Unit: the transfer syntax accepted in a presentation context keeps the sender's encoding."""

from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES

from diana.producers.negotiation import preferred_transfer_syntax

ALL = list(ALL_TRANSFER_SYNTAXES)


def test_dcmsend_proposal_gets_explicit_vr_little_endian():
    proposed = [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian]
    assert ALL[0] == ImplicitVRLittleEndian  # what pynetdicom alone would have picked
    assert preferred_transfer_syntax(proposed, ALL) == ExplicitVRLittleEndian


def test_explicit_vr_wins_whatever_the_order_of_uncompressed_proposals():
    assert preferred_transfer_syntax([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ALL) == ExplicitVRLittleEndian
    assert preferred_transfer_syntax([ImplicitVRLittleEndian, ExplicitVRBigEndian], ALL) == ExplicitVRBigEndian
    assert preferred_transfer_syntax([ImplicitVRLittleEndian], ALL) == ImplicitVRLittleEndian


def test_the_objects_own_compressed_or_deflated_syntax_is_kept_when_proposed_first():
    assert preferred_transfer_syntax([JPEG2000Lossless, ExplicitVRLittleEndian], ALL) == JPEG2000Lossless
    assert preferred_transfer_syntax([JPEGBaseline8Bit, ImplicitVRLittleEndian], ALL) == JPEGBaseline8Bit
    assert preferred_transfer_syntax([DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian], ALL) == (
        DeflatedExplicitVRLittleEndian
    )
    # An uncompressed object whose sender also offers compression is not compressed on our behalf.
    assert preferred_transfer_syntax([ExplicitVRLittleEndian, JPEGBaseline8Bit], ALL) == ExplicitVRLittleEndian


def test_nothing_supported_is_none():
    assert preferred_transfer_syntax(["1.2.3.4"], ALL) is None
