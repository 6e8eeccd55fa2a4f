"""`diana import` without a broker: bad input of every kind becomes a reason that names no file while
the run goes on, folders are walked through symlinks and past unreadable ones, a DICOMDIR's missing
files are counted and its names found in any case, and zip members are read as streams (only Part-10
ones extracted, each archive opened once per worker)."""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from diana.cli import main
from diana.producers import bulk_import
from diana.producers.bulk_import import Importer, ImportSummary, find_sources
from diana.producers.header import read_header_file
from tests.support.dicomgen import make_instance

# A folder named after the patient, as exports do: it may reach the --report file, nothing else.
PATIENT = "DOE_JOHN_19600101"


class _RecordingIngest:
    """What the importer uses of Ingest: the header is read as the real one does, the UID recorded."""

    def __init__(self, landing: Path, max_inflated_bytes: int = 1 << 30):
        self.landing = SimpleNamespace(incoming=landing / ".incoming")
        self.landing.incoming.mkdir(parents=True, exist_ok=True)
        self.max_inflated_bytes = max_inflated_bytes
        self.accepted: list[str] = []

    def accept_file(self, path: Path, source: str, *, owned: bool) -> None:
        self.accepted.append(read_header_file(path).sop_instance_uid)


def _instance(path: Path, rows: int = 8) -> Path:
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="IMPORT9", study_date="20240101", rows=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _import(tmp_path: Path, *paths: Path, workers: int = 2, **ingest: int) -> tuple[ImportSummary, _RecordingIngest]:
    recording = _RecordingIngest(tmp_path / "landing", **ingest)
    return Importer(recording, workers=workers).run(list(find_sources(list(paths)))), recording  # type: ignore[arg-type]


def _mark_member(archive: Path, name: str, *, flag_bits: int = 0, method: int | None = None) -> None:
    """Set flag bits, or the compression method, of one member in its local header and directory entry."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        local = zf.getinfo(name).header_offset
    entry = next(
        i
        for i in range(len(data))
        if data[i : i + 4] == b"PK\x01\x02" and data[i + 46 : i + 46 + len(name)] == name.encode()
    )
    for flags_at in (local + 6, entry + 8):
        data[flags_at] |= flag_bits
    if method is not None:
        data[local + 8 : local + 10] = data[entry + 10 : entry + 12] = struct.pack("<H", method)
    archive.write_bytes(bytes(data))


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    return out + err


# ------------------------------------------------------------------------- 1. bad input does not stop the run


def test_zip_members_that_cannot_be_read_are_rejected_and_the_rest_imported(tmp_path, capsys):
    one = _instance(tmp_path / "one.dcm").read_bytes()
    archive = tmp_path / "src" / "export.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for n in range(1, 6):
            compression = zipfile.ZIP_DEFLATED if n == 4 else zipfile.ZIP_STORED
            zf.writestr(zipfile.ZipInfo(f"{PATIENT}/IMG{n}"), one, compress_type=compression)
    _mark_member(archive, f"{PATIENT}/IMG1", flag_bits=0x1)  # encrypted
    _mark_member(archive, f"{PATIENT}/IMG2", method=9)  # Deflate64, as Windows Explorer writes
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        img3, img4 = zf.getinfo(f"{PATIENT}/IMG3"), zf.getinfo(f"{PATIENT}/IMG4")
    data[img3.header_offset + 30 + len(img3.filename) + len(one) - 1] ^= 0xFF  # a bad CRC, found at the end
    deflated = img4.header_offset + 30 + len(img4.filename)
    data[deflated : deflated + 16] = b"\xff" * 16  # an invalid deflate block
    archive.write_bytes(bytes(data))
    _instance(tmp_path / "src" / "zz_after.dcm")

    summary, ingest = _import(tmp_path, tmp_path / "src")

    assert summary.imported == 2 and len(ingest.accepted) == 2  # IMG5 and the file after the zip
    assert dict(summary.rejected) == {
        "zip member encrypted": 1,
        "zip member: unsupported compression method 9 (unzip it with another tool, import the folder)": 1,
        "zip member corrupt": 2,
    }
    assert sorted(label for _, _, label in summary.not_imported) == [f"{archive}:{PATIENT}/IMG{n}" for n in range(1, 5)]
    assert PATIENT not in _said(capsys)
    assert list(ingest.landing.incoming.iterdir()) == []


def test_a_file_cut_in_its_pixel_data_fails_as_truncated_and_the_rest_imported(tmp_path):
    """A half-copied CD file: its header whole, its pixel data cut. Before, pydicom stopped before the
    pixel data and the file was imported as it was."""
    whole = _instance(tmp_path / "src" / PATIENT / "IMG1", rows=64).read_bytes()
    (tmp_path / "src" / PATIENT / "IMG2").write_bytes(whole[:-700])
    _instance(tmp_path / "src" / PATIENT / "IMG3")

    summary, ingest = _import(tmp_path, tmp_path / "src")

    assert summary.imported == 2 and len(ingest.accepted) == 2
    assert dict(summary.failed) == {"truncated: pixel data claims 8192 bytes, only 7492 follow: truncated": 1}
    assert [label for _, _, label in summary.not_imported] == [str(tmp_path / "src" / PATIENT / "IMG2")]


def test_an_archive_or_a_dicomdir_that_cannot_be_opened_is_rejected_and_the_rest_imported(tmp_path, capsys):
    broken_zip = tmp_path / f"{PATIENT}.zip"  # an end record pointing at no central directory
    broken_zip.write_bytes(b"PK\x03\x04" + b"junk" * 25 + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0))
    assert zipfile.is_zipfile(broken_zip)
    dicomdir = tmp_path / PATIENT / "DICOMDIR"
    dicomdir.parent.mkdir()
    dicomdir.write_bytes(b"\0" * 200)

    summary, _ = _import(tmp_path, broken_zip, dicomdir, _instance(tmp_path / "good.dcm"))

    assert summary.imported == 1
    assert dict(summary.rejected) == {"zip unreadable (BadZipFile)": 1, "DICOMDIR unreadable (InvalidDicomError)": 1}
    assert sorted(label for _, _, label in summary.not_imported) == sorted([str(broken_zip), str(dicomdir)])
    assert PATIENT not in _said(capsys)


def test_a_dicom_file_holding_a_zip_end_record_is_imported_and_a_zip_is_known_by_its_first_bytes(tmp_path):
    """zipfile.is_zipfile looks for an end record (PK\\x05\\x06) in a file's last 64 KiB: 16-bit pixels
    19280, 1541 are those bytes. Such a file was opened as a zip of no members (imported as nothing,
    counted nowhere) or rejected as a zip unreadable; a file is a zip by its first bytes now."""
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="IMPORT9", study_date="20240101", rows=64)
    pixels = bytearray(ds.PixelData)
    pixels[1280:1284] = b"PK\x05\x06"  # zeros after it: an end record of an empty zip
    ds.PixelData = bytes(pixels)
    (tmp_path / "src").mkdir()
    ds.save_as(tmp_path / "src" / "IMG1", enforce_file_format=True)
    pixels[1284:1300] = b"\x00\x00\x00\x00\x01\x00\x01\x00\x2e\x00\x00\x00\x10\x00\x00\x00"  # one entry, nowhere
    ds.PixelData = bytes(pixels)
    ds.save_as(tmp_path / "src" / "IMG2", enforce_file_format=True)
    empty = tmp_path / "src" / "empty.zip"
    zipfile.ZipFile(empty, "w").close()

    summary, ingest = _import(tmp_path, tmp_path / "src")

    assert (summary.imported, len(ingest.accepted), summary.rejected) == (2, 2, {})
    assert list(find_sources([empty])) == []  # a zip of no members still
    prefixed = tmp_path / "prefixed.zip"  # data before its first header: a zip by its name and end record
    prefixed.write_bytes(b"MZ" + b"\0" * 200 + _instance_zip(tmp_path).read_bytes())
    assert [source.member is not None for source in find_sources([prefixed])] == [True]
    assert _import(tmp_path, prefixed)[0].imported == 1


def _instance_zip(tmp_path: Path) -> Path:
    archive = tmp_path / "one.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(_instance(tmp_path / "one.dcm"), "IMG1")
    return archive


def test_an_unexpected_error_fails_that_file_only(tmp_path, capsys):
    for n in range(3):
        _instance(tmp_path / "src" / PATIENT / f"{n}.dcm")
    ingest = _RecordingIngest(tmp_path / "landing")
    accept = ingest.accept_file

    def unexpected_for_the_first(path: Path, source: str, *, owned: bool) -> None:
        if path.name == "0.dcm":
            raise KeyError(f"no such thing in {path}")
        accept(path, source, owned=owned)

    ingest.accept_file = unexpected_for_the_first  # type: ignore[method-assign]
    summary = Importer(ingest, workers=2).run(list(find_sources([tmp_path / "src"])))  # type: ignore[arg-type]

    assert summary.imported == 2 and dict(summary.failed) == {"unexpected error (KeyError)": 1}
    assert PATIENT not in _said(capsys)


# -------------------------------------------------------------- 2. folders, symlinks and DICOMDIRs


def test_symlinked_folders_inside_are_followed_once_and_one_leading_out_is_rejected(tmp_path):
    """Followed out of the tree, one link to / or a home folder imported the whole disk."""
    source, outside = tmp_path / "src", tmp_path / "outside"
    _instance(source / "p1" / "a.dcm")
    _instance(source / "series" / "b.dcm")
    _instance(outside / "c.dcm")
    (source / "linked").symlink_to(source / "series")
    (source / "linked_again").symlink_to(source / "series")
    (source / "p1" / "loop").symlink_to(source)
    (source / "elsewhere").symlink_to(outside)

    summary, ingest = _import(tmp_path, source)

    assert summary.imported == 2 and len(set(ingest.accepted)) == 2
    assert summary.not_imported == [
        ("rejected", "symlinked folder outside the imported one (import it by its own path)", str(source / "elsewhere"))
    ]


def test_a_pipe_is_rejected_unread_and_a_zip_inside_a_zip_said(tmp_path):
    """A pipe hung the listing (the zip check opened it); a zip of zips imported nothing, exit status 0."""
    source = tmp_path / "src"
    _instance(source / "a.dcm")
    os.mkfifo(source / "pipe")
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        zf.write(_instance(tmp_path / "b.dcm"), "b.dcm")
    with zipfile.ZipFile(source / "outer.zip", "w") as zf:
        zf.write(inner, "inner.zip")

    summary, _ = _import(tmp_path, source)

    assert summary.imported == 1
    assert sorted((o, r) for o, r, _ in summary.not_imported) == [
        ("rejected", "not a regular file (a pipe, socket or device)"),
        ("rejected", "zip inside a zip: unzip the outer one and import its folder"),
    ]


def _deny_patient_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user gets for a folder of mode 000 (these tests may run as root, who reads it all)."""
    scandir = os.scandir

    def denied(path):
        if str(path).endswith(PATIENT):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)


def test_a_folder_that_cannot_be_read_is_failed(tmp_path, monkeypatch, capsys):
    source = tmp_path / "src"
    _instance(source / "p1" / "a.dcm")
    _instance(source / PATIENT / "b.dcm")
    _deny_patient_folder(monkeypatch)
    summary, _ = _import(tmp_path, source)

    assert summary.imported == 1
    assert summary.not_imported == [("failed", "folder unreadable: Permission denied", str(source / PATIENT))]
    assert PATIENT not in _said(capsys)


def _fileset(tmp_path: Path, count: int) -> Path:
    fileset = FileSet()
    for n in range(count):
        fileset.add(_instance(tmp_path / "fsrc" / f"{n}.dcm"))
    fileset.write(tmp_path / "cd")
    return tmp_path / "cd" / "DICOMDIR"


def test_a_file_the_dicomdir_names_but_is_missing_is_failed_without_its_path_said(tmp_path, capsys, caplog, recwarn):
    dicomdir = _fileset(tmp_path, 2)
    instances = sorted(p for p in dicomdir.parent.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    instances[0].unlink()

    summary, ingest = _import(tmp_path, dicomdir)

    assert summary.imported == 1 and len(ingest.accepted) == 1
    assert summary.not_imported == [
        ("failed", "file named by the DICOMDIR missing (renamed? import its folder instead)", str(instances[0]))
    ]
    said = _said(capsys) + caplog.text + " ".join(str(w.message) for w in recwarn)
    assert str(instances[0].relative_to(dicomdir.parent)) not in said


def test_the_dicomdir_in_an_imported_folder_is_passed_over_quietly(tmp_path):
    dicomdir = _fileset(tmp_path, 2)

    summary, _ = _import(tmp_path, dicomdir.parent)

    assert summary.imported == 2 and summary.skipped_non_dicom == 0 and summary.not_imported == []


# A CD mounted on Linux without Rock Ridge (map=normal) shows IMAGES/IM0001 as images/im0001, its
# DICOMDIR as dicomdir; copies made on Windows or by some burners vary the case too.
MISSING = "file named by the DICOMDIR missing (renamed? import its folder instead)"
AMBIGUOUS = (
    "file named by the DICOMDIR ambiguous: several names differ from it only in case or ISO 9660 version "
    "(import its folder instead)"
)
OUTSIDE = "DICOMDIR record names a file outside its folder"


def _series_fileset(tmp_path: Path, count: int) -> tuple[Path, list[str]]:
    """A file-set of one series, DICOMDIR and PT000000/ST000000/SE000000/IM00000n, and its SOP Instance UIDs."""
    study, series, uids = generate_uid(), generate_uid(), []
    fileset = FileSet()
    for n in range(count):
        uids.append(generate_uid())
        ds = make_instance(study, series, n + 1, patient_id="IMPORT9", study_date="20240101", rows=8, sop_uid=uids[-1])
        ds.save_as(tmp_path / f"src{n}.dcm", enforce_file_format=True)
        fileset.add(tmp_path / f"src{n}.dcm")
    fileset.write(tmp_path / "cd")
    return tmp_path / "cd" / "DICOMDIR", uids


def _rename_tree(root: Path, name: Callable[[str], str]) -> None:
    """Every file and folder under ``root`` renamed, deepest first, as a mount or a copy shows them."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rename(path.with_name(name(path.name)))


@pytest.fixture
def listed(monkeypatch) -> list[Path]:
    """The folders the importer lists (os.walk, for a folder's import, uses os.scandir instead)."""
    folders: list[Path] = []
    listdir = os.listdir

    def counted(path):
        folders.append(Path(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counted)
    return folders


def test_a_dicomdir_whose_files_are_there_as_named_lists_no_folder(tmp_path, listed):
    dicomdir, uids = _series_fileset(tmp_path, 4)

    summary, ingest = _import(tmp_path, dicomdir)

    assert summary.imported == 4 and sorted(ingest.accepted) == sorted(uids) and summary.not_imported == []
    assert listed == []


def test_a_cd_mounted_lower_cased_imports_every_file_listing_each_folder_once(tmp_path, listed):
    dicomdir, uids = _series_fileset(tmp_path, 6)
    cd = dicomdir.parent
    _rename_tree(cd, str.lower)
    assert sorted(p.name for p in cd.iterdir()) == ["dicomdir", "pt000000"]
    listed.clear()  # Path.iterdir lists too

    summary, ingest = _import(tmp_path, cd / "dicomdir")

    assert summary.imported == 6 and sorted(ingest.accepted) == sorted(uids) and summary.not_imported == []
    series = cd / "pt000000" / "st000000" / "se000000"
    assert sorted(listed) == [cd, cd / "pt000000", series.parent, series]  # once each, for 6 files


def test_a_lower_cased_cd_imported_by_its_folder_imports_each_file_once(tmp_path):
    dicomdir, uids = _series_fileset(tmp_path, 3)
    _rename_tree(dicomdir.parent, str.lower)

    summary, ingest = _import(tmp_path, dicomdir.parent)

    assert (summary.imported, summary.skipped_non_dicom, summary.not_imported) == (3, 0, [])
    assert sorted(ingest.accepted) == sorted(uids)


def test_a_copy_in_mixed_case_imports_every_file(tmp_path):
    dicomdir, uids = _series_fileset(tmp_path, 4)
    cd = dicomdir.parent
    # Folders in three cases, IM000000 and IM000002 lower-cased, IM000001 title-cased, IM000003 as named.
    renamed = {"DICOMDIR": "DicomDir", "PT000000": "pt000000", "ST000000": "St000000", "IM000001": "Im000001"}
    _rename_tree(cd, lambda name: renamed.get(name, name.lower() if name in ("IM000000", "IM000002") else name))
    assert sorted(p.name for p in (cd / "pt000000" / "St000000" / "SE000000").iterdir()) == [
        "IM000003",
        "Im000001",
        "im000000",
        "im000002",
    ]

    for given in (cd / "DicomDir", cd):
        summary, ingest = _import(tmp_path, given)

        assert summary.imported == 4 and sorted(ingest.accepted) == sorted(uids) and summary.not_imported == []


def test_a_name_in_several_cases_fails_that_record_only_and_the_name_as_written_is_taken(tmp_path):
    dicomdir, uids = _series_fileset(tmp_path, 3)
    cd = dicomdir.parent
    _rename_tree(cd, str.lower)
    series = cd / "pt000000" / "st000000" / "se000000"
    (series / "Im000000").write_bytes((series / "im000000").read_bytes())  # which one is meant: not guessed
    other = read_header_file(_instance(series / "IM000001")).sop_instance_uid  # as written: taken

    summary, ingest = _import(tmp_path, cd / "dicomdir")

    assert summary.imported == 2 and sorted(ingest.accepted) == sorted([other, uids[2]])
    assert summary.not_imported == [("failed", AMBIGUOUS, str(cd / "PT000000" / "ST000000" / "SE000000" / "IM000000"))]


def test_a_name_found_in_other_case_outside_the_folder_is_still_rejected(tmp_path, recwarn):
    """Through a symlinked folder named in other case, or a record's `..`: the resolved path is checked."""
    dicomdir, _ = _series_fileset(tmp_path, 2)
    cd = dicomdir.parent
    _rename_tree(cd, str.lower)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cd / "pt000000").rename(elsewhere / "pt000000")
    (cd / "pt000000").symlink_to(elsewhere / "pt000000")
    _instance(tmp_path / "outside" / "im1")
    ds = pydicom.dcmread(cd / "dicomdir")
    records = [record for record in ds.DirectoryRecordSequence if record.get("ReferencedFileID")]
    records[1].ReferencedFileID = ["..", "OUTSIDE", "IM1"]  # a CS value pydicom warns of
    ds.save_as(cd / "dicomdir")
    assert (cd / "pt000000" / "st000000" / "se000000" / "im000000").is_file() and (
        tmp_path / "outside" / "im1"
    ).is_file()

    summary, ingest = _import(tmp_path, cd / "dicomdir")

    assert summary.imported == 0 and ingest.accepted == []
    assert sorted(summary.not_imported) == [  # in the order they complete
        ("rejected", OUTSIDE, str(cd / ".." / "OUTSIDE" / "IM1")),
        ("rejected", OUTSIDE, str(cd / "pt000000" / "st000000" / "se000000" / "im000000")),
    ]


def test_a_file_missing_in_every_case_is_still_failed_as_missing(tmp_path):
    dicomdir, uids = _series_fileset(tmp_path, 2)
    cd = dicomdir.parent
    _rename_tree(cd, str.lower)
    (cd / "pt000000" / "st000000" / "se000000" / "im000001").unlink()

    summary, ingest = _import(tmp_path, cd / "dicomdir")

    assert summary.imported == 1 and ingest.accepted == [uids[0]]
    assert summary.not_imported == [("failed", MISSING, str(cd / "PT000000" / "ST000000" / "SE000000" / "IM000001"))]


# An ISO 9660 disc mounted with map=off, or its files copied raw, shows each file's version: IM000000.;1
# (a name without extension keeps its dot), IM000000;1, DICOMDIR.;1; folders have none.


def _rename_files(root: Path, name: Callable[[str], str]) -> None:
    for path in [p for p in root.rglob("*") if p.is_file()]:
        path.rename(path.with_name(name(path.name)))


@pytest.mark.parametrize(
    "shown",
    [lambda n: f"{n}.;1", lambda n: f"{n};1", lambda n: f"{n.lower()}.;1", lambda n: f"{n.lower()};2"],
    ids=["map=off", "raw copy", "lower-cased map=off", "lower-cased other version"],
)
def test_a_file_set_with_iso_9660_versions_imports_every_file(tmp_path, shown):
    dicomdir, uids = _series_fileset(tmp_path, 4)
    cd = dicomdir.parent
    _rename_files(cd, shown)
    index = shown("DICOMDIR")
    assert (cd / index).is_file() and len(list((cd / "PT000000" / "ST000000" / "SE000000").iterdir())) == 4

    for given in (cd / index, cd):  # named: read as the index; in a folder's walk: passed over
        summary, ingest = _import(tmp_path, given)

        assert (summary.imported, summary.skipped_non_dicom, summary.not_imported) == (4, 0, [])
        assert sorted(ingest.accepted) == sorted(uids)


def test_a_name_with_and_without_its_version_is_ambiguous_unless_there_as_written(tmp_path):
    dicomdir, uids = _series_fileset(tmp_path, 2)
    cd = dicomdir.parent
    _rename_files(cd, lambda n: f"{n};1")
    series = cd / "PT000000" / "ST000000" / "SE000000"
    (series / "IM000000.;1").write_bytes((series / "IM000000;1").read_bytes())  # which one: not guessed

    summary, ingest = _import(tmp_path, cd / "DICOMDIR;1")

    assert summary.imported == 1 and ingest.accepted == [uids[1]]
    assert summary.not_imported == [("failed", AMBIGUOUS, str(series / "IM000000"))]
    (series / "IM000000").write_bytes((series / "IM000000;1").read_bytes())  # as written: taken
    summary, ingest = _import(tmp_path, cd / "DICOMDIR;1")
    assert summary.imported == 2 and summary.not_imported == []


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "diana.toml"
    path.write_text(f'[storage]\nlanding_dir = "{tmp_path / "landing"}"\n[kafka]\nbootstrap = "127.0.0.1:1"\n')
    return path


@pytest.fixture
def no_broker(monkeypatch):
    """`diana import` with its publisher and ingest replaced: the command's own handling is what is tested."""
    import diana.producers.ingest
    import diana.producers.publisher

    monkeypatch.setattr(
        diana.producers.publisher, "EventPublisher", lambda *a, **k: SimpleNamespace(close=lambda: None)
    )
    monkeypatch.setattr(
        diana.producers.ingest,
        "Ingest",
        lambda landing, publisher, codec, max_inflated_bytes: _RecordingIngest(landing.root, max_inflated_bytes),
    )


def test_the_exit_status_is_1_when_anything_failed_0_when_only_rejected(
    tmp_path, config, no_broker, monkeypatch, capsys
):
    source = tmp_path / "src"
    _instance(source / "a.dcm")
    (source / PATIENT).mkdir()
    (source / "notes.txt").write_text("not DICOM")
    archive = source / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(source / "a.dcm", f"{PATIENT}/IMG1")
    _mark_member(archive, f"{PATIENT}/IMG1", flag_bits=0x1)
    report = tmp_path / "not-imported.csv"
    common = ["--config", str(config), "import", "--no-progress", "--report", str(report), str(source)]

    assert main(common) == 0  # rejected only: running again cannot help
    said = _said(capsys)
    assert "imported:            1" in said and "zip member encrypted" in said and PATIENT not in said
    assert f"rejected,zip member encrypted,{archive}:{PATIENT}/IMG1" in report.read_text()
    assert f"skipped,not DICOM (no preamble and DICM),{source / 'notes.txt'}" in report.read_text()
    assert stat.S_IMODE(report.stat().st_mode) == 0o600

    _deny_patient_folder(monkeypatch)
    assert main(common) == 1
    said = _said(capsys)
    assert "folder unreadable: Permission denied" in said and "run the same command again" in said
    assert (
        PATIENT not in said and f"failed,folder unreadable: Permission denied,{source / PATIENT}" in report.read_text()
    )


def _bare(path: Path, **encoding: bool) -> bytes:
    """A data set without preamble and file meta, as old modalities and archives wrote them."""
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="IMPORT9", study_date="20240101", rows=8)
    del ds.file_meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False, **encoding)
    return path.read_bytes()


def test_files_not_imported_as_not_dicom_are_reported_and_a_bare_data_set_is_imported_with_a_file_meta(tmp_path):
    """Skipped files were counted only ("skipped (not DICOM)"), never listed: a bare data set, common in old
    archives, could not be found. Now each skipped file is listed with its reason, and a bare data set in
    Implicit VR Little Endian (the default transfer syntax, which its bytes determine) is imported with a
    file meta put before its bytes; one in another encoding is listed as such."""
    source = tmp_path / "src"
    implicit = _bare(source / PATIENT / "OLD1", implicit_vr=True, little_endian=True)
    _bare(source / PATIENT / "OLD2", implicit_vr=False, little_endian=True)
    (source / "notes.txt").write_text("not DICOM")
    (source / "group8.bin").write_bytes(b"\x08\x00" + b"no data set" * 50)  # looks like one for two bytes
    archive = source / "old.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("OLD3", _bare(tmp_path / "OLD3", implicit_vr=True, little_endian=True))
    landed: list[tuple[bytes, bool]] = []
    ingest = _RecordingIngest(tmp_path / "landing")
    record = ingest.accept_file

    def accept(path: Path, source: str, *, owned: bool) -> None:
        record(path, source, owned=owned)
        landed.append((path.read_bytes(), owned))

    ingest.accept_file = accept  # type: ignore[method-assign]

    summary = Importer(ingest, workers=2).run(find_sources([source]))  # type: ignore[arg-type]

    assert sorted(summary.not_imported) == [
        (
            "skipped",
            "no DICM preamble: a bare data set not in Implicit VR Little Endian (its transfer syntax is not "
            "known: write it as a Part-10 file with its syntax, then import that)",
            str(source / PATIENT / "OLD2"),
        ),
        ("skipped", "not DICOM (no preamble and DICM)", str(source / "group8.bin")),
        ("skipped", "not DICOM (no preamble and DICM)", str(source / "notes.txt")),
    ]
    assert (summary.imported, summary.wrapped, summary.skipped_non_dicom) == (2, 2, 3)
    wrapped = next(data for data, _ in landed if data.endswith(implicit))
    meta = pydicom.dcmread(io.BytesIO(wrapped)).file_meta
    assert wrapped[128:132] == b"DICM" and meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert all(owned for _, owned in landed)  # temporary files of ours: linked into place, not copied again
    assert any("bare data sets" in line for line in summary.lines()) and PATIENT not in "".join(summary.lines())
    again = Importer(ingest, workers=1).run(find_sources([source / PATIENT / "OLD1"]))  # type: ignore[arg-type]
    assert again.imported == 1 and landed[-1][0] == wrapped  # the same bytes: one object, however often imported
    assert list(ingest.landing.incoming.iterdir()) == []


def test_ctrl_c_keeps_the_report_of_what_was_seen_and_prints_the_summary(
    tmp_path, config, no_broker, monkeypatch, capsys
):
    """The report was emptied at the start and written at the end only: after Ctrl-C (or a crash) it was
    empty, and no summary was printed. Rows are written as they come now, and Ctrl-C finishes the files in
    flight, prints the summary and exits 130."""
    source = tmp_path / "src"
    _instance(source / "a.dcm")
    for n in range(3):
        (source / PATIENT / f"notes{n}.txt").parent.mkdir(parents=True, exist_ok=True)
        (source / PATIENT / f"notes{n}.txt").write_text("not DICOM")
    walk, one = bulk_import._folder_sources, bulk_import.Importer._one
    looked_at = threading.Semaphore(0)

    def interrupted_after_four(root, *args):
        yield from list(walk(root, *args))[:4]
        for _ in range(4):
            assert looked_at.acquire(timeout=10)
        raise KeyboardInterrupt  # Ctrl-C while the tree is walked, the files listed done

    def looking(self, archives, source):
        try:
            return one(self, archives, source)
        finally:
            looked_at.release()

    monkeypatch.setattr(bulk_import.Importer, "_one", looking)

    report = tmp_path / "not-imported.csv"
    monkeypatch.setattr(bulk_import, "_folder_sources", interrupted_after_four)
    try:
        status = main(["--config", str(config), "import", "--no-progress", "--report", str(report), str(source)])
    except KeyboardInterrupt:
        status = None

    rows = report.read_text().splitlines()
    assert sorted(rows[1:]) == [
        f"skipped,not DICOM (no preamble and DICM),{source / PATIENT / f'notes{n}.txt'}" for n in range(3)
    ]
    assert status == 130
    said = _said(capsys)
    assert "imported:            1" in said and "interrupted" in said and PATIENT not in said


def test_on_ctrl_c_the_files_in_flight_are_finished_and_counted_and_the_rest_not_looked_at(tmp_path):
    one = _instance(tmp_path / "a.dcm")
    gate, started = threading.Event(), threading.Semaphore(0)
    ingest = _RecordingIngest(tmp_path / "landing")
    ingest.accept_file = lambda *args, **kwargs: (started.release(), gate.wait(10))  # type: ignore[method-assign]

    def sources():
        for _ in range(6):
            yield bulk_import.Source(str(one), path=one)
        for _ in range(2):
            assert started.acquire(timeout=10)  # each worker holds a file, four wait
        threading.Timer(0.2, gate.set).start()
        raise KeyboardInterrupt

    try:
        summary = Importer(ingest, workers=2).run(sources())  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went through the run: no summary")

    assert summary.interrupted and summary.imported == 2 and summary.not_imported_count == 0


def test_the_report_has_each_row_as_it_comes_and_the_summary_keeps_none(tmp_path):
    source = tmp_path / "src"
    for n in range(3):
        (source / f"notes{n}.txt").parent.mkdir(parents=True, exist_ok=True)
        (source / f"notes{n}.txt").write_text("not DICOM")
    path = tmp_path / "report.csv"
    with bulk_import.Report(path) as report:
        summary = Importer(_RecordingIngest(tmp_path / "landing"), workers=2).run(  # type: ignore[arg-type]
            find_sources([source]), report=report.row
        )
        written = path.read_text().splitlines()  # before the file is closed

    assert written[0] == "outcome,reason,file" and len(written) == 4
    assert summary.skipped_non_dicom == 3 and summary.not_imported == []  # a list would grow with the run
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_import_stops_after_a_few_publish_failures_in_a_row(tmp_path, config, no_broker, monkeypatch, capsys):
    """With the broker down, every file waited [kafka] publish_timeout_s and failed: days for a million."""
    from diana.producers.publisher import PublishUncertain

    one = _instance(tmp_path / "a.dcm")
    tried: list[int] = []

    def down(*args, **kwargs):
        tried.append(1)
        raise PublishUncertain("no acknowledgement within 10.0s")

    def up_then_down_each_third(*args, **kwargs):
        tried.append(1)
        if len(tried) % 3 == 0:
            raise PublishUncertain("no acknowledgement within 10.0s")

    for accept, workers in ((down, 2), (up_then_down_each_third, 1)):
        tried.clear()
        ingest = _RecordingIngest(tmp_path / "landing")
        ingest.accept_file = accept  # type: ignore[method-assign]
        sources = (bulk_import.Source(str(one), path=one) for _ in range(1000))
        summary = Importer(ingest, workers=workers).run(sources)  # type: ignore[arg-type]
        if accept is down:
            assert len(tried) < 20 and sum(summary.failed.values()) == len(tried)  # a few, each counted
            assert summary.broker_down
        else:  # a failure now and then, acknowledgements between: the run goes on
            assert len(tried) == 1000 and not summary.broker_down

    monkeypatch.setattr(_RecordingIngest, "accept_file", down)
    source = tmp_path / "src"
    for n in range(50):
        _instance(source / f"IMG{n}")
    assert main(["--config", str(config), "import", "--no-progress", str(source)]) == 1
    said = _said(capsys)
    assert "stopped: the broker acknowledged none of the last events" in said and "run the same command again" in said


# --------------------------------------------------------------------- 3. memory and zip members read as streams


def test_files_are_imported_while_listed_with_a_bounded_number_in_flight(tmp_path):
    """The CLI listed every source before importing any, and pool.map queued a future for each: 2 GiB for a
    million files, nothing imported until the whole tree was walked."""
    one = _instance(tmp_path / "a.dcm")
    listed = 0

    def sources():
        nonlocal listed
        for _ in range(5000):
            listed += 1
            yield bulk_import.Source(str(one), path=one)

    gate, started = threading.Event(), threading.Semaphore(0)
    ingest = _RecordingIngest(tmp_path / "landing")
    ingest.accept_file = lambda *args, **kwargs: (started.release(), gate.wait(10))  # type: ignore[method-assign]
    importer = Importer(ingest, workers=3)  # type: ignore[arg-type]
    outcome: list[ImportSummary] = []
    run = threading.Thread(target=lambda: outcome.append(importer.run(sources())))
    run.start()
    for _ in range(3):
        assert started.acquire(timeout=10)  # each worker holds a file
    time.sleep(0.2)  # the listing goes on as far as it may
    in_flight = listed
    gate.set()
    run.join(30)

    assert in_flight <= 3 * 6, f"{in_flight} files listed for 3 workers"  # a few per worker
    assert outcome[0].imported == 5000


@pytest.fixture
def extractions(monkeypatch) -> list[str]:
    """The temporary files the importer makes (one per member extracted)."""
    made: list[str] = []

    class Counted(bulk_import.ScratchFile):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(str(self.path))

    monkeypatch.setattr(bulk_import, "ScratchFile", Counted)
    return made


def test_a_non_dicom_member_is_never_extracted(tmp_path, extractions):
    archive = tmp_path / "cd_export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("VIEWER/setup.exe", b"\0" * (16 << 20))
        zf.write(_instance(tmp_path / "a.dcm"), "DICOM/IM1")

    summary, ingest = _import(tmp_path, archive)

    assert summary.imported == 1 and summary.skipped_non_dicom == 1 and len(extractions) == 1


def test_a_member_past_the_inflate_cap_is_rejected_unextracted(tmp_path, extractions):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(_instance(tmp_path / "big.dcm", rows=64), "DICOM/IM1")  # 8 KiB of pixels

    summary, _ = _import(tmp_path, archive, max_inflated_bytes=4096)

    assert dict(summary.rejected) == {"zip member larger than [receiver] max_inflated_bytes (4096)": 1}
    assert extractions == []


def test_each_archive_is_opened_once_per_worker_and_closed_after(tmp_path, monkeypatch):
    one = _instance(tmp_path / "a.dcm").read_bytes()
    archives = [tmp_path / "first.zip", tmp_path / "second.zip"]
    for archive in archives:
        with zipfile.ZipFile(archive, "w") as zf:
            for n in range(40):
                zf.writestr(f"DICOM/IM{n}", one)
    opened: list[zipfile.ZipFile] = []

    class CountedZipFile(zipfile.ZipFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(zipfile, "ZipFile", CountedZipFile)
    summary, _ = _import(tmp_path, *archives, workers=3)

    assert summary.imported == 80
    assert len(opened) <= 2 * (1 + 3)  # listing, then once per worker
    assert all(zf.fp is None for zf in opened)  # closed


def test_a_zip_shaped_member_that_is_not_a_zip_file_is_not_dicom_and_a_dicom_preamble_may_look_like_one(tmp_path):
    """Only a .zip member is "a zip inside a zip": a viewer's .jar is a zip too, and not DICOM; PS3.10 leaves
    the preamble to applications, so a Part-10 file may begin with the zip signature."""
    dicom = _instance(tmp_path / "p.dcm")
    data = bytearray(dicom.read_bytes())
    data[:4] = b"PK\x03\x04"
    dicom.write_bytes(bytes(data))
    viewer = tmp_path / "viewer.jar"
    with zipfile.ZipFile(viewer, "w") as zf:
        zf.writestr("Main.class", b"\xca\xfe\xba\xbe")
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(dicom, "IMG0001")
        zf.write(viewer, "viewer/viewer.jar")

    summary, _ = _import(tmp_path, archive)

    assert (summary.imported, summary.skipped_non_dicom) == (1, 1)
    assert summary.not_imported == [("skipped", "not DICOM (no preamble and DICM)", f"{archive}:viewer/viewer.jar")]


def test_a_path_given_twice_or_inside_another_is_imported_once_and_said_once(tmp_path):
    """``diana import /a /a/b /a``: /a/b's files were imported and counted twice, /a's twice again."""
    source = tmp_path / "src"
    _instance(source / PATIENT / "IMG1")
    _instance(source / "IMG2")
    (tmp_path / "link").symlink_to(source / PATIENT)
    said: list[str] = []
    given = [source / PATIENT, source, tmp_path / "link", source / "IMG2", source / ".." / "src"]

    sources = list(find_sources(given, say=said.append))
    summary = Importer(_RecordingIngest(tmp_path / "landing"), workers=2).run(sources)  # type: ignore[arg-type]

    assert summary.imported == 2 and sorted(s.label for s in sources) == sorted(
        [str(source / "IMG2"), str(source / PATIENT / "IMG1")]
    )
    assert said == [
        "paths given inside another one (or twice), by their place: 1 (inside 2), 3 (inside 2), 4 (inside 2), "
        "5 (the same as 2); their files are imported once"
    ]
    assert PATIENT not in said[0]


def _element(group: int, element: int, value: bytes) -> bytes:
    """One element in Implicit VR Little Endian."""
    return struct.pack("<HHI", group, element, len(value)) + value


def _bare_data_set(tmp_path: Path, rest: bytes) -> None:
    """A bare data set (no preamble, no file meta) under a folder named as a patient: its SOP Class and
    Instance UIDs, then ``rest``."""
    p = tmp_path / "src" / PATIENT / "OLD1"
    p.parent.mkdir(parents=True)
    p.write_bytes(_element(8, 0x16, b"1.2.840.10008.5.1.4.1.1.7\0") + _element(8, 0x18, b"1.2.3.4\0") + rest)


def test_a_ctrl_c_while_a_finished_file_is_counted_does_not_hang_the_run(tmp_path):
    """Review: the Ctrl-C landing while a file's report row was written left its future in the running
    set, never to come off the queue again: the cleanup waited for ever."""
    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        (src / f"notes{n}.txt").write_text("not DICOM")
    rows: list[tuple] = []

    def report(*row) -> None:
        rows.append(row)
        if len(rows) == 1:
            raise KeyboardInterrupt  # SIGINT while the row is written and flushed

    done: list[ImportSummary] = []
    running = threading.Thread(
        target=lambda: done.append(
            Importer(_RecordingIngest(tmp_path / "l"), workers=1).run(find_sources([src]), report=report)
        ),
        daemon=True,
    )
    running.start()
    running.join(10)
    assert done and done[0].interrupted


def test_a_cut_bare_data_set_is_not_dicom_not_a_disk_failure(tmp_path):
    """Review: pydicom's OSError on a sequence cut short was taken for the disk's: 'failed (retry)',
    exit 1, the same on every run."""
    _bare_data_set(
        tmp_path,
        b"\x08\x00\x40\x11\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + _element(8, 0x1150, b"1.2\0"),
    )
    summary, _ = _import(tmp_path, tmp_path / "src")
    assert dict(summary.failed) == {} and sum(summary.skipped.values()) == 1


def test_pydicom_warnings_about_a_bare_data_set_name_no_path(tmp_path, capfd):
    """Review: a bare data set's undefined-length value without its delimiter made pydicom warn 'End of
    file reached ... in file <path>', and the path names the patient."""
    _bare_data_set(tmp_path, b"\x08\x00\x90\x00\xff\xff\xff\xff" + b"DOE^JOHN" * 4)
    import logging

    import structlog

    from diana.logs import configure_logging

    configure_logging("info", "console")  # as the command logs: pydicom's warnings included
    try:
        summary, _ = _import(tmp_path, tmp_path / "src")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    logged = capfd.readouterr().err
    assert sum(summary.skipped.values()) == 1  # before: pydicom's "End of file reached ... in file <path>"
    assert PATIENT not in logged


# ----------------------------------------------------------------------------- 4. the report's disk full


class _FillingFile:
    """The report's file on a disk that fills after ``rows`` flushes: each later write and flush raises
    ENOSPC, as a full disk does (the text layer keeps the row buffered, and the close fails again)."""

    def __init__(self, real, rows: int):
        self._real, self._left = real, rows

    def write(self, text: str) -> int:
        if self._left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._real.write(text)

    def flush(self) -> None:
        if self._left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= 1
        self._real.flush()

    def close(self) -> None:
        self._real.close()
        if self._left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_report_row_that_cannot_be_written_stops_the_run_with_what_was_in_flight_counted(tmp_path):
    """A full disk under the report raised out of the run: a traceback, no summary, the files in flight
    neither counted nor waited for. Now the run stops like Ctrl-C: those in flight are finished and counted,
    the rest is not looked at, and the summary holds the error."""
    one = _instance(tmp_path / "a.dcm")
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    ingest = _RecordingIngest(tmp_path / "landing")
    written: list[tuple[str, str, str]] = []

    def report(outcome: str, reason: str, file: str) -> None:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append((outcome, reason, file))

    sources = (bulk_import.Source(str(p), path=p) for n in range(1000) for p in ((one, notes)[n % 2],))
    summary = Importer(ingest, workers=2).run(sources, report=report)  # type: ignore[arg-type]

    assert summary.report_error is not None and summary.report_error.errno == errno.ENOSPC and summary.stopped
    looked_at = summary.imported + summary.skipped_non_dicom
    assert looked_at < 100, "the run went on after the report failed"
    assert summary.imported == len(ingest.accepted)  # every file imported is counted: none left unsaid
    assert summary.skipped_non_dicom >= 3 and len(written) == 2


def test_the_cli_says_which_report_failed_and_why_prints_the_summary_and_exits_1(
    tmp_path, config, no_broker, monkeypatch, capsys
):
    source = tmp_path / "src"
    for n in range(6):
        _instance(source / f"IMG{n}")
        (source / f"notes{n}.txt").write_text("not DICOM")
    report = tmp_path / "not-imported.csv"
    real = bulk_import.Report

    class FillingReport(real):  # type: ignore[misc,valid-type]
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self._file = _FillingFile(self._file, rows=2)  # the header row and one more fit
            self._writer = csv.writer(self._file)

    monkeypatch.setattr(bulk_import, "Report", FillingReport)
    status = main(["--config", str(config), "import", "--no-progress", "--report", str(report), str(source)])

    said = _said(capsys)
    assert status == 1
    assert "Traceback" not in said and "imported:" in said and "skipped (not DICOM):" in said
    message = next(line for line in said.splitlines() if line.startswith("diana import:"))
    assert f"the report {report} could not be written (No space left on device)" in message
    assert "free space on its disk" in message and "run the same command again" in message
    assert report.read_text().splitlines()[0] == "outcome,reason,file"
    landing = tmp_path / "landing" / ".incoming"
    assert list(landing.iterdir()) == []  # nothing half-written left behind


def test_a_report_that_cannot_be_written_at_all_fails_before_anything_is_imported(
    tmp_path, config, no_broker, monkeypatch, capsys
):
    """/dev/full: the header row fails. Before, a traceback (and, run as root, /dev/full's mode changed)."""
    _instance(tmp_path / "src" / "IMG1")
    mode = os.stat("/dev/full").st_mode
    imported: list[Path] = []
    monkeypatch.setattr(_RecordingIngest, "accept_file", lambda self, path, *a, **k: imported.append(path))

    try:
        status = main(
            ["--config", str(config), "import", "--no-progress", "--report", "/dev/full", str(tmp_path / "src")]
        )
    finally:
        changed = os.stat("/dev/full").st_mode
        if changed != mode:  # the regression this guards against, run as root: the device given back its mode
            os.chmod("/dev/full", stat.S_IMODE(mode))
    assert changed == mode, "the report's mode is set on a regular file only, never on a device"

    said = _said(capsys)
    assert status == 1 and "Traceback" not in said and imported == []
    assert "--report /dev/full: No space left on device; free space on its disk" in said


# ------------------------------------------------------------------- 5. every file once, whatever names it


def test_a_dicomdir_and_its_series_folder_given_import_each_file_once_in_either_order(tmp_path):
    """``diana import /cd/DICOMDIR /cd/<series>``: the series' files came once by the DICOMDIR's records,
    once by the folder's walk."""
    dicomdir, uids = _series_fileset(tmp_path, 3)
    series = dicomdir.parent / "PT000000" / "ST000000" / "SE000000"
    _instance(series / "EXTRA")  # in the folder, not in the DICOMDIR: still imported, by the walk

    for given in ([dicomdir, series], [series, dicomdir], [dicomdir, series / "IM000001"]):
        said: list[str] = []
        sources = list(find_sources(given, say=said.append))
        ingest = _RecordingIngest(tmp_path / "landing")
        summary = Importer(ingest, workers=2).run(sources)  # type: ignore[arg-type]
        labels = [s.label for s in sources]
        assert len(labels) == len(set(labels)) == summary.imported == len(set(ingest.accepted))
        expected = 3 if given[1].name == "IM000001" else 4
        assert summary.imported == expected and set(uids) <= set(ingest.accepted)
        assert said[-1].startswith("1 files named again" if expected == 3 else "3 files named again")
        assert PATIENT not in " ".join(said)


def test_a_file_named_by_hard_links_or_symlinks_is_imported_once(tmp_path):
    source = tmp_path / "src"
    one = _instance(source / PATIENT / "IMG1")
    os.link(one, source / PATIENT / "IMG1_hardlink")
    (source / "IMG1_symlink").symlink_to(one)
    outside = _instance(tmp_path / "elsewhere" / "IMG2")
    (source / "IMG2_a").symlink_to(outside)
    (source / "IMG2_b").symlink_to(outside)
    other = tmp_path / "other"
    other.mkdir()
    os.link(outside, other / "IMG2_hardlink")
    _instance(source / "IMG3")

    said: list[str] = []
    sources = list(find_sources([source, other, outside], say=said.append))
    ingest = _RecordingIngest(tmp_path / "landing")
    summary = Importer(ingest, workers=2).run(sources)  # type: ignore[arg-type]

    assert summary.imported == 3 == len(ingest.accepted) == len(set(ingest.accepted))
    assert said == [
        "5 files named again by another route (a DICOMDIR and a folder given, a symlink, a hard link) were "
        "passed over: each is looked at once, by its other route, and counted there"
    ]


def test_a_receiver_sweeping_incoming_meanwhile_leaves_the_members_and_data_sets_being_imported(tmp_path):
    """A receiver starting during an import sweeps .incoming at once: the zip member extracted there, or the
    bare data set given its file meta there, was removed before its header was read (failed, `storage`).
    The sweep runs in another process here, as a receiver's does, while each file is accepted."""
    import subprocess
    import sys

    source = tmp_path / "src"
    archive = source / "export.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(_instance(tmp_path / "a.dcm"), f"{PATIENT}/IMG1")
        zf.writestr(f"{PATIENT}/OLD1", _bare(tmp_path / "OLD1", implicit_vr=True, little_endian=True))
    _bare(source / "OLD2", implicit_vr=True, little_endian=True)
    ingest = _RecordingIngest(tmp_path / "landing")
    record = ingest.accept_file
    sweep = (
        "import sys; from pathlib import Path; from diana.producers.landing import LandingStore; "
        "print(LandingStore(Path(sys.argv[1])).sweep(older_than_s=0))"
    )
    swept: list[str] = []

    def accept_after_a_sweep(path: Path, source: str, *, owned: bool) -> None:
        assert path.parent == ingest.landing.incoming  # ours, in .incoming: what a sweep looks at
        done = subprocess.run(
            [sys.executable, "-c", sweep, str(tmp_path / "landing")],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        swept.append(done.stdout.strip())
        record(path, source, owned=owned)

    ingest.accept_file = accept_after_a_sweep  # type: ignore[method-assign]

    summary = Importer(ingest, workers=2).run(find_sources([source]))  # type: ignore[arg-type]

    assert summary.not_imported == [] and summary.imported == 3 and swept == ["0", "0", "0"]
    assert list(ingest.landing.incoming.iterdir()) == []


# ------------------------------------------------------------ 6. a zip by its content, whatever its name


def test_a_self_extracting_or_renamed_zip_is_imported_and_nothing_else_taken_for_one(tmp_path):
    """An export as a self-extracting archive (``.exe``: a stub, then the zip) or a zip saved without its
    name was skipped as not DICOM, its images never seen. It is a zip now when its central directory
    opens and lists a member; a DICOM file (Part-10 or bare) holding an end record in its pixel data is
    still DICOM, and bytes that only look like an end record leave a file not DICOM."""
    source = tmp_path / "src"
    source.mkdir()
    zipped = _instance_zip(tmp_path).read_bytes()
    (source / f"{PATIENT}.exe").write_bytes(b"MZ" + b"\0" * 4000 + zipped)  # a stub, then the zip
    (source / "EXPORT").write_bytes(b"\x7fELF" + zipped)  # appended to something, no name
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="IMPORT9", study_date="20240101", rows=64)
    pixels = bytearray(ds.PixelData)
    pixels[1280 : 1280 + len(zipped)] = zipped  # a whole zip in the pixel data: it opens, with a member
    ds.PixelData = bytes(pixels)
    del ds.file_meta
    ds.save_as(source / "OLD1", enforce_file_format=False, implicit_vr=True, little_endian=True)
    end = zipped[zipped.rindex(b"PK\x05\x06") :]
    (source / "notes.bin").write_bytes(b"notes" * 100 + end)  # a chance end record pointing at nothing
    assert zipfile.is_zipfile(source / "notes.bin") and zipfile.ZipFile(source / "OLD1").namelist() == ["IMG1"]

    sources = list(find_sources([source]))
    summary, ingest = _import(tmp_path, source)

    assert sorted(s.label for s in sources if s.member is not None) == sorted(
        [f"{source / 'EXPORT'}:IMG1", f"{source / f'{PATIENT}.exe'}:IMG1"]
    )
    assert (summary.imported, summary.wrapped, len(ingest.accepted)) == (3, 1, 3)  # two members, the bare one
    assert summary.not_imported == [("skipped", "not DICOM (no preamble and DICM)", str(source / "notes.bin"))]


def test_a_file_name_that_is_not_utf8_is_reported_as_its_bytes(tmp_path):
    """A CD copied on Windows (Latin-1 names): the report's row for such a name raised UnicodeEncodeError,
    which went through the run (a traceback, no summary)."""
    source = tmp_path / "src"
    source.mkdir()
    name = os.fsencode(source) + b"/NOTES\xe9.txt"
    with open(name, "wb") as fh:
        fh.write(b"not DICOM")
    path = tmp_path / "report.csv"
    with bulk_import.Report(path) as report:
        summary = Importer(_RecordingIngest(tmp_path / "landing"), workers=1).run(  # type: ignore[arg-type]
            find_sources([source]), report=report.row
        )

    assert summary.skipped_non_dicom == 1 and summary.report_error is None and report.failure is None
    assert path.read_bytes().splitlines()[1] == b"skipped,not DICOM (no preamble and DICM)," + name


def test_a_zip_is_told_by_its_end_record_alone_and_a_directory_over_the_cap_is_never_parsed(tmp_path, monkeypatch):
    """Every file neither Part-10 nor a bare data set had its whole central directory parsed to tell a zip
    (a 25 MB installer of 200,000 entries: 1.5 s, 215 MB), then again per worker; a crafted directory took
    gigabytes. Now the end record (or zip64's) alone tells it, the directory's first entry checked where it
    points, and a zip over _MAX_ZIP_ENTRIES entries is rejected with its reason, never opened."""
    source = tmp_path / "src"
    source.mkdir()
    big = io.BytesIO()
    with zipfile.ZipFile(big, "w") as zf:
        for n in range(5):
            zf.writestr(f"viewer/lib/part{n}.bin", b"")
    (source / "viewer.exe").write_bytes(b"MZ" + b"\0" * 1000 + big.getvalue())  # detected by content
    (source / "viewer.zip").write_bytes(big.getvalue())  # by its first bytes
    small = _instance_zip(tmp_path).read_bytes()
    (source / "export.exe").write_bytes(b"MZ" + b"\0" * 1000 + small)
    zip64 = io.BytesIO()
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 0)  # zipfile writes the zip64 end records then
    with zipfile.ZipFile(zip64, "w") as zf:
        zf.write(tmp_path / "one.dcm", "IMG64")
    monkeypatch.undo()
    (source / "export64.bin").write_bytes(b"\x7fELF" + zip64.getvalue())
    assert b"PK\x06\x06" in zip64.getvalue()

    monkeypatch.setattr(bulk_import, "_MAX_ZIP_ENTRIES", 4)
    parsed: list[str] = []
    real_zipfile = zipfile.ZipFile

    def counting(file, *args, **kwargs):
        parsed.append(Path(file).name)
        return real_zipfile(file, *args, **kwargs)

    monkeypatch.setattr(bulk_import.zipfile, "ZipFile", counting)
    sources = list(find_sources([source]))

    assert sorted(parsed) == ["export.exe", "export64.bin"]  # listed once each; the two over the cap never
    assert sorted((s.label, s.verdict) for s in sources if s.verdict is not None) == [
        (str(source / "viewer.exe"), ("rejected", bulk_import._TOO_MANY_ENTRIES)),
        (str(source / "viewer.zip"), ("rejected", bulk_import._TOO_MANY_ENTRIES)),
    ]
    summary, ingest = _import(tmp_path, source)
    assert (summary.imported, len(ingest.accepted), dict(summary.rejected)) == (
        2,
        2,
        {bulk_import._TOO_MANY_ENTRIES: 2},
    )


def test_a_bare_data_set_named_zip_is_a_data_set_and_a_zip_of_folders_alone_is_counted(tmp_path):
    """A bare data set named .zip went through zipfile.is_zipfile before the bare check: a zip in its pixel
    data made it a zip (its member imported, the data set not). A zip of folder entries alone was listed
    as nothing, counted nowhere."""
    source = tmp_path / "src"
    source.mkdir()
    zipped = _instance_zip(tmp_path).read_bytes()
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="IMPORT9", study_date="20240101", rows=64)
    pixels = bytearray(ds.PixelData)
    pixels[1280 : 1280 + len(zipped)] = zipped
    ds.PixelData = bytes(pixels)
    del ds.file_meta
    ds.save_as(source / "OLD1.zip", enforce_file_format=False, implicit_vr=True, little_endian=True)
    folders = io.BytesIO()
    with zipfile.ZipFile(folders, "w") as zf:
        zf.writestr(f"{PATIENT}/", b"")
        zf.writestr(f"{PATIENT}/SERIES1/", b"")
    (source / "folders.exe").write_bytes(b"MZ" + b"\0" * 300 + folders.getvalue())

    summary, ingest = _import(tmp_path, source)

    assert (summary.imported, summary.wrapped, len(ingest.accepted)) == (1, 1, 1)  # the data set, wrapped
    assert summary.not_imported == [("skipped", "zip of folders only, no file in it", str(source / "folders.exe"))]


def _blind_to_case(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Under ``root``, os.stat and os.lstat find a name in any case, as on vfat, exFAT, CIFS or a disc
    mounted check=relaxed; a listing shows the names as stored, and realpath keeps the case written."""
    real_stat, real_lstat = os.stat, os.lstat

    def stored(path):
        text = os.fspath(path)
        if not isinstance(text, str) or not text.startswith(str(root)):
            return path
        current = str(root)
        for part in Path(text).relative_to(root).parts:
            try:
                names = os.listdir(current)
            except OSError:
                return path
            current = os.path.join(current, next((n for n in names if n.casefold() == part.casefold()), part))
        return current

    monkeypatch.setattr(os, "stat", lambda path, *a, **k: real_stat(stored(path), *a, **k))
    monkeypatch.setattr(os, "lstat", lambda path, *a, **k: real_lstat(stored(path), *a, **k))


def test_on_a_filesystem_blind_to_case_a_dicomdir_and_its_folder_import_each_file_once(tmp_path, monkeypatch):
    """A USB stick (vfat shortname=lower) shows pt000000/.../im000000, its DICOMDIR says PT000000\\...:
    the record's path opens as written, and compared as a string to the folder given it was not inside
    it: every file imported twice. So were /usb/pt000000 and /usb/PT000000 given together. Compared by
    (device, inode) now."""
    dicomdir, _ = _series_fileset(tmp_path, 3)
    _rename_tree(dicomdir.parent, lambda name: name if name == "DICOMDIR" else name.lower())
    folder = dicomdir.parent / "pt000000"
    _blind_to_case(monkeypatch, tmp_path)
    said: list[str] = []

    both = list(find_sources([dicomdir, folder], say=said.append))
    again = list(find_sources([folder, dicomdir.parent / "PT000000", folder / "ST000000"], say=said.append))

    assert sorted(s.label for s in both) == sorted(str(p) for p in folder.rglob("im*"))
    assert said[0].startswith("3 files named again by another route")
    assert [s.label for s in again] == [s.label for s in both if s.label.startswith(str(folder))]
    assert said[1].startswith(
        "paths given inside another one (or twice), by their place: 2 (the same as 1), 3 (inside 1)"
    )


@pytest.mark.parametrize(
    "stopped, status, said_too",
    [
        ({"interrupted": True}, 130, ["interrupted:"]),
        ({"broker_down": True, "failed": {"broker: no acknowledgement": 3}}, 1, ["the broker acknowledged none"]),
        ({"failed": {"storage: Input/output error": 1}}, 1, ["some files or folders could not be read"]),
        (
            {"interrupted": True, "broker_down": True, "failed": {"broker: x": 3, "storage: y": 1}},
            130,
            ["the broker acknowledged none", "interrupted:", "some files or folders could not be read"],
        ),
    ],
)
def test_every_reason_the_import_stopped_is_said_and_ctrl_c_exits_130_whatever_else(
    tmp_path, config, no_broker, monkeypatch, capsys, stopped, status, said_too
):
    """With the report's disk full, a Ctrl-C exited 1, not the documented 130, and the broker down (or a
    Ctrl-C) went unsaid: only the report's "free space" was printed. Every cause is said now; 130 wins."""
    _instance(tmp_path / "src" / "IMG1")
    stopped = dict(stopped)
    failed = stopped.pop("failed", {})

    def stopping(self, sources, progress=None, report=None):
        summary = ImportSummary(report_error=OSError(errno.ENOSPC, "No space left on device"), **stopped)
        summary.failed.update(failed)
        return summary

    monkeypatch.setattr(bulk_import.Importer, "run", stopping)
    report = tmp_path / "not-imported.csv"
    code = main(["--config", str(config), "import", "--no-progress", "--report", str(report), str(tmp_path / "src")])

    lines = [line for line in _said(capsys).splitlines() if line.startswith("diana import:")]
    assert code == status
    assert len(lines) == 1 + len(said_too), lines
    assert f"the report {report} could not be written (No space left on device)" in lines[0]
    for text, line in zip(said_too, lines[1:], strict=True):
        assert text in line


def test_the_files_named_again_are_not_said_imported_when_their_other_route_fails(tmp_path, monkeypatch):
    """A DICOMDIR and its folder given, the series folder unlistable (EACCES): the records were passed over
    for the walk, which failed that folder, and the message said the files "were imported once"."""
    dicomdir, _ = _series_fileset(tmp_path, 3)
    series = next(p for p in dicomdir.parent.rglob("SE*") if p.is_dir())
    scandir = os.scandir

    def refused(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path) == series:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    said: list[str] = []
    summary, ingest = _import(tmp_path, dicomdir, dicomdir.parent / "PT000000")
    said_now = list(find_sources([dicomdir, dicomdir.parent / "PT000000"], say=said.append))
    monkeypatch.undo()

    assert summary.imported == 0 and dict(summary.failed) == {"folder unreadable: Permission denied": 1}
    assert len(said_now) == 1 and len(said) == 1
    assert "imported" not in said[0] and "passed over" in said[0] and "counted there" in said[0]
