"""Unit: DICOMweb request input that cannot be answered is refused with its reason, and a refused
STOW-RS body leaves nothing behind (access/dicomweb)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from diana.access.dicomweb.qido import MAX_OFFSET, QidoError, parameter_message, parse_qido
from diana.access.dicomweb.stow import StowError, StowTooLarge, receive_body, split_parts, store_parts
from diana.access.dicomweb.wado import frame_numbers
from diana.access.qr.identifier import IdentifierError, parse_identifier
from diana.scratch import ScratchFile


def _identifier(params: list[tuple[str, str]], level: str = "STUDY"):
    qido = parse_qido(params, level, {}, 1000)
    return qido, parse_identifier(qido.identifier, "STUDY", hierarchical=False)


@pytest.mark.parametrize("value", ["²", "١٢", "+5", "5 ", "1" * 13])
def test_limit_and_offset_take_ascii_digits_only(value):
    for name in ("limit", "offset"):
        with pytest.raises(QidoError, match=f"^{name}="):
            parse_qido([(name, value)], "STUDY", {}, 1000)


def test_an_offset_past_the_deepest_page_is_refused_and_one_at_it_is_taken():
    assert parse_qido([("offset", str(MAX_OFFSET))], "STUDY", {}, 1000).offset == MAX_OFFSET
    with pytest.raises(QidoError, match="narrow the query"):
        parse_qido([("offset", str(MAX_OFFSET + 1))], "STUDY", {}, 1000)


@pytest.mark.parametrize(
    "params, level, named",
    [
        ([("SeriesNumber", "+-5")], "SERIES", "SeriesNumber"),
        ([("SeriesNumber", "1_0")], "SERIES", "SeriesNumber"),
        ([("ReferencedSeriesSequence", "x")], "STUDY", "ReferencedSeriesSequence"),
        ([("00189087", "x")], "IMAGE", "00189087"),
        ([("includefield", "7FE00010")], "STUDY", "7FE00010"),
    ],
)
def test_values_their_attribute_cannot_hold_are_refused_naming_the_parameter_once(params, level, named):
    qido = parse_qido(params, level, {}, 1000)
    with pytest.raises(IdentifierError) as refused:
        parse_identifier(qido.identifier, "STUDY", hierarchical=False)
    message = parameter_message(qido, refused.value.tag, str(refused.value))
    assert message.startswith(f"{named}: ") and message.count(":") == 1, message


def test_integers_with_one_sign_still_match():
    _, query = _identifier([("SeriesNumber", "-5")], "SERIES")
    assert [m.values for m in query.matchers if m.attribute.keyword == "SeriesNumber"] == [("-5",)]


def test_frame_lists():
    assert frame_numbers("3,1,2") == [3, 1, 2]
    for text, why in [("1,1", "frame 1 is asked for more than once"), ("0", "start at 1"), ("1,,2", "comma")]:
        with pytest.raises(ValueError, match=why):
            frame_numbers(text)
    for text in ["²", "-1", "+1", "1_0", " 1", "1" * 10]:
        with pytest.raises(ValueError, match="comma-separated"):
            frame_numbers(text)


async def _chunks(*pieces: bytes):
    for piece in pieces:
        yield piece


def test_a_body_past_the_limit_is_refused_as_it_arrives_and_its_file_removed(tmp_path):
    with pytest.raises(StowTooLarge, match="max_stow_bytes"):
        anyio.run(receive_body, _chunks(b"a" * 600, b"b" * 600), tmp_path, 1000)
    assert list(tmp_path.iterdir()) == []
    body = anyio.run(receive_body, _chunks(b"a" * 500, b"b" * 500), tmp_path, 1000)
    assert body.path.read_bytes() == b"a" * 500 + b"b" * 500


def test_a_body_whose_client_goes_away_leaves_no_file(tmp_path):
    async def gone():
        yield b"part of it"
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        anyio.run(receive_body, gone(), tmp_path, 1000)
    assert list(tmp_path.iterdir()) == []


def _multipart(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    return (
        b"".join(
            f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + content + b"\r\n" for kind, content in parts
        )
        + f"--{boundary}--\r\n".encode()
    )


def test_a_body_refused_whole_keeps_none_of_the_parts_read_before(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    body = tmp_path / "body"
    body.write_bytes(_multipart("b0", ("application/dicom", b"first"), ("text/plain", b"second")))
    with pytest.raises(StowError, match="not application/dicom"):
        split_parts(body, "b0", folder)
    assert list(folder.iterdir()) == []
    body.write_bytes(_multipart("b0", ("application/dicom", b"first"))[:-8])  # no close delimiter
    with pytest.raises(StowError, match="truncated"):
        split_parts(body, "b0", folder)
    body.write_bytes(_multipart("b0", ("application/dicom", b"first"), ("application/dicom", b"second")))
    assert [p.path.read_bytes() for p in split_parts(body, "b0", folder)] == [b"first", b"second"]


class _FailingIngest:
    """An ingest whose landing store is reached and then fails with what no branch expects."""

    header_budget = 1 << 20
    max_inflated_bytes = 1 << 20

    def __init__(self, incoming: Path):
        self.landing = type("Landing", (), {"incoming": incoming})()


def test_stored_or_not_no_part_file_outlives_the_request(tmp_path, monkeypatch):
    import diana.access.dicomweb.stow as stow

    parts = []
    for _ in range(3):
        part = ScratchFile(tmp_path, prefix="stow-part-")
        part.path.write_bytes(b"x")
        parts.append(part)

    def unexpected(*args, **kwargs):
        raise RuntimeError("a failure no branch expects")

    monkeypatch.setattr(stow, "read_header_file", unexpected)
    with pytest.raises(RuntimeError):
        store_parts(_FailingIngest(tmp_path), parts, None)
    assert [p for p in parts if p.path.exists()] == []


def test_a_receiver_starting_during_a_stow_request_leaves_its_body_parts_and_their_links(tmp_path, monkeypatch):
    """The body and its parts were unlocked files in .incoming/: a receiver (re)started during a STOW-RS
    request swept them at once, and the request failed or landed nothing. Now each is held (scratch.py)
    until the request removes it; the sweep here opens each by a descriptor of its own, as another process
    does, and the hard link the landing makes beside the objects for a part is the same inode, held too."""
    from pydicom.uid import generate_uid

    from diana.producers.landing import LandingStore
    from tests.support.dicomgen import make_instance

    store = LandingStore(tmp_path / "landing")
    instance = tmp_path / "one.dcm"
    make_instance(generate_uid(), generate_uid(), 1, patient_id="P1", study_date="20240101", rows=8).save_as(
        instance, enforce_file_format=True
    )
    content = instance.read_bytes()
    body = anyio.run(receive_body, _chunks(_multipart("b0", ("application/dicom", content))), store.incoming, 1 << 30)
    assert store.sweep(older_than_s=0) == 0 and body.path.exists()

    parts = split_parts(body.path, "b0", store.incoming)
    body.remove()
    assert store.sweep(older_than_s=0) == 0 and all(p.path.exists() for p in parts)

    import diana.durable as durable

    replace = durable.os.replace

    def swept_before_the_rename(tmp, target):  # the part's hard link ab/.<sha>.dcm.<uuid>.tmp exists now
        assert Path(tmp).name.endswith(".tmp") and store.sweep(older_than_s=0) == 0 and Path(tmp).exists()
        replace(tmp, target)

    class SweptWhileLanding:
        header_budget = 1 << 20
        max_inflated_bytes = 1 << 20
        landing = store

        def accept_file(self, path, source, owned, called_ae):
            with store.landed(path, owned) as stored:  # its hard link beside the objects made, as a C-STORE's
                assert store.sweep(older_than_s=0) == 0
                assert Path(stored.uri.removeprefix("file://")).read_bytes() == content

    monkeypatch.setattr(durable.os, "replace", swept_before_the_rename)
    result = store_parts(SweptWhileLanding(), parts, None)
    monkeypatch.undo()
    assert len(result.stored) == 1 and not result.failed
    assert list(store.incoming.iterdir()) == []
