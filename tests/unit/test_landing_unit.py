"""Unit: the landing store keeps exactly what some acknowledged event points to."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.producers.landing import LandingStore


class Refused(Exception):
    pass


def _source(tmp_path: Path, data: bytes, name: str = "src.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_published_object_stays_and_a_refused_one_is_removed(tmp_path):
    store = LandingStore(tmp_path / "landing")
    with store.landed(_source(tmp_path, b"kept"), owned=False) as stored:
        pass
    assert (store.root / stored.relative_path).read_bytes() == b"kept"
    with pytest.raises(Refused), store.landed(_source(tmp_path, b"refused"), owned=False) as refused:
        raise Refused
    assert not (store.root / refused.relative_path).exists()


def test_a_refused_resend_keeps_what_was_already_there(tmp_path):
    store = LandingStore(tmp_path / "landing")
    with store.landed(_source(tmp_path, b"same"), owned=False) as first:
        pass
    with pytest.raises(Refused), store.landed(_source(tmp_path, b"same", "again.dcm"), owned=False):
        raise Refused
    assert (store.root / first.relative_path).exists()


def test_the_same_bytes_sent_again_replace_a_copy_damaged_on_disk_and_leave_an_intact_one(tmp_path):
    store = LandingStore(tmp_path / "landing")
    with store.landed(_source(tmp_path, b"the received bytes"), owned=False) as first:
        pass
    landed = store.root / first.relative_path
    inode = landed.stat().st_ino
    with store.landed(_source(tmp_path, b"the received bytes", "again.dcm"), owned=False):
        pass
    assert landed.stat().st_ino == inode, "an intact copy is left as it is"
    landed.write_bytes(b"the received bytez")  # same size, one byte changed since it landed
    with store.landed(_source(tmp_path, b"the received bytes", "third.dcm"), owned=False) as third:
        pass
    assert third.relative_path == first.relative_path
    assert landed.read_bytes() == b"the received bytes"
    landed.write_bytes(b"THE received bytes")
    assert store.put(b"the received bytes").relative_path == first.relative_path
    assert landed.read_bytes() == b"the received bytes"


def test_a_copy_archived_and_removed_while_it_is_checked_is_placed_again(tmp_path, monkeypatch):
    import diana.producers.landing as landing

    store = LandingStore(tmp_path / "landing")
    with store.landed(_source(tmp_path, b"archived meanwhile"), owned=False) as first:
        pass
    landed = store.root / first.relative_path

    hashed = landing.sha256_file

    def removed_by_the_archive_sink(path):
        if Path(path) != landed:
            return hashed(path)
        landed.unlink()  # between the size check and the read: the archive sink's removal
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(landing, "sha256_file", removed_by_the_archive_sink)
    with store.landed(_source(tmp_path, b"archived meanwhile", "again.dcm"), owned=False):
        pass
    assert landed.read_bytes() == b"archived meanwhile"


def test_concurrent_identical_objects_one_published_one_refused(tmp_path):
    store = LandingStore(tmp_path / "landing")
    a = store.landed(_source(tmp_path, b"twin", "a.dcm"), owned=True)
    b = store.landed(_source(tmp_path, b"twin", "b.dcm"), owned=True)
    stored = a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # a's event acknowledged
    b.__exit__(Refused, Refused(), None)  # b's refused: must not remove what a published
    assert (store.root / stored.relative_path).read_bytes() == b"twin"


def test_owned_files_are_linked_not_copied(tmp_path):
    store = LandingStore(tmp_path / "landing")
    source = _source(store.incoming, b"received")
    with store.landed(source, owned=True) as stored:
        pass
    assert (store.root / stored.relative_path).stat().st_ino == source.stat().st_ino


def test_sweep_removes_debris_only(tmp_path):
    store = LandingStore(tmp_path / "landing")
    with store.landed(_source(tmp_path, b"good"), owned=False) as stored:
        pass
    (store.incoming / "tmpabc.dcm").write_bytes(b"half")
    (store.root / stored.relative_path[:2] / ".x.dcm.123.tmp").write_bytes(b"half")
    assert store.sweep(older_than_s=0) == 2
    assert [rel for rel, _ in store.stored_objects()] == [stored.relative_path]


def test_new_folders_are_made_durably(tmp_path, monkeypatch):
    """Every folder created for a file is fsync'd in its parent (a crash cannot lose the folder)."""
    import diana.durable as durable

    synced: list[str] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(str(p)), real(p)))
    durable.write_atomic(tmp_path / "a" / "b" / "c.dcm", b"x")
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    synced.clear()
    durable.write_atomic(tmp_path / "a" / "b" / "d.dcm", b"y")  # folders exist: only the file's folder
    assert synced == [str(tmp_path / "a" / "b")]


def test_a_shared_store_leaves_a_refused_object_for_reconcile(tmp_path):
    """Several receiver processes: another may have published the same bytes; nothing is removed."""
    store = LandingStore(tmp_path / "landing", shared=True)
    with pytest.raises(Refused), store.landed(_source(tmp_path, b"maybe elsewhere"), owned=False) as refused:
        raise Refused
    assert (store.root / refused.relative_path).read_bytes() == b"maybe elsewhere"


def test_a_spill_file_hashes_what_it_writes_and_lands_without_being_read_again(tmp_path):
    import hashlib

    from diana.producers.spill import SpillFile

    store = LandingStore(tmp_path / "landing")
    spill = SpillFile(delete=False, mode="wb", suffix=".dcm", dir=store.incoming)
    chunks = [b"\x00" * 128, b"DICM", bytes(range(256)) * 4000, b"tail"]
    for chunk in chunks:
        spill.write(chunk)
        spill.file.flush()
    digest = spill.sync()
    assert digest == (hashlib.sha256(b"".join(chunks)).hexdigest(), sum(map(len, chunks)))
    with store.landed(Path(spill.name), owned=True, synced_digest=digest) as stored:
        pass
    spill.close()
    landed = store.root / stored.relative_path
    assert landed.read_bytes() == b"".join(chunks)
    assert landed.name == f"{digest[0]}.dcm"
    assert landed.stat().st_ino == Path(spill.name).stat().st_ino  # a link, not a copy


def test_a_remote_store_gets_the_object_before_the_event_and_keeps_a_refused_one(tmp_path):
    """Landing into another store (S3 in production; here a second folder through the same
    interface): the object is there, verified, inside the block; a refused publish leaves it (another
    host may have published the same bytes), and ``.incoming`` stays a local scratch folder."""
    from diana.storage import FilesystemStore

    remote = FilesystemStore(tmp_path / "bucket")
    store = LandingStore(tmp_path / "scratch", remote=remote)
    assert store.shared and store.incoming == (tmp_path / "scratch" / ".incoming").resolve()
    source = _source(store.incoming, b"to the store")
    with store.landed(source, owned=True) as stored:
        assert remote.sha256(stored.relative_path) == stored.sha256  # durable before the publish
    assert stored.uri == remote.uri(stored.relative_path)
    assert list(store.stored_objects()) == []  # nothing landed in the local folder
    with pytest.raises(Refused), store.landed(_source(tmp_path, b"refused"), owned=False) as refused:
        raise Refused
    assert remote.exists(refused.relative_path)
    assert sorted(key for key, _ in store.landed_objects()) == sorted([stored.relative_path, refused.relative_path])
    with store.local_copy(stored.relative_path) as path:
        assert path.read_bytes() == b"to the store"


def test_an_object_whose_event_may_have_gone_out_stays(tmp_path):
    """A broker timeout can still append the event ("possibly persisted"): its object must be there
    for the archive sink. Seen with a broker killed mid-send (docs/SCALING.md, "refused but written")."""
    from confluent_kafka import KafkaError

    from diana.producers.publisher import PublishError, PublishUncertain, _refusal

    timed_out = _refusal(KafkaError(KafkaError._MSG_TIMED_OUT), "broker refused", sent=True)
    assert isinstance(timed_out, PublishUncertain)
    assert not isinstance(_refusal(KafkaError(KafkaError._TRANSPORT), "produce refused", sent=False), PublishUncertain)
    assert not isinstance(
        _refusal(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), "broker refused", sent=True), PublishUncertain
    )
    store = LandingStore(tmp_path / "landing")
    with pytest.raises(PublishUncertain), store.landed(_source(tmp_path, b"maybe out"), owned=False) as maybe:
        raise timed_out
    assert (store.root / maybe.relative_path).read_bytes() == b"maybe out"
    with pytest.raises(PublishError), store.landed(_source(tmp_path, b"surely not"), owned=False) as refused:
        raise PublishError("produce refused: queue full")
    assert not (store.root / refused.relative_path).exists()


def test_a_spill_file_handed_over_is_whole_for_a_reader_by_name_before_its_fsync(tmp_path):
    """The receiver reads the header by the file's name while another thread fsyncs it: the last,
    small fragments (held in the write buffer) must be in the file before that read."""
    from diana.producers.spill import SpillFile

    spill = SpillFile(delete=False, mode="wb", suffix=".dcm", dir=tmp_path)
    chunks = [b"\x00" * 128, b"DICM", b"a small last fragment"]
    for chunk in chunks:
        spill.write(chunk)
        spill.file.flush()  # pynetdicom's flush after each fragment: a no-op here
    assert Path(spill.name).stat().st_size < sum(map(len, chunks))  # still buffered
    spill.hand_over()
    assert Path(spill.name).read_bytes() == b"".join(chunks)
    assert spill.sync()[1] == sum(map(len, chunks))
    spill.close()


@pytest.mark.parametrize("rewritten", ["after the header is read", "after the source is hashed"])
def test_an_imported_file_rewritten_meanwhile_lands_under_its_own_hash_with_its_own_header(
    tmp_path, monkeypatch, rewritten
):
    """A user's file (an import, not ours) rewritten in place while it is imported (an anonymiser, rsync
    --inplace). Before, the header, the hash and the copy were three reads of it: the event named one
    instance, its sha256 other bytes, and the landed copy could be a third (the archive sink refuses it)."""
    from types import SimpleNamespace

    from pydicom.uid import generate_uid

    import diana.producers.ingest as ingest_mod
    import diana.producers.landing as landing_mod
    from diana.durable import sha256_file
    from diana.producers.header import read_header_file
    from diana.producers.ingest import Ingest
    from tests.support.dicomgen import make_instance

    def instance(name: str) -> Path:
        ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P1", study_date="20240101", rows=8)
        ds.save_as(tmp_path / name, enforce_file_format=True)
        return tmp_path / name

    source, other = instance("a.dcm"), instance("b.dcm")

    def rewrite_after(read):
        def reading(path, *args):
            result = read(path, *args)
            if Path(path) == source:
                source.write_bytes(other.read_bytes())
            return result

        return reading

    if rewritten == "after the header is read":
        monkeypatch.setattr(ingest_mod, "read_header_file", rewrite_after(read_header_file))
    else:
        monkeypatch.setattr(landing_mod, "sha256_file", rewrite_after(sha256_file))
    events: list[dict] = []
    publisher = SimpleNamespace(
        max_message_bytes=1 << 20, publish=lambda topic, key, event: events.append(event) or 0.0
    )
    codec = SimpleNamespace(encode=lambda schema, event: event)
    store = LandingStore(tmp_path / "landing")

    Ingest(store, publisher, codec).accept_file(source, "IMPORT", owned=False)  # type: ignore[arg-type]

    [event] = events
    landed = store.root / event["landing_path"]
    assert sha256_file(landed) == (event["sha256"], event["size_bytes"])
    assert read_header_file(landed).sop_instance_uid == event["sop_instance_uid"]
    assert list(store.incoming.iterdir()) == []  # the private copy is gone
