"""Unit: storage URIs in events, and which of them a store accepts as its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.storage import FilesystemStore, S3Store, StorageURI, key_in_store, parse_uri


class _NoClient:
    """S3Store needs a client only to talk to a server; key_in_store never does."""


def test_file_and_s3_uris_parse():
    assert parse_uri("file:///var/landing/ab/abc.dcm") == StorageURI("file", "", "/var/landing/ab/abc.dcm")
    assert parse_uri("file://localhost/x%20y/a.dcm") == StorageURI("file", "", "/x y/a.dcm")
    assert parse_uri("s3://diana/landing/ab/abc.dcm") == StorageURI("s3", "diana", "landing/ab/abc.dcm")


@pytest.mark.parametrize(
    "uri,why",
    [
        ("landing/ab/abc.dcm", "not a storage URI"),
        ("http://host/ab/abc.dcm", "not a storage URI"),
        ("file://otherhost/var/x.dcm", "names no host"),
        ("s3:///landing/x.dcm", "s3://bucket/key"),
        ("s3://key:secret@diana/landing/x.dcm", "no credentials"),
        ("s3://diana/landing/../archive/x.dcm", "not a valid object key"),
        ("s3://diana/", "not a valid object key"),
        ("file:///var/x.dcm?version=2", "no query"),
    ],
)
def test_malformed_uris_are_refused_with_the_reason(uri, why):
    with pytest.raises(ValueError, match=why):
        parse_uri(uri)


def test_a_filesystem_store_accepts_only_files_under_its_root(tmp_path: Path):
    store = FilesystemStore(tmp_path / "landing")
    assert key_in_store(store, store.uri("ab/abc.dcm")) == "ab/abc.dcm"
    for uri in (
        (tmp_path / "landing-other" / "ab" / "abc.dcm").as_uri(),  # a sibling sharing the prefix
        (tmp_path / "archive" / "x.dcm").as_uri(),
        "file:///etc/passwd",
        f"{store.root.as_uri()}/../archive/x.dcm",
        "s3://diana/landing/ab/abc.dcm",
    ):
        with pytest.raises(ValueError):
            key_in_store(store, uri)


def test_an_s3_store_accepts_only_its_bucket_and_prefix():
    store = S3Store(_NoClient(), "diana", "landing/")
    assert key_in_store(store, "s3://diana/landing/ab/abc.dcm") == "ab/abc.dcm"
    assert key_in_store(store, store.uri("ab/abc.dcm")) == "ab/abc.dcm"
    for uri in ("s3://other/landing/ab/abc.dcm", "s3://diana/archive/1/2/3.dcm", "file:///landing/ab/abc.dcm"):
        with pytest.raises(ValueError, match="not in this landing store"):
            key_in_store(store, uri)


def test_a_landing_stores_scratch_files_are_never_an_events_object(tmp_path: Path):
    """``.incoming/`` (objects still being received) and ``.*.tmp`` files: a forged event naming one must not
    make a sink archive it and then delete it."""
    store = FilesystemStore(tmp_path / "landing")
    s3 = S3Store(_NoClient(), "diana", "landing/")
    for uri in (store.uri(".incoming/tmpab12"), store.uri("ab/.abc.dcm.tmp"), "s3://diana/landing/.incoming/x"):
        with pytest.raises(ValueError, match="hidden file"):
            key_in_store(s3 if uri.startswith("s3") else store, uri)
