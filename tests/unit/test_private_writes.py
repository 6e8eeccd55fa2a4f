"""Patient data written by diana is readable by its owner only, whatever the umask: the landing store, the
archive (a put from a stream: prepared metadata, an S3-less copy), the copy place_file makes where hard
links fail (archive and landing on two filesystems), the routing ledger, and the folders made for them.
Before, every such file got 0666 less the umask (0644 in 0755 folders with the usual 022): readable by
every local user. The receiver's spill files, the import report and the key files were private already."""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from diana import durable
from diana.access.routing.sent import StudiesSent
from diana.storage.filesystem import FilesystemStore
from tests.support.umask import umask


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """Umask 0: a file's mode is then only what the code asked for."""
    with umask(0):
        yield


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_makes_a_private_file_in_private_new_folders(tmp_path: Path) -> None:
    target = tmp_path / "landing" / "ab" / "abcd.dcm"
    durable.write_atomic(target, b"a patient's image")
    assert _mode(target) == 0o600
    assert _mode(target.parent) == 0o700 and _mode(tmp_path / "landing") == 0o700
    durable.write_atomic(target, b"written again")  # a new inode renamed over it: private as well
    assert _mode(target) == 0o600


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    durable.write_atomic(shared / "a" / "b.dcm", b"x")
    assert _mode(shared) == 0o755 and _mode(shared / "a") == 0o700


def test_the_archive_put_from_a_stream_is_private(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "archive")
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    store.put_stream(f"{study}/{series}/{sop}.dcm", io.BytesIO(b"a patient's image"))
    assert _mode(store.root / study / series / f"{sop}.dcm") == 0o600
    assert {_mode(store.root), _mode(store.root / study), _mode(store.root / study / series)} == {0o700}


def test_the_archive_copy_across_filesystems_is_private(tmp_path: Path, monkeypatch) -> None:
    def no_hard_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    source = tmp_path / "landed.dcm"
    source.write_bytes(b"a patient's image")
    source.chmod(0o600)
    monkeypatch.setattr(durable.os, "link", no_hard_links)
    store = FilesystemStore(tmp_path / "archive")
    store.put_file("1/2/3.dcm", source, link=True)
    assert _mode(store.root / "1" / "2" / "3.dcm") == 0o600


def test_the_routing_ledger_is_private(tmp_path: Path) -> None:
    record, study, sop = StudiesSent("ws", tmp_path / "sent"), generate_uid(), generate_uid()
    record.claim(study, {sop: None})
    record.delivered(study, sop)
    record.write_delivered()  # appended to a new file
    assert _mode(tmp_path / "sent" / f"{study}.json") == 0o600
    assert _mode(tmp_path / "sent") == 0o700


def test_a_command_output_of_ours_is_made_private_and_rewritten(tmp_path: Path) -> None:
    from diana.cli._common import open_private

    out = tmp_path / "cohort.csv"
    out.write_text("an older, longer content\n")
    out.chmod(0o644)
    with open_private(str(out)) as fh:
        fh.write("new\n")
    assert out.read_text() == "new\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_another_users_readable_file_is_refused_before_it_is_emptied(tmp_path: Path, monkeypatch) -> None:
    """Emptied first and then refused its mode change (fchmod: EPERM), it lost its content for nothing."""
    from diana.cli._common import open_private

    out = tmp_path / "shared.csv"
    out.write_text("somebody's data\n")
    out.chmod(0o666)
    monkeypatch.setattr(os, "geteuid", lambda: out.stat().st_uid + 1)  # the file is another user's
    with pytest.raises(PermissionError, match="another user"):
        open_private(str(out))
    assert out.read_text() == "somebody's data\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o666
