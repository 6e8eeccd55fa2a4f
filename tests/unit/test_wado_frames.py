"""Unit: WADO-RS frames, as stored and decoded, read only the frames asked for (access/dicomweb/wado.py
stored_frames, transcoded.py iter_decoded_frames).

A viewer asks a multi-frame object's frames one request each; reading the whole pixel data for each
made a series of N frames cost N whole reads. Each case counts the bytes read from the object's file.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless

from diana.access.dicomweb.wado import CorruptObject, frame_bytes, stored_frames

FRAMES = 40
ROWS = COLUMNS = 64
FRAME_BYTES = ROWS * COLUMNS * 2


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        count = super().readinto(buffer) or 0
        self.read_bytes += count
        return count


def _frame(number: int) -> bytes:
    """Frame ``number`` (1-based): its own bytes, so a frame served for another is seen."""
    return bytes([number % 251, (number * 7) % 251]) * (FRAME_BYTES // 2)


def _object(
    tmp_path: Path, syntax: str, pixel_data: bytes, frames: int = FRAMES, name: str = "object.dcm", **extra: bytes
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7.2", "1.2.3.4.5"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = ROWS, COLUMNS, 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.add_new(0x7FE00010, "OB" if syntax == RLELossless else "OW", pixel_data)
    if "offsets" in extra:
        ds.add_new(0x7FE00001, "OV", extra["offsets"])
        ds.add_new(0x7FE00002, "OV", extra["lengths"])
    if syntax == RLELossless:
        ds["PixelData"].is_undefined_length = True
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _read(path: Path, numbers: list[int]) -> tuple[list[bytes], int]:
    with _CountingFile(path, "r") as stream:
        frames = list(stored_frames(stream, numbers))  # type: ignore[arg-type]
        return frames, stream.read_bytes


def _all_frames() -> list[bytes]:
    return [_frame(n) for n in range(1, FRAMES + 1)]


def _encapsulated(how: str) -> tuple[bytes, dict[str, bytes]]:
    frames = _all_frames()
    if how == "basic offset table":
        return encapsulate(frames, has_bot=True), {}
    if how == "no offset table":
        return encapsulate(frames, has_bot=False), {}
    data, offsets, lengths = encapsulate_extended(frames)
    return data, {"offsets": offsets, "lengths": lengths}


def test_a_native_frame_is_read_alone(tmp_path: Path):
    path = _object(tmp_path, ExplicitVRLittleEndian, b"".join(_all_frames()))
    frames, read = _read(path, [7, 33])
    assert frames == [_frame(7), _frame(33)]
    # The header and the two frames, not the 40 frames' 320 KiB.
    assert read < 2 * FRAME_BYTES + 16_384, read
    assert frame_bytes(path, [40]) == [_frame(40)]  # by path: the same


@pytest.mark.parametrize("how", ["basic offset table", "no offset table", "extended offset table"])
def test_an_encapsulated_frame_is_read_alone(tmp_path: Path, how: str):
    data, extra = _encapsulated(how)
    path = _object(tmp_path, RLELossless, data, **extra)
    frames, read = _read(path, [1, 21, 40])
    assert frames == [_frame(1), _frame(21), _frame(40)]
    # Without an offset table the items' headers are walked (8 bytes each), never their data.
    assert read < 3 * FRAME_BYTES + 16_384, read


def test_a_deflated_object_is_sliced_in_memory_as_before(tmp_path: Path):
    """Its offsets are the inflated data set's: pydicom reads it whole, and the frame comes from that."""
    path = _object(tmp_path, DeflatedExplicitVRLittleEndian, b"".join(_all_frames()))
    assert frame_bytes(path, [2, 40]) == [_frame(2), _frame(40)]


def test_an_object_short_of_fragments_is_refused_never_served_another_frame(tmp_path: Path):
    """Fewer fragments than its Number of Frames and no offset table: which fragments make which frame
    cannot be told (pydicom's get_frame alone returned all 39 fragments as frame 1), so no frame is
    served: CorruptObject, the app's 500."""
    data = encapsulate(_all_frames()[:-1], has_bot=False)  # 39 of 40, one fragment each
    path = _object(tmp_path, RLELossless, data)
    for numbers in ([1], [40]):
        with pytest.raises(CorruptObject, match="cannot be split in frames|holds [0-9]+ of its 40 frames"):
            frame_bytes(path, numbers)


def test_several_fragments_a_frame_without_a_table_are_split_as_pydicom_splits_them(tmp_path: Path):
    """Two fragments a frame, no offset table: pydicom tells the frames by their JPEG end markers."""
    frames = [b"\xff\xd8" + _frame(n)[: FRAME_BYTES - 4] + b"\xff\xd9" for n in range(1, FRAMES + 1)]
    data = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    path = _object(tmp_path, RLELossless, data)
    assert frame_bytes(path, [3, 40]) == [frames[2], frames[39]]


def test_native_pixel_data_short_of_its_frames_is_refused_before_any_frame(tmp_path: Path):
    path = _object(tmp_path, ExplicitVRLittleEndian, b"".join(_all_frames()[:-1]))
    with pytest.raises(CorruptObject, match=f"holds {39 * FRAME_BYTES} bytes, its 40 frame.s. need"):
        stored_frames(open(path, "rb"), [1])


def test_a_cut_file_is_refused_before_any_frame(tmp_path: Path):
    """The element's length says the frames are there, the file ends before: refused from the file's size,
    before a frame is read (the bulk route streams frames after its status has gone out)."""
    path = _object(tmp_path, ExplicitVRLittleEndian, b"".join(_all_frames()))
    path.write_bytes(path.read_bytes()[: -FRAME_BYTES // 2])
    assert pydicom.dcmread(path, defer_size=1024).NumberOfFrames == FRAMES  # its header reads as whole
    with open(path, "rb") as stream, pytest.raises(CorruptObject, match="its 40 frame.s. need"):
        stored_frames(stream, [1])


def test_a_decoded_frame_is_read_alone(tmp_path: Path):
    """A compressed object's frame decoded (the default) reads the header, the offset table and that frame.
    Before, the pixel data's length was taken by reading the deferred value whole: every frame for one."""
    import random

    from diana.access.dicomweb.transcoded import decoded_frames
    from tests.support.dicomgen import rle_literal

    native = [random.Random(n).randbytes(FRAME_BYTES) for n in range(1, FRAMES + 1)]
    path = _object(tmp_path, RLELossless, encapsulate([rle_literal(f) for f in native], has_bot=True))
    with _CountingFile(path, "r") as stream:
        assert decoded_frames(stream, [33]) == [native[32]]  # type: ignore[arg-type]
        assert stream.read_bytes < 2 * FRAME_BYTES + 16_384, stream.read_bytes  # of 330 KiB


def test_a_cut_file_is_refused_by_the_decoded_frames_too(tmp_path: Path):
    """Its pixel data read not, its length is what the file holds of it (the element claims more)."""
    from pydicom.uid import ExplicitVRBigEndian

    from diana.access.dicomweb.transcoded import decoded_frames

    path = _object(tmp_path, ExplicitVRBigEndian, b"".join(_all_frames()))
    path.write_bytes(path.read_bytes()[: -FRAME_BYTES // 2])
    with pytest.raises(CorruptObject, match="its 40 frame.s. need"):
        decoded_frames(path, [1])
    with open(path, "rb") as stream, pytest.raises(CorruptObject, match="its 40 frame.s. need"):
        decoded_frames(stream, [1])


def _items(table: list[int], fragments: list[bytes]) -> bytes:
    """An encapsulated value written by hand: a Basic Offset Table item of ``table``, an item per fragment,
    the sequence delimiter."""
    out = struct.pack("<HHL", 0xFFFE, 0xE000, 4 * len(table)) + struct.pack(f"<{len(table)}L", *table)
    for fragment in fragments:
        out += struct.pack("<HHL", 0xFFFE, 0xE000, len(fragment)) + fragment
    return out + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def _offsets(lengths: list[int]) -> list[int]:
    return [sum(8 + n for n in lengths[:i]) for i in range(len(lengths))]


_FOUR = [bytes([n]) * 400 for n in range(1, 5)]  # 4 frames of 400 bytes
_AT = _offsets([400] * 4)  # [0, 408, 816, 1224]


@pytest.mark.parametrize(
    "table, fragments, extended",
    [
        ([0, 408], _FOUR, None),  # 2 entries for 4 frames
        ([0, 408, 816, 5000], _FOUR, None),  # the last offset past the data
        ([0, 50, 816, 1224], _FOUR, None),  # an offset inside a fragment
        ([0, 816, 408, 1224], _FOUR, None),  # out of order
        ([], _FOUR, ([0, 408, 816, 99_999], [400] * 4)),  # an extended offset past the data
        ([], _FOUR, ([0, 0, 0, 0], [400] * 4)),  # every extended offset the first frame's
        ([], _FOUR, (_AT, [400, 400, 400, 444])),  # a length past its item
        ([], _FOUR[:3], (_AT[:3], [400] * 3)),  # 3 entries for 4 frames
    ],
    ids=[
        "short basic",
        "basic past end",
        "basic inside item",
        "basic out of order",
        "extended past end",
        "extended all 0",
        "extended length",
        "extended short",
    ],
)
def test_an_offset_table_that_does_not_match_the_items_is_refused_before_any_frame(
    tmp_path, table, fragments, extended
):
    """The tables are the sender's word: each frame they give is checked against the items (pydicom's
    get_frame alone served other frames' bytes, short ones or none). Refused when the frames are asked
    for, before any is read (the bulk route sends its status only after)."""
    extra = {}
    if extended is not None:
        extra = {
            "offsets": struct.pack(f"<{len(extended[0])}Q", *extended[0]),
            "lengths": struct.pack(f"<{len(extended[1])}Q", *extended[1]),
        }
    path = _object(tmp_path, RLELossless, _items(table, fragments), frames=4, **extra)
    with open(path, "rb") as stream, pytest.raises(CorruptObject):
        stored_frames(stream, [1, 2, 3, 4])


def test_a_basic_table_of_several_fragments_a_frame_and_an_empty_extended_table_are_served(tmp_path):
    halves = [half for frame in _FOUR for half in (frame[:100], frame[100:])]
    path = _object(tmp_path, RLELossless, _items(_offsets([100, 300] * 4)[::2], halves), frames=4)
    assert frame_bytes(path, [1, 4]) == [_FOUR[0], _FOUR[3]]
    empty = _object(tmp_path, RLELossless, _items([], _FOUR), frames=4, name="empty.dcm", offsets=b"", lengths=b"")
    assert frame_bytes(empty, [2, 3]) == [_FOUR[1], _FOUR[2]]


def test_every_frame_of_an_object_without_a_table_is_found_in_one_walk_of_its_items(tmp_path):
    """One fragment a frame, no table: the items' headers are walked once for all the frames asked, not once
    a frame (get_frame per frame made the bulk route of 5,000 frames take 80 s)."""
    path = _object(tmp_path, RLELossless, encapsulate(_all_frames(), has_bot=False))
    with _CountingFile(path, "r") as stream:
        reads = 0
        original = stream.read

        def counted(size: int = -1) -> bytes:
            nonlocal reads
            reads += 1
            return original(size)

        stream.read = counted  # type: ignore[method-assign]
        frames = list(stored_frames(stream, list(range(1, FRAMES + 1))))  # type: ignore[arg-type]
    assert frames == _all_frames()
    assert reads < 4 * FRAMES + 200, reads  # the header, a walk of 40 items, 40 frames: not 40 x 40


def test_a_deferred_value_is_read_from_the_open_file_not_a_new_version_at_its_path(tmp_path):
    """An Extended Offset Table over 1 KiB (over 128 frames) is deferred; pydicom read it by opening the
    path again, where an archive REPLACE may have put another version meanwhile."""
    many = 200
    first = [bytes([1]) * 300] * many
    data, offsets, lengths = encapsulate_extended(first)
    path = _object(tmp_path, RLELossless, data, frames=many, offsets=offsets, lengths=lengths)
    second = [bytes([2]) * 100] * many
    data, offsets, lengths = encapsulate_extended(second)
    other = _object(tmp_path, RLELossless, data, frames=many, name="other.dcm", offsets=offsets, lengths=lengths)
    with open(path, "rb") as stream:
        os.replace(other, path)  # the new version renamed over the path, the old one still open
        assert list(stored_frames(stream, [1, many])) == [first[0], first[-1]]


@pytest.mark.parametrize("last_undefined", [False, True], ids=["", "an undefined-length sequence last"])
@pytest.mark.parametrize(
    "meta_implicit", [True, False], ids=["meta implicit, body explicit", "meta explicit, body implicit"]
)
def test_a_data_set_encoded_otherwise_than_its_file_meta_says_is_read_as_pydicom_reads_it(
    tmp_path, meta_implicit, last_undefined
):
    """pydicom reads such a file by what it finds; the pixel data's header, read on from where pydicom
    stopped, must be read the same way (the file meta's word served wrong bytes or refused it)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import ImplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.6"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", 2
    if last_undefined:  # converted by pydicom as it reads it: its encoding is not told by it
        icon = Dataset()
        icon.Rows = 1
        ds.IconImageSequence = [icon]
        ds["IconImageSequence"].is_undefined_length = True
    ds.PixelData = bytes(range(64))
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if meta_implicit else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = not meta_implicit, True
    write_dataset(body, ds)
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(out.getvalue() + body.getvalue())
    assert frame_bytes(path, [1, 2]) == [bytes(range(32)), bytes(range(32, 64))]


def test_a_sequence_the_archive_fails_to_read_is_the_archives_error_not_a_corrupt_object():
    """A deferred sequence read through the store (an object replaced meanwhile, S3 not answering) raises
    the store's OSError: passed on (503 retry), not called a corrupt object (500)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from diana.access.dicomweb.wado import _sequence_items

    class Failing(Dataset):
        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            raise OSError("object store: the object was replaced while it was read")

    ds = Failing()
    ds._dict[Tag(0x00081140)] = RawDataElement(Tag(0x00081140), "SQ", 2000, None, 100, False, True)
    with pytest.raises(OSError, match="replaced while it was read"):
        _sequence_items(ds, 0x00081140)


def test_decoded_frames_are_located_with_the_same_checks(tmp_path):
    """The decoded path trusted pydicom's reading of the tables (a swapped Basic Offset Table decoded frame 3's
    pixels as frame 2's): it locates frames as the as-stored path does, and refuses the same tables."""
    from diana.access.dicomweb.transcoded import decoded_frames

    path = _object(tmp_path, RLELossless, _items([0, 816, 408, 1224], _FOUR), frames=4)
    with pytest.raises(CorruptObject, match="Basic Offset Table"):
        decoded_frames(path, [2])


def test_an_extended_table_of_odd_frame_lengths_and_one_frame_of_several_basic_entries_are_served(tmp_path):
    """An Extended Offset Table may give a frame's own odd length, its item padded to even; a single frame
    with a Basic Offset Table entry a fragment is every fragment (not refused)."""
    odd = [bytes([n]) * 399 for n in range(1, 5)]
    padded = [frame + b"\0" for frame in odd]
    extended = {"offsets": struct.pack("<4Q", *_offsets([400] * 4)), "lengths": struct.pack("<4Q", *[399] * 4)}
    path = _object(tmp_path, RLELossless, _items([], padded), frames=4, **extended)
    assert frame_bytes(path, [1, 4]) == [odd[0], odd[3]]
    single = _object(tmp_path, RLELossless, _items(_offsets([400] * 4), _FOUR), frames=1, name="single.dcm")
    assert frame_bytes(single, [1]) == [b"".join(_FOUR)]


def test_bit_packed_frames_that_do_not_begin_on_a_byte_are_served_each_as_its_own(tmp_path):
    """BitsAllocated 1, 3x5 pixels a frame: the frames follow each other bit by bit. Each is served packed
    from its own first pixel (as stored they were cut at bytes: frame 2 began with frame 1's last bits) and
    decoded to pydicom's own pixels (the decoded path refused them)."""
    import numpy as np
    from pydicom.pixels import pack_bits

    from diana.access.dicomweb.transcoded import decoded_frames

    pixels = np.array(
        [
            [1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0],
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 1],
            [1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1],
        ],
        np.uint8,
    )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4.7"
    ds.Rows, ds.Columns = 3, 5
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", 3
    ds.PixelData = pack_bits(pixels.ravel())
    ds["PixelData"].VR = "OB"
    path = tmp_path / "bits.dcm"
    ds.save_as(path, enforce_file_format=True)
    own = [bytes(pack_bits(frame)) for frame in pixels]
    assert frame_bytes(path, [1, 2, 3]) == own
    whole = pydicom.dcmread(path).pixel_array
    assert decoded_frames(path, [2, 3]) == [whole[1].tobytes(), whole[2].tobytes()]
    # Stored big endian as OW: pydicom swaps 8-bit data by words, never bit-packed data.
    from pydicom.uid import ExplicitVRBigEndian

    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds["PixelData"].VR = "OW"
    big = tmp_path / "bits-big-endian.dcm"
    ds.save_as(big, enforce_file_format=True, little_endian=False, implicit_vr=False)
    whole = pydicom.dcmread(big).pixel_array
    assert decoded_frames(big, [2, 3]) == [whole[1].tobytes(), whole[2].tobytes()]
