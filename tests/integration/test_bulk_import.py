"""`diana import` on the real stack: folders, zips and DICOMDIRs, with a summary."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from tests.support.dicomgen import SeriesSpec, make_instance, make_study
from tests.support.helpers import os_search, wait_until_caught_up
from tests.support.paths import REPO


def _diana_import(pipeline, *paths: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(pipeline.config_file)
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", "import", "--no-progress", *options, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_import_folder_zip_and_dicomdir(pipeline, tmp_path):
    cfg = pipeline.cfg
    folder = tmp_path / "backfill"
    study = make_study(folder / "study", [SeriesSpec("CT", "BACKFILL", 12)], patient_id="IMPORT1")
    (folder / "README.txt").write_text("not an image")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 something")
    bad = make_instance(generate_uid(), generate_uid(), 1, patient_id="IMPORT1", study_date="20240101")
    del bad.SOPInstanceUID
    bad.save_as(folder / "bad.dcm", enforce_file_format=True)

    zipped = make_study(tmp_path / "z", [SeriesSpec("MR", "ZIPPED", 5)], patient_id="IMPORT2")
    archive_zip = tmp_path / "study.zip"
    with zipfile.ZipFile(archive_zip, "w") as zf:
        for path in zipped.files:
            zf.write(path, f"inner/{path.name}")
        zf.writestr("inner/manifest.txt", "five MR images")

    fs_study = make_study(tmp_path / "fsrc", [SeriesSpec("CT", "FILESET", 3)], patient_id="IMPORT3")
    fileset = FileSet()
    for path in fs_study.files:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "media")

    report = tmp_path / "not-imported.csv"
    result = _diana_import(
        pipeline, folder, archive_zip, tmp_path / "media" / "DICOMDIR", options=("--report", str(report))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "imported:            20" in out
    assert "skipped (not DICOM): 3" in out  # README.txt, notes.pdf, manifest.txt
    assert "rejected:            1" in out and "invalid identifiers" in out
    # Which file: in the report, readable by its owner only; neither the log nor the summary names it.
    assert "bad.dcm" not in result.stdout + result.stderr and "import.rejected" in result.stderr
    with report.open(newline="") as fh:
        rows = list(csv.reader(fh))
    # Every file not imported, with its reason: the rejected one and the three skipped (in the order
    # their outcomes were known).
    assert rows[0] == ["outcome", "reason", "file"] and len(rows) == 5, rows
    by_outcome = sorted((row[0], Path(row[2].split(":")[-1]).name) for row in rows[1:])
    assert by_outcome == [
        ("rejected", "bad.dcm"),
        ("skipped", "README.txt"),
        ("skipped", "manifest.txt"),
        ("skipped", "notes.pdf"),
    ], rows
    assert [row[2] for row in rows if row[0] == "rejected"] == [str(folder / "bad.dcm")]
    assert report.stat().st_mode & 0o777 == 0o600

    wait_until_caught_up(cfg)
    archive = cfg.path(cfg.storage.archive_dir)
    for s, n in ((study, 12), (zipped, 5), (fs_study, 3)):
        archived = list((archive / s.study_uid).rglob("*.dcm"))
        assert len(archived) == n
    # Imported objects are stored as they were on disk, byte for byte, and the source stays.
    original = study.files[0]
    ds = pydicom.dcmread(original, stop_before_pixels=True)
    stored = archive / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert stored.read_bytes() == original.read_bytes()
    assert original.exists()

    # Importing the same folder again duplicates nothing downstream.
    again = _diana_import(pipeline, folder)
    assert again.returncode == 0, again.stdout + again.stderr
    wait_until_caught_up(cfg)
    assert len(list((archive / study.study_uid).rglob("*.dcm"))) == 12
    docs = os_search(cfg, "diana-instances", {"term": {"study_instance_uid": study.study_uid}})
    assert len(docs) == 12 and {d["source"] for d in docs} == {"IMPORT"}
    studies = os_search(cfg, "diana-studies", {"ids": {"values": [study.study_uid]}})
    assert studies[0]["instance_count"] == 12


def test_import_names_a_missing_path(pipeline, tmp_path):
    result = _diana_import(pipeline, tmp_path / "nope")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_import_a_dicomdir_and_its_series_folder_imports_each_file_once(pipeline, tmp_path):
    """`diana import /cd/DICOMDIR /cd/<series folder>` imported the series twice (two events per file)."""
    cfg = pipeline.cfg
    source = make_study(tmp_path / "src", [SeriesSpec("CT", "ONCE", 4)], patient_id="IMPORT4")
    fileset = FileSet()
    for path in source.files:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "cd")
    dicomdir = tmp_path / "cd" / "DICOMDIR"
    series = next(p for p in (tmp_path / "cd").rglob("*") if p.is_dir() and any(f.is_file() for f in p.iterdir()))

    result = _diana_import(pipeline, dicomdir, series)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported:            4" in result.stdout
    assert "4 files named again by another route" in result.stdout
    wait_until_caught_up(cfg)
    docs = os_search(cfg, "diana-instances", {"term": {"study_instance_uid": source.study_uid}})
    assert len(docs) == 4
