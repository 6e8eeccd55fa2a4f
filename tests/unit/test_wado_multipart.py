"""The WADO-RS multipart body read in blocks: byte-identical to one part per object, in bounded blocks."""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from diana.access.dicomweb.wado import BLOCK, metadata, multipart_dicom
from diana.storage.filesystem import FilesystemStore


def _collect(store: FilesystemStore, keys: list[str]) -> list[bytes]:
    async def run() -> list[bytes]:
        return [block async for block in multipart_dicom(store, keys, "B")]

    return anyio.run(run)


def test_body_is_each_object_as_stored_between_boundaries(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    sizes = {"1/1/a.dcm": 0, "1/1/b.dcm": 10, "1/1/c.dcm": BLOCK + BLOCK // 2, "1/1/d.dcm": 3}
    contents = {}
    for key, size in sizes.items():
        source = tmp_path / "src"
        source.write_bytes(os.urandom(size))
        store.put_file(key, source)
        contents[key] = source.read_bytes()
    keys = list(sizes)

    blocks = _collect(store, keys)

    head = b"--B\r\nContent-Type: application/dicom\r\n\r\n"
    expected = b"".join(head + contents[k] + b"\r\n" for k in keys) + b"--B--\r\n"
    assert b"".join(blocks) == expected
    # Bounded blocks, and small objects share one: fewer blocks than parts.
    assert all(len(b) <= BLOCK + len(head) + 2 for b in blocks)
    assert len(blocks) == 2  # 1.5 MiB in all


def test_no_objects_is_the_closing_boundary_alone(tmp_path: Path) -> None:
    assert _collect(FilesystemStore(tmp_path), []) == [b"--B--\r\n"]


def test_an_object_not_in_the_archive_is_left_out(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    source = tmp_path / "src"
    source.write_bytes(b"DICM-bytes")
    store.put_file("1/1/a.dcm", source)
    store.put_file("1/1/c.dcm", source)

    body = b"".join(_collect(store, ["1/1/a.dcm", "1/1/b.dcm", "1/1/c.dcm"]))

    # the same bytes as a body of the two archived objects alone
    assert body == b"".join(_collect(store, ["1/1/a.dcm", "1/1/c.dcm"]))
    assert body.count(b"Content-Type: application/dicom") == 2


def test_parts_ending_at_every_offset_around_a_block_boundary(tmp_path: Path) -> None:
    # Heads, closing CRLFs and the tail falling just before, on and after a block's end.
    store = FilesystemStore(tmp_path)
    head = b"--B\r\nContent-Type: application/dicom\r\n\r\n"
    for shift in (-len(head) - 2, -len(head), -2, -1, 0, 1):
        size = BLOCK - len(head) + shift
        source = tmp_path / "src"
        source.write_bytes(os.urandom(size))
        store.put_file(f"1/{shift + 100}/a.dcm", source)
        store.put_file(f"1/{shift + 100}/b.dcm", source)
        content = source.read_bytes()
        keys = [f"1/{shift + 100}/a.dcm", f"1/{shift + 100}/b.dcm"]

        blocks = _collect(store, keys)

        assert b"".join(blocks) == b"".join(head + content + b"\r\n" for _ in keys) + b"--B--\r\n", shift
        assert all(0 < len(b) <= BLOCK + len(head) + len(b"--B--\r\n") + 2 for b in blocks), shift


def test_metadata_is_one_json_array_sent_in_chunks_as_the_documents_are_read() -> None:
    import json

    docs = [{"dicom": {"00080018": {"vr": "UI", "Value": [f"1.2.{n}"]}}} for n in range(50)]
    docs.insert(7, {"dicom": None})  # an instance indexed without its header is left out
    read = 0

    def documents():
        nonlocal read
        for doc in docs:
            read += 1
            yield doc

    body = metadata(documents(), "http://h", chunk_bytes=200)
    first = next(body)
    assert first.startswith(b"[") and read < len(docs)  # sent before the last document was read
    chunks = [first, *body]
    assert len(chunks) > 5 and all(len(c) < 200 + 60 for c in chunks)
    assert [d["00080018"]["Value"][0] for d in json.loads(b"".join(chunks))] == [f"1.2.{n}" for n in range(50)]
    assert b"".join(metadata(iter([]), "http://h")) == b"[]"
