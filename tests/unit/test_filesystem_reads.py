"""FilesystemStore reads with the object's folder resolved once: the same bytes, nothing outside the store."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from diana.storage import ObjectNotFound, local_file
from diana.storage.filesystem import FilesystemStore


def _store_with(tmp_path: Path, key: str, data: bytes) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "archive")
    source = tmp_path / "source"
    source.write_bytes(data)
    store.put_file(key, source)
    return store


def test_reads_give_the_stored_bytes_again_and_again(tmp_path: Path) -> None:
    store = _store_with(tmp_path, "1.2/3.4/5.6.dcm", b"object")
    for _ in range(3):  # the folder is remembered after the first read
        with store.open("1.2/3.4/5.6.dcm") as fh:
            assert fh.read() == b"object"
    assert store.exists("1.2/3.4/5.6.dcm")
    assert not store.exists("1.2/3.4/7.8.dcm")
    with pytest.raises(ObjectNotFound):
        store.open("1.2/3.4/7.8.dcm")
    with local_file(store, "1.2/3.4/5.6.dcm") as path:
        assert path.read_bytes() == b"object"


def test_an_object_written_after_its_folder_was_remembered_is_read(tmp_path: Path) -> None:
    store = _store_with(tmp_path, "1/2/a.dcm", b"a")
    assert not store.exists("1/2/b.dcm")
    source = tmp_path / "b"
    source.write_bytes(b"b")
    store.put_file("1/2/b.dcm", source)
    with store.open("1/2/b.dcm") as fh:
        assert fh.read() == b"b"


def test_nothing_outside_the_store_is_read(tmp_path: Path) -> None:
    store = _store_with(tmp_path, "1/2/a.dcm", b"a")
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    for key in ("../secret", "/etc/passwd", "1/../../secret", ""):
        with pytest.raises(ValueError):
            store.open(key)
    # A symlink as the object's name is not followed.
    os.symlink(outside, store.root / "1" / "2" / "link.dcm")
    assert not store.exists("1/2/link.dcm")
    with pytest.raises(OSError):
        store.open("1/2/link.dcm")
    # A folder that is a symlink out of the store is refused when it is resolved.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.dcm").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", store.root / "9")
    with pytest.raises(ValueError):
        store.open("9/x.dcm")


def test_a_seekable_open_keeps_its_version_and_refuses_what_exists_refuses(tmp_path: Path) -> None:
    """open_seekable (the WADO-RS frames and bulk data routes): the file, open; a new version renamed over
    the key meanwhile leaves the open one readable whole. A missing key, a symlink or a folder there is
    ObjectNotFound, as ``exists`` says no."""
    store = _store_with(tmp_path, "1/2/a.dcm", b"0123456789")
    with store.open_seekable("1/2/a.dcm") as fh:
        fh.seek(5)
        assert fh.read(3) == b"567"
        store.put_stream("1/2/a.dcm", io.BytesIO(b"abcdefghij"))
        fh.seek(0)
        assert fh.read() == b"0123456789"
    (tmp_path / "archive/1/2/link.dcm").symlink_to(tmp_path / "archive/1/2/a.dcm")
    (tmp_path / "archive/1/2/folder.dcm").mkdir()
    for key in ("1/2/none.dcm", "1/2/link.dcm", "1/2/folder.dcm"):
        assert not store.exists(key)
        with pytest.raises(ObjectNotFound):
            store.open_seekable(key)
