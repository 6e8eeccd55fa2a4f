"""FilesystemStore reads with the object's folder resolved once: the same bytes, nothing outside the store."""

from __future__ import annotations

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
