"""Unit: the WADO-RS Explicit VR Little Endian body over every one of pydicom's test files (access/dicomweb/transcoded.py).

One odd object must never cut a multipart body short: each is either sent, in Explicit VR Little
Endian, or counted as not decodable. (A JPEG file whose data set pydicom reads as implicit VR once
made the writer raise mid-body.)
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pydicom.filereader import read_file_meta_info

from diana.access.dicomweb.transcoded import _Counts, _object_parts
from diana.storage.filesystem import FilesystemStore


def test_every_pydicom_test_file_is_sent_explicit_little_endian_or_counted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = []
        for name in get_testdata_files("*.dcm"):
            try:
                read_file_meta_info(name)
            except Exception:
                continue  # no file meta: not something the receiver archives
            files.append(Path(name))
        counts = _Counts()
        sent = 0
        for path in files:
            part = b"".join(_object_parts(FilesystemStore(path.parent), path.name, b"<head>", counts))
            if not part:
                continue
            assert part.startswith(b"<head>") and part.endswith(b"\r\n")
            ds = pydicom.dcmread(BytesIO(part[len(b"<head>") : -2]))
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", path.name
            sent += 1
    assert len(files) > 60
    assert sent == counts.sent and counts.sent + counts.undecodable == len(files)
    assert counts.undecodable <= 5  # JPEG Extended 12-bit, damaged JPEG 2000 files


def test_frames_of_a_compressed_object_without_pixel_data_are_not_found_as_on_the_as_stored_path(tmp_path: Path):
    """Both frame paths answer 404 (LookupError) for an object without pixel data, not 406 on one of them."""
    import pytest
    from pydicom.data import get_testdata_file

    from diana.access.dicomweb.transcoded import decoded_frames
    from diana.access.dicomweb.wado import frame_bytes

    source = get_testdata_file("MR_small_RLE.dcm")
    assert source is not None
    ds = pydicom.dcmread(source)
    del ds.PixelData
    path = tmp_path / "no-pixels.dcm"
    ds.save_as(path)
    for read in (frame_bytes, decoded_frames):
        with pytest.raises(LookupError, match="no pixel data"):
            read(path, [1])
    assert len(decoded_frames(Path(source), [1])[0]) == 64 * 64 * 2  # with pixel data: one native frame


def test_frames_of_a_damaged_object_are_refused_with_the_reason_never_served_short(tmp_path: Path):
    """A native object whose pixel data is shorter than its frames (a truncated file), or whose header
    cannot say how long a frame is: CorruptObject naming what is wrong (the app's 500), on both frame
    paths. Before, the as-stored path served the short bytes as the frame."""
    import pytest
    from pydicom.data import get_testdata_file

    from diana.access.dicomweb.transcoded import decoded_frames
    from diana.access.dicomweb.wado import CorruptObject, frame_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truncated = get_testdata_file("MR_truncated.dcm")  # pydicom's own: 8,130 of 8,192 bytes
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    no_rows = tmp_path / "no-rows.dcm"
    del ds.Rows
    ds.save_as(no_rows)
    for read in (frame_bytes, decoded_frames):
        with pytest.raises(CorruptObject, match="holds 8130 bytes, its 1 frame.s. need 8192"):
            read(Path(truncated), [1])
        with pytest.raises(CorruptObject, match="has no 'Rows'"):
            read(no_rows, [1])
    # Uncompressed YBR_FULL_422 holds two samples a pixel, not three: whole, and served.
    ybr = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    assert len(frame_bytes(Path(ybr), [1])[0]) == 100 * 100 * 2


def test_every_frame_of_every_decodable_pydicom_test_file_is_decoded_as_pydicom_decodes_it():
    """Decoded frames are located as the as-stored path locates them and decoded one by one, each as the one
    frame of the header's data set: the same pixels as pydicom's own pixel_array of the whole object."""
    from diana.access.dicomweb.transcoded import decoded_frames

    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files("*.dcm"):
            try:
                ds = pydicom.dcmread(name)
                if "PixelData" not in ds or "TransferSyntaxUID" not in ds.file_meta:
                    continue
                whole = ds.pixel_array
            except Exception:
                continue  # not decodable here at all (pydicom's own damaged and unsupported files)
            count = int(ds.get("NumberOfFrames", 1) or 1)
            frames = whole if count > 1 else whole[None]
            expected = [frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes() for frame in frames]
            assert decoded_frames(Path(name), list(range(1, count + 1))) == expected, Path(name).name
            compared += 1
    assert compared > 50
