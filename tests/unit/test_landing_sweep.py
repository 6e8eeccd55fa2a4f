"""The receiver's sweep of ``.incoming/`` leaves the files a live writer (``diana import``) holds, and still
removes a crashed writer's. Real processes and real descriptors: ``flock`` belongs to the open file
description, so a lock taken in another process, or by another ``open`` in this one, is what is tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from pydicom.uid import generate_uid

from diana import scratch
from diana.producers.landing import LandingStore
from diana.scratch import ScratchFile, remove_unless_held
from tests.support.dicomgen import make_instance

_ROOT = Path(__file__).resolve().parents[2]


def _instance(path: Path) -> Path:
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P1", study_date="20240101", rows=8)
    ds.save_as(path, enforce_file_format=True)
    return path


def _writer(landing: Path, source: Path) -> subprocess.Popen[str]:
    """Another process importing ``source``: it holds its private copy in .incoming (the block of
    ``private_copy``) and says so, then waits for a line on its input before it lets go."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from diana.producers.landing import LandingStore
        store = LandingStore(Path({str(landing)!r}))
        with store.private_copy(Path({str(source)!r})) as (copy, digest):
            print(copy, flush=True)
            sys.stdin.readline()
            print(copy.read_bytes() == Path({str(source)!r}).read_bytes(), flush=True)
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_a_receiver_starting_while_an_import_copies_leaves_its_file_and_removes_a_crashed_ones(tmp_path):
    """A receiver started while `diana import` ran (a store not shared) swept .incoming at once and removed
    the copy the import was reading: the file failed, or vanished under the hard link. Now the sweep leaves
    a file whose writer is alive, and removes it once the writer is killed (its lock gone with it)."""
    landing = tmp_path / "landing"
    source = _instance(tmp_path / "a.dcm")
    store = LandingStore(landing)
    (store.incoming / "tmpdebris.dcm").write_bytes(b"half")  # a crashed association's: no lock

    live = _writer(landing, source)
    try:
        assert live.stdout is not None and live.stdin is not None
        copy = Path(live.stdout.readline().strip())
        assert copy.parent == store.incoming and copy.exists()

        assert store.sweep(older_than_s=0) == 1  # the debris only
        assert copy.exists()
        live.stdin.write("go\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "True"  # the writer read its whole copy after the sweep
        assert live.wait(30) == 0
    finally:
        live.kill()
    assert list(store.incoming.iterdir()) == []

    crashed = _writer(landing, source)
    try:
        assert crashed.stdout is not None
        copy = Path(crashed.stdout.readline().strip())
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.wait(30)
    finally:
        crashed.kill()
    assert copy.exists()
    assert store.sweep(older_than_s=0) == 1 and not copy.exists()  # a dead writer's file is swept as before


def test_a_held_file_and_its_hard_link_beside_the_objects_are_left_by_another_descriptor(tmp_path):
    """flock is per open file description: the sweep's own open of the file, in the same process, does not
    get the writer's lock. durable.place_file's temporary hard link beside the landed objects is the same
    inode: the same lock covers it."""
    store = LandingStore(tmp_path / "landing")
    held = ScratchFile(store.incoming, suffix=".import")
    shard = store.root / "ab"
    shard.mkdir()
    link = shard / ".abcd.dcm.123.tmp"
    os.link(held.path, link)

    assert store.sweep(older_than_s=0) == 0 and held.path.exists() and link.exists()
    held.remove()
    assert not held.path.exists()
    assert store.sweep(older_than_s=0) == 1 and not link.exists()  # no one holds it now


def test_a_sweep_between_the_file_made_and_its_lock_taken_makes_the_writer_make_another(tmp_path, monkeypatch):
    """mkstemp, then flock: a sweep in between takes the lock first and removes the file. The writer, whose
    flock waited for it, sees its file has no name any more and makes another."""
    made: list[Path] = []
    mkstemp = scratch.tempfile.mkstemp

    def making(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        made.append(Path(name))
        if len(made) == 1:
            assert remove_unless_held(made[0])  # the sweep, by its own descriptor, before the writer's lock
        return fd, name

    monkeypatch.setattr(scratch, "tempfile", SimpleNamespace(mkstemp=making))

    with ScratchFile(tmp_path, suffix=".import") as held:
        assert len(made) == 2 and held.path == made[1] and held.path.exists()
        with held.open() as fh:
            fh.write(b"kept")
        assert held.path.read_bytes() == b"kept"
    assert not made[0].exists() and not made[1].exists()


def test_on_a_filesystem_without_locks_the_writer_writes_and_the_sweep_removes_by_age_as_before(tmp_path, monkeypatch):
    """NFS without its lock daemon answers flock with ENOLCK: the import must not fail every file for it."""
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(scratch.fcntl, "flock", no_locks)
    store = LandingStore(tmp_path / "landing")
    held = ScratchFile(store.incoming, suffix=".import")
    with held.open() as fh:
        fh.write(b"written")
    assert held.path.read_bytes() == b"written"
    assert store.sweep(older_than_s=3600) == 0 and held.path.exists()  # young: left, as before
    assert store.sweep(older_than_s=0) == 1 and not held.path.exists()
    held.remove()


def test_debris_whose_lock_cannot_be_tested_is_removed_by_age_as_before(tmp_path, monkeypatch):
    """A receiver running as another user cannot open a crashed root-run import's 0600 copy (EACCES), nor
    its hard link beside the objects, and O_NOFOLLOW refuses a symlink (ELOOP): the sweep left them for
    ever (a whole private copy of a patient's image), though unlinking needs only the folder's write
    permission. Now they go by the age rule of before, even at a start-up sweep, and a young one stays
    (its writer may be alive). Run as root here: the EACCES of another user's file is played by os.open."""
    import errno
    import time

    store = LandingStore(tmp_path / "landing")
    shard = store.root / "ab"
    shard.mkdir()
    old = time.time() - 2 * 3600
    not_ours = [store.incoming / ".copy-root.tmp", shard / ".abcd.dcm.root.tmp"]
    young = store.incoming / ".copy-young.tmp"
    for path in [*not_ours, young]:
        path.write_bytes(b"a patient's image")
    for path in not_ours:
        os.utime(path, (old, old))
    target = store.incoming / "target"
    target.write_bytes(b"x")
    link, dangling = store.incoming / "link", store.incoming / "dangling"
    link.symlink_to(target)
    dangling.symlink_to(store.incoming / "nothing")
    for path in (link, dangling):
        os.utime(path, (old, old), follow_symlinks=False)
    os.utime(target, (old, old))

    refused = {str(p) for p in [*not_ours, young]}
    real_open = os.open

    def open_as_another_user(path, flags, *args, **kwargs):
        if str(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(scratch.os, "open", open_as_another_user)
    removed = store.sweep(older_than_s=0)
    monkeypatch.undo()

    assert [p for p in [*not_ours, link, dangling] if os.path.lexists(p)] == []
    assert young.exists()  # under an hour: whether its writer is alive cannot be told
    assert removed == 5  # the two not ours, the two links, and the old unheld target


def test_place_files_copy_where_hard_links_fail_is_held_until_renamed_into_place(tmp_path, monkeypatch):
    """On exFAT or CIFS os.link fails and place_file copies to a temporary name beside the object; that
    file was unlocked, so a receiver starting meanwhile removed it and the rename failed (the import's
    file failed: No such file). Now it is held until renamed; its mode is 600, as the hard link's inode."""
    import errno

    from diana import durable

    store = LandingStore(tmp_path / "landing")
    held = ScratchFile(store.incoming, prefix=".copy-", suffix=".tmp")  # an import's private copy
    source = held.path
    source.write_bytes(b"the object's bytes")
    target = store.root / "ab" / "abcd.dcm"
    swept: list[int] = []

    def no_hard_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    copyfileobj = durable.shutil.copyfileobj

    def copy_while_a_receiver_starts(src, dst, length):
        swept.append(store.sweep(older_than_s=0))  # the temporary exists now, beside the objects
        copyfileobj(src, dst, length)

    monkeypatch.setattr(durable.os, "link", no_hard_links)
    monkeypatch.setattr(durable.shutil, "copyfileobj", copy_while_a_receiver_starts)
    assert durable.place_file(source, target, link=True) is False
    monkeypatch.undo()
    held.remove()
    assert swept == [0] and target.read_bytes() == b"the object's bytes"
    assert list(target.parent.glob(".*.tmp")) == []
    assert target.stat().st_mode & 0o777 == 0o600  # patient data: not readable by other local users
