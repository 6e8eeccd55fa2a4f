"""Unit: which transfer syntax a WADO-RS Accept header asks for (access/dicomweb/negotiation.py)."""

from __future__ import annotations

import pytest

from diana.access.dicomweb.negotiation import AS_STORED, EXPLICIT_LE, NotAcceptable, dicom_syntax, frame_syntax

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.mark.parametrize(
    "accept, expected",
    [
        (None, EXPLICIT_LE),  # no header: the default of PS3.18 since 2016c
        ("*/*", EXPLICIT_LE),
        ('multipart/related; type="application/dicom"', EXPLICIT_LE),  # dicomweb-client's default
        ('multipart/related; type="*/*"', EXPLICIT_LE),
        ("multipart/related; type=application/dicom; transfer-syntax=*", AS_STORED),  # Orthanc's own tests
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1', EXPLICIT_LE),
        # the first range that can be served wins, the rest in q order
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}, */*;q=0.5', EXPLICIT_LE),
        ('multipart/related; type="application/dicom"; transfer-syntax=*;q=0.9, multipart/related;q=0.1', AS_STORED),
    ],
)
def test_retrieve_syntax(accept, expected):
    assert dicom_syntax(accept) == expected


@pytest.mark.parametrize(
    "accept, named",
    [
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}', JPEG_BASELINE),
        ('multipart/related; type="application/dicom+xml"', "application/dicom+xml"),
        ("application/json", "application/json"),
        ("*/*;q=0", "nothing asked"),
    ],
)
def test_what_cannot_be_produced_is_406_with_what_can(accept, named):
    with pytest.raises(NotAcceptable) as caught:
        dicom_syntax(accept)
    assert named in str(caught.value) and "transfer-syntax=*" in str(caught.value)


def test_frames_native_by_default_and_as_stored_when_asked():
    assert frame_syntax(None, JPEG_BASELINE) == (EXPLICIT_LE, "application/octet-stream")
    assert frame_syntax('multipart/related; type="application/octet-stream"', JPEG_BASELINE)[0] == EXPLICIT_LE
    assert frame_syntax('multipart/related; type="*/*"', JPEG_BASELINE)[0] == EXPLICIT_LE  # dicomweb-client's default
    assert frame_syntax('multipart/related; type="application/octet-stream"; transfer-syntax=*', JPEG_BASELINE) == (
        AS_STORED,
        f"image/jpeg; transfer-syntax={JPEG_BASELINE}",
    )
    assert frame_syntax('multipart/related; type="image/jpeg"', JPEG_BASELINE) == (
        AS_STORED,
        f"image/jpeg; transfer-syntax={JPEG_BASELINE}",
    )
    # An uncompressed object's frames are native whatever was allowed.
    assert frame_syntax("multipart/related; type=application/octet-stream; transfer-syntax=*", EXPLICIT_LE) == (
        EXPLICIT_LE,
        "application/octet-stream",
    )


def test_frames_in_a_media_type_the_object_is_not_in_are_406():
    with pytest.raises(NotAcceptable, match="image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"):
        frame_syntax('multipart/related; type="image/jls"', JPEG_BASELINE)
    with pytest.raises(NotAcceptable):
        frame_syntax('multipart/related; type="image/jpeg"', EXPLICIT_LE)
