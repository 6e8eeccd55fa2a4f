"""The object-store contract (diana/storage), the same tests on the filesystem and on a real S3 server (S3Proxy)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest

from diana.storage import (
    FilesystemStore,
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    open_store,
)

SIX_MIB = 6 * 1024**2


@pytest.fixture(params=["filesystem", "s3"])
def store(request, tmp_path: Path) -> ObjectStore:
    if request.param == "filesystem":
        return FilesystemStore(tmp_path / "store")
    s3_cfg = request.getfixturevalue("s3proxy")
    archive = open_store(s3_cfg, "archive")
    assert isinstance(archive, S3Store)
    # One prefix per test: the tests do not see each other's objects.
    return S3Store(archive.client, archive.bucket, f"t-{request.node.name.replace('[', '-').strip(']')}/", 5 * 1024**2)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_exists_size_and_sha(store: ObjectStore, tmp_path: Path):
    source = tmp_path / "in.dcm"
    source.write_bytes(b"DICM" * 1000)
    assert not store.exists("1.2/1.2.3/1.2.3.4.dcm")
    assert store.put_file("1.2/1.2.3/1.2.3.4.dcm", source, sha256=_sha(source.read_bytes())) == _sha(b"DICM" * 1000)
    assert store.exists("1.2/1.2.3/1.2.3.4.dcm")
    assert store.size("1.2/1.2.3/1.2.3.4.dcm") == 4000
    assert store.sha256("1.2/1.2.3/1.2.3.4.dcm") == _sha(b"DICM" * 1000)
    with store.open("1.2/1.2.3/1.2.3.4.dcm") as stream:
        assert stream.read() == b"DICM" * 1000
    # The filesystem store's put leaves its source in place (the caller removes it).
    assert source.exists()


def test_a_source_of_other_bytes_is_refused_and_nothing_is_stored(store: ObjectStore, tmp_path: Path):
    source = tmp_path / "in.dcm"
    source.write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        store.put_file("a/b.dcm", source, sha256=_sha(b"original"))
    with pytest.raises(IntegrityError):
        store.put_stream("a/b.dcm", io.BytesIO(b"tampered"), sha256=_sha(b"original"))
    assert not store.exists("a/b.dcm")
    assert list(store.list("a/")) == []
    # An object already under the key is not replaced by a refused put.
    store.put_stream("a/b.dcm", io.BytesIO(b"original"))
    with pytest.raises(IntegrityError):
        store.put_stream("a/b.dcm", io.BytesIO(b"tampered"), sha256=_sha(b"original"))
    assert store.sha256("a/b.dcm") == _sha(b"original")


def test_large_objects_go_in_parts_and_are_verified(store: ObjectStore):
    # 13 MiB of varying bytes: three parts of 5 MiB on S3 (the smallest part S3 allows).
    data = os.urandom(1024**2) * 13
    assert store.put_stream("big/one.bin", io.BytesIO(data), sha256=_sha(data)) == _sha(data)
    assert store.size("big/one.bin") == len(data)
    assert store.sha256("big/one.bin") == _sha(data)
    # A wrong hash is found only at the end of the stream: the upload is aborted, nothing visible.
    with pytest.raises(IntegrityError):
        store.put_stream("big/two.bin", io.BytesIO(data), sha256=_sha(b"something else"))
    assert not store.exists("big/two.bin")
    if isinstance(store, S3Store):
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        assert uploads.get("Uploads", []) == []


def test_list_copy_and_delete(store: ObjectStore):
    for key in ("s/1/a.dcm", "s/1/b.dcm", "s/2/c.dcm", "t/d.dcm"):
        store.put_stream(key, io.BytesIO(key.encode()))
    assert sorted(store.list("s/")) == ["s/1/a.dcm", "s/1/b.dcm", "s/2/c.dcm"]
    assert sorted(store.list()) == ["s/1/a.dcm", "s/1/b.dcm", "s/2/c.dcm", "t/d.dcm"]
    assert store.copy("s/1/a.dcm", "u/a.dcm", sha256=_sha(b"s/1/a.dcm")) == _sha(b"s/1/a.dcm")
    with store.open("u/a.dcm") as stream:
        assert stream.read() == b"s/1/a.dcm"
    with pytest.raises(IntegrityError):
        store.copy("s/1/b.dcm", "u/b.dcm", sha256=_sha(b"not these bytes"))
    assert not store.exists("u/b.dcm")
    store.delete("s/1/a.dcm")
    store.delete("s/1/a.dcm")  # deleting what is not there is no error
    assert not store.exists("s/1/a.dcm") and store.exists("u/a.dcm")
    with pytest.raises(ObjectNotFound):
        store.sha256("s/1/a.dcm")
    with pytest.raises(ObjectNotFound), store.open("nothing/here.dcm"):
        pass


def test_copy_between_stores(store: ObjectStore, tmp_path: Path):
    local = FilesystemStore(tmp_path / "other")
    local.put_stream("x/y.dcm", io.BytesIO(b"payload"))
    assert store.copy_from(local, "x/y.dcm", "from-local/y.dcm", sha256=_sha(b"payload")) == _sha(b"payload")
    assert local.copy_from(store, "from-local/y.dcm", "back/y.dcm", sha256=_sha(b"payload")) == _sha(b"payload")
    with local.open("back/y.dcm") as stream:
        assert stream.read() == b"payload"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x.dcm", "a/../../x.dcm", "a//b.dcm", "a/./b.dcm"])
def test_keys_that_could_leave_the_store_are_refused(store: ObjectStore, key: str):
    with pytest.raises(ValueError, match="not a valid object key"):
        store.put_stream(key, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="not a valid object key"):
        store.exists(key)


def test_two_writers_of_one_content_addressed_key_both_succeed_with_one_whole_object(store: ObjectStore):
    # Two receivers landing the same bytes at once: both puts succeed, the object is whole and right.
    data = os.urandom(256 * 1024) * 24  # 6 MiB: multipart on S3
    key = f"landing/{_sha(data)}"
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put_stream(key, io.BytesIO(data), sha256=_sha(data))
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    writers = [threading.Thread(target=put) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert errors == []
    assert store.sha256(key) == _sha(data) and store.size(key) == len(data)
    assert list(store.list("landing/")) == [key]


def test_a_seekable_open_reads_as_a_file_does(store: ObjectStore):
    """open_seekable (WADO-RS frames and bulk data): seeks and reads of every size give the object's bytes;
    on S3 by ranged GETs against the real server (its Range and Content-Range answers, a range on an empty
    object refused with 416, the size then from a HEAD)."""
    data = os.urandom(1024**2) * 3 + os.urandom(12345)  # more than the read-ahead (1 MiB) three times
    store.put_stream("seek/one.bin", io.BytesIO(data))
    with store.open_seekable("seek/one.bin") as stream:
        reads = [(0, 132), (128, 4), (2 * 1024**2 + 7, 10), (len(data) - 5, 100), (1000, 1536 * 1024), (5, 3 * 1024**2)]
        for position, size in [*reads, (len(data) + 10, 5), (1024**2 - 3, 6)]:
            assert stream.seek(position) == position
            assert stream.read(size) == data[position : position + size], (position, size)
            assert stream.tell() == min(position + size, max(position, len(data)))
        assert stream.seek(-20, io.SEEK_END) == len(data) - 20
        assert stream.read() == data[-20:]
        stream.seek(0)
        assert stream.read() == data
    with pytest.raises(ObjectNotFound), store.open_seekable("seek/none.bin"):
        pass
    store.put_stream("seek/empty.bin", io.BytesIO(b""))
    with store.open_seekable("seek/empty.bin") as stream:
        assert stream.read() == b"" and stream.read(10) == b""


def test_an_object_replaced_while_read_seekably_is_never_mixed(store: ObjectStore):
    """A seekable read gives the version it opened, or fails: never the new version's bytes at the old one's
    offsets. A file renamed over leaves the old one readable through the open file; on S3 each request
    after the first carries If-Match with the first one's ETag, and the real server answers 412
    (ObjectChanged). Opened again, the new version."""
    old, new = os.urandom(3 * 1024**2), os.urandom(3 * 1024**2)
    store.put_stream("swap/one.bin", io.BytesIO(old))
    with store.open_seekable("swap/one.bin") as stream:
        assert stream.read(100) == old[:100]
        store.put_stream("swap/one.bin", io.BytesIO(new))
        stream.seek(2 * 1024**2)
        if isinstance(store, S3Store):
            with pytest.raises(ObjectChanged, match="replaced while it was read"):
                stream.read(1000)
        else:
            assert stream.read(1000) == old[2 * 1024**2 : 2 * 1024**2 + 1000]
    with store.open_seekable("swap/one.bin") as stream:
        stream.seek(2 * 1024**2)
        assert stream.read(1000) == new[2 * 1024**2 : 2 * 1024**2 + 1000]


def test_a_seekable_s3_read_fetches_what_is_read_not_the_object(s3proxy):
    """Ten bytes at 15 MiB of a 20 MiB object: two GETs (the first MiB, then a MiB from there), as botocore's
    event hooks see them (observed: the server is the real one). Both answers carry the object's ETag,
    which the view requires of every answer after the first (one without is refused: ObjectChanged)."""
    archive = open_store(s3proxy, "archive")
    assert isinstance(archive, S3Store)
    store = S3Store(archive.client, archive.bucket, "t-seekable-fetch/")
    data = os.urandom(1024**2) * 20
    store.put_stream("big.bin", io.BytesIO(data))
    gets: list[tuple[int, int]] = []
    etags: list[str | None] = []

    def observe(http_response, parsed, **_) -> None:
        gets.append((http_response.status_code, int(parsed.get("ContentLength") or 0)))
        etags.append(parsed.get("ETag"))

    archive.client.meta.events.register("after-call.s3.GetObject", observe)
    try:
        with store.open_seekable("big.bin") as stream:
            stream.seek(15 * 1024**2)
            assert stream.read(10) == data[15 * 1024**2 : 15 * 1024**2 + 10]
            assert stream.read(100) == data[15 * 1024**2 + 10 : 15 * 1024**2 + 110]  # from the same window
    finally:
        archive.client.meta.events.unregister("after-call.s3.GetObject", observe)
    assert gets == [(206, 1024**2), (206, 1024**2)]
    assert etags[0] and etags == [etags[0]] * 2
