"""file_meta_uids reads the same SOP class and transfer syntax as pydicom, from every test file pydicom ships."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_files
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from diana.access.qr.file_meta import file_meta_uids, transfer_syntax_in


def _pydicom_uids(path: str) -> tuple[str, str] | type[Exception]:
    try:
        meta = read_file_meta_info(path)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except (OSError, AttributeError, InvalidDicomError) as exc:
        return type(exc)


def test_same_uids_as_pydicom_for_every_test_file() -> None:
    files = get_testdata_files("*")
    compared = 0
    for path in files:
        expected = _pydicom_uids(path)
        if isinstance(expected, tuple):
            assert file_meta_uids(path) == expected, path
            compared += 1
        else:
            with pytest.raises(expected):
                file_meta_uids(path)
    assert compared > 50  # the comparison ran over the corpus, not over nothing


def test_implicit_vr_meta_group_is_left_to_pydicom(tmp_path: Path) -> None:
    """A meta group written in implicit VR (malformed, seen in the wild) is not walked as explicit VR:
    the answer is pydicom's, whatever it makes of it."""
    import struct

    def implicit(element: int, value: bytes) -> bytes:
        value += b"\x00" * (len(value) % 2)
        return struct.pack("<HHI", 0x0002, element, len(value)) + value

    path = tmp_path / "implicit-meta.dcm"
    sop_class, syntax = b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.1.2"
    body = implicit(0x0002, sop_class) + implicit(0x0003, b"1.2.3.4") + implicit(0x0010, syntax)
    path.write_bytes(b"\x00" * 128 + b"DICM" + body + struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\x00")
    expected = _pydicom_uids(str(path))
    if isinstance(expected, tuple):
        assert file_meta_uids(path) == expected
    else:
        with pytest.raises(expected):
            file_meta_uids(path)


def test_transfer_syntax_in_a_files_first_bytes_is_pydicoms_or_none() -> None:
    """WADO-RS (dicomweb/transcoded.py) reads the syntax from a stream's first 64 KiB: it must never
    name another syntax than pydicom's; None sends the object through the whole-object path instead."""
    named = 0
    for path in get_testdata_files("*"):
        if Path(path).is_dir():
            continue
        with open(path, "rb") as fh:
            head = fh.read(64 << 10)
        found = transfer_syntax_in(head)
        try:
            expected = read_file_meta_info(path).get("TransferSyntaxUID")
        except (OSError, InvalidDicomError):
            expected = None
        if found is not None:
            assert found == expected, path
            named += 1
        assert transfer_syntax_in(head[:140]) is None, path  # the group cut short before its syntax
    assert named > 50
    assert transfer_syntax_in(b"") is None
    assert transfer_syntax_in(b"\x00" * 128 + b"DICX" + b"\x02\x00\x10\x00UI\x04\x001.2\x00") is None
