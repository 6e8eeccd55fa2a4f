"""FilesystemStore writes and deletes with the object's folder resolved once (entry_path): the object's
own name is never followed, so nothing outside the store is written, replaced or removed through a key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from diana.storage import ObjectNotFound
from diana.storage.filesystem import FilesystemStore


def _source(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_symlink_named_like_the_object_is_replaced_not_written_through(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "archive")
    store.put_file("1/2/a.dcm", _source(tmp_path, "a", b"a"))  # the folder is now remembered
    outside = _source(tmp_path, "secret", b"secret")
    os.symlink(outside, store.root / "1" / "2" / "b.dcm")
    store.put_file("1/2/b.dcm", _source(tmp_path, "b", b"b"))
    assert outside.read_bytes() == b"secret"
    assert not (store.root / "1" / "2" / "b.dcm").is_symlink()
    with store.open("1/2/b.dcm") as fh:
        assert fh.read() == b"b"


def test_deleting_a_symlink_key_removes_the_link_only(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "archive")
    store.put_file("1/2/a.dcm", _source(tmp_path, "a", b"a"))
    outside = _source(tmp_path, "secret", b"secret")
    os.symlink(outside, store.root / "1" / "2" / "link.dcm")
    store.delete("1/2/link.dcm")
    assert not os.path.lexists(store.root / "1" / "2" / "link.dcm")
    assert outside.read_bytes() == b"secret"


def test_a_folder_that_leaves_the_store_is_refused_for_writes(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "archive")
    store.root.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", store.root / "9")
    with pytest.raises(ValueError):
        store.put_file("9/x.dcm", _source(tmp_path, "x", b"x"))
    with pytest.raises(ValueError):
        store.delete("9/x.dcm")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_copy_between_stores_links_verified_bytes_and_never_a_symlink(tmp_path: Path) -> None:
    landing, archive = FilesystemStore(tmp_path / "landing"), FilesystemStore(tmp_path / "archive")
    data = b"DICOM" * 1000
    digest = hashlib.sha256(data).hexdigest()
    landing.put_file("ab/x.dcm", _source(tmp_path, "x", data))
    assert archive.copy_from(landing, "ab/x.dcm", "1/2/3.dcm", sha256=digest) == digest
    assert os.path.samefile(landing.entry_path("ab/x.dcm"), archive.entry_path("1/2/3.dcm"))  # a hard link
    os.symlink(_source(tmp_path, "secret", b"secret"), landing.root / "ab" / "link.dcm")
    with pytest.raises(ObjectNotFound):
        archive.copy_from(landing, "ab/link.dcm", "1/2/4.dcm")
    assert not archive.exists("1/2/4.dcm")
