"""Odd deflated data sets leave with the standard's one pad byte (access.qr.retrieve.even_length)."""

import shutil
import warnings
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from diana.access.qr.retrieve import even_length


def _deflated_odd() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(get_testdata_file("image_dfl.dcm"))


def test_an_odd_deflated_data_set_is_sent_from_a_padded_copy_that_inflates_the_same():
    original = _deflated_odd()
    _, offset = split_dataset(original)
    assert (original.stat().st_size - offset) % 2 == 1  # the case: pydicom's own deflated test file is odd
    with even_length(original) as sendable:
        assert sendable != original
        raw = sendable.read_bytes()
        assert raw == original.read_bytes() + b"\x00"
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw[offset:])
        assert inflated == zlib.decompressobj(-zlib.MAX_WBITS).decompress(original.read_bytes()[offset:])
        assert pydicom.dcmread(sendable) == pydicom.dcmread(original)
    assert not sendable.exists()  # the copy is gone after the send


def test_even_and_non_deflated_files_are_sent_as_stored(tmp_path):
    even = Path(get_testdata_file("CT_small.dcm"))
    with even_length(even) as sendable:
        assert sendable == even
    odd_plain = tmp_path / "odd.dcm"
    shutil.copyfile(even, odd_plain)
    with open(odd_plain, "ab") as fh:
        fh.write(b"\x01")  # malformed, not deflated: padding would not make it right, the peer decides
    with even_length(odd_plain) as sendable:
        assert sendable == odd_plain
