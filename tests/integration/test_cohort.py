"""Cohort discovery and export on the real stack: find by modality and date, export exactly those
studies byte-identical, and de-identified with pseudonyms that stay the same across exports."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from diana.access.deid import Deidentifier
from diana.access.deid_options import ProfileOptions
from diana.access.export import INCOMPLETE_NAME, REPORT_NAME
from diana.access.pseudonyms import ProjectKeys
from diana.access.residual import collect, scan
from tests.support.deidgen import identifying_object
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import storescu, wait_until_caught_up
from tests.support.paths import REPO


def diana(pipeline, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(pipeline.config_file)
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


@pytest.fixture(scope="module")
def cohort_studies(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    wanted = make_study(
        root / "a",
        [SeriesSpec("CT", "COHORT AXIAL", 6), SeriesSpec("CT", "COHORT SCOUT", 2)],
        patient_id="COHORT-P1",
        study_date="20190510",
    )
    other_modality = make_study(
        root / "b", [SeriesSpec("MR", "COHORT T1", 4)], patient_id="COHORT-P2", study_date="20190512"
    )
    other_date = make_study(
        root / "c", [SeriesSpec("CT", "COHORT OLD", 3)], patient_id="COHORT-P1", study_date="20180101"
    )
    for study in (wanted, other_modality, other_date):
        result = storescu(pipeline.cfg, study.files)
        assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg)
    return wanted, other_modality, other_date


FILTERS = ("--modality", "CT", "--date-from", "2019-05-01", "--date-to", "2019-05-31")


def test_find_by_modality_and_date(pipeline, cohort_studies, tmp_path):
    wanted, _, _ = cohort_studies
    out = tmp_path / "cohort.json"
    result = diana(pipeline, "cohort", "find", *FILTERS, "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["study_instance_uid"] for r in rows] == [wanted.study_uid]
    assert rows[0]["instances"] == 8 and rows[0]["series"] == 2 and rows[0]["modalities"] == "CT"
    table = diana(pipeline, "cohort", "find", *FILTERS, "--description", "cohort axial")
    assert wanted.study_uid in table.stdout and "1 studies" in table.stdout
    # the words in two fields: "chest" in the study description, "axial" in the series description
    across = diana(pipeline, "cohort", "find", *FILTERS, "--description", "chest axial")
    assert wanted.study_uid in across.stdout and "1 studies" in across.stdout, across.stdout + across.stderr


def test_a_comma_list_of_modalities_and_a_station_pattern_match(pipeline, cohort_studies, tmp_path):
    """`--modality ct,MR` is either; `--station ctstation?` a case-insensitive wildcard (all three studies
    come from station CTSTATION1); a pattern that matches no station finds nothing."""
    wanted, other_modality, _ = cohort_studies
    dates = ("--date-from", "2019-05-01", "--date-to", "2019-05-31")
    out = tmp_path / "either.json"
    result = diana(pipeline, "cohort", "find", *dates, "--modality", "ct,MR", "--station", "ctstation?", "-o", str(out))
    assert result.returncode == 0, result.stderr
    found = {r["study_instance_uid"] for r in json.loads(out.read_text())}
    assert found == {wanted.study_uid, other_modality.study_uid}
    none = diana(pipeline, "cohort", "find", *dates, "--station", "MR*")
    assert none.returncode == 0 and "0 studies" in none.stdout, none.stdout + none.stderr


def test_a_cut_keeps_the_earliest_study_counted_whole_and_dated_by_its_earliest_dated_instance(pipeline, tmp_path):
    """--limit cuts by study date, earliest first, and says so; the study kept is counted over both of its
    dates and over an instance indexed without its header (no study date: it does not make it undated)."""
    from confluent_kafka import Producer

    from tests.integration.test_deadletter_any_exception import _event, _publish

    split = make_study(
        tmp_path / "s", [SeriesSpec("CT", "COHORT SPLIT", 4)], patient_id="COHORT-P3", study_date="20170302"
    )
    later = make_study(
        tmp_path / "l", [SeriesSpec("CT", "COHORT LATER", 1)], patient_id="COHORT-P4", study_date="20170401"
    )
    for path in split.files + later.files:
        ds = pydicom.dcmread(path)
        ds.StationName = "COHORTSPLIT"
        if path in split.files[2:]:
            ds.StudyDate = "20170303"  # read over midnight: half the images carry the next day
        ds.save_as(path, enforce_file_format=True)
    assert storescu(pipeline.cfg, split.files + later.files).returncode == 0
    producer = Producer({"bootstrap.servers": pipeline.cfg.kafka.bootstrap})
    series = pydicom.dcmread(split.files[0]).SeriesInstanceUID
    _publish(
        producer,
        _event(
            study_instance_uid=split.study_uid,
            series_instance_uid=series,
            station_name="COHORTSPLIT",
            modality="CT",
            study_date="2017-03-01",
            header_json="{not json",  # refused by the index: indexed without it, its date with it
        ),
    )
    assert producer.flush(30) == 0
    wait_until_caught_up(pipeline.cfg)
    out = tmp_path / "cut.json"
    result = diana(pipeline, "cohort", "find", "--station", "COHORTSPLIT", "--limit", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "more than 1 studies match" in result.stderr
    [row] = json.loads(out.read_text())
    assert row["study_instance_uid"] == split.study_uid
    assert row["instances"] == 5 and row["study_date"] == "2017-03-02"


def test_export_is_byte_identical_without_deidentification(pipeline, cohort_studies, tmp_path):
    wanted, _, _ = cohort_studies
    out = tmp_path / "plain"
    result = diana(pipeline, "cohort", "export", *FILTERS, "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    exported = sorted(out.rglob("*.dcm"))
    archive = pipeline.cfg.path(pipeline.cfg.storage.archive_dir) / wanted.study_uid
    assert len(exported) == 8
    assert {p.relative_to(out) for p in exported} == {p.relative_to(archive.parent) for p in archive.rglob("*.dcm")}
    for path in exported:
        assert path.read_bytes() == (archive.parent / path.relative_to(out)).read_bytes()
    # as a zip too
    zipped = tmp_path / "plain.zip"
    assert diana(pipeline, "cohort", "export", *FILTERS, "--out", str(zipped), "--no-progress").returncode == 0
    import zipfile

    with zipfile.ZipFile(zipped) as zf:
        assert sorted(zf.namelist())[-1] == REPORT_NAME and len(zf.namelist()) == 9  # 8 objects and the report
        assert json.loads(zf.read(REPORT_NAME))["status"] == "complete"
    assert not (out / INCOMPLETE_NAME).exists() and json.loads((out / REPORT_NAME).read_text())["status"] == "complete"


def _pseudonyms(folder: Path) -> tuple[set[str], set[str]]:
    ids, uids = set(), set()
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ids.add(str(ds.PatientID))
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    return ids, uids


def test_research_export_deidentifies_consistently(pipeline, cohort_studies, tmp_path):
    wanted, _, _ = cohort_studies
    secret = tmp_path / "site.secret"
    secret.write_bytes(hashlib.sha256(b"test site").digest())
    secret.chmod(0o600)  # issue 16: a secret others can read is refused
    originals = [pydicom.dcmread(p) for p in wanted.files]
    forbidden = {"Test^Patient", wanted.patient_id, "19700101", wanted.study_uid}
    forbidden |= {ds.SeriesInstanceUID for ds in originals} | {ds.SOPInstanceUID for ds in originals}

    first, second, key = tmp_path / "r1", tmp_path / "r2", tmp_path / "key.csv"
    result = diana(
        pipeline,
        "cohort",
        "export",
        *FILTERS,
        "--research",
        "--project",
        "cohort-test",
        "--secret-file",
        str(secret),
        "--out",
        str(first),
        "--key-file",
        str(key),
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(first.rglob("*.dcm"))
    assert len(files) == 8
    for path in files:
        data = path.read_bytes()
        for value in forbidden:
            assert value.encode() not in data, f"{value} remains in {path.name}"
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.StudyDate != "20190510"
        assert "113100" in {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}

    assert (
        diana(
            pipeline,
            "cohort",
            "export",
            *FILTERS,
            "--research",
            "--project",
            "cohort-test",
            "--secret-file",
            str(secret),
            "--out",
            str(second),
            "--no-progress",
        ).returncode
        == 0
    )
    ids1, uids1 = _pseudonyms(first)
    ids2, uids2 = _pseudonyms(second)
    assert len(ids1) == 1 and ids1 == ids2 and uids1 == uids2  # same patient, same pseudonym, same UIDs
    [row] = list(csv.DictReader(key.open()))
    assert row["original_patient_id"] == wanted.patient_id and row["pseudonym_patient_id"] in ids1
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_bad_filters_name_the_valid_fields(pipeline):
    result = diana(pipeline, "cohort", "find", "--colour", "red")
    assert result.returncode == 2 and "valid filters: --modality" in result.stderr
    result = diana(pipeline, "cohort", "find", "--dose-above", "dlp=500")
    assert result.returncode == 2 and "total_dlp_mGycm" in result.stderr
    result = diana(pipeline, "cohort", "export", *FILTERS, "--research", "--out", "/tmp/never")
    assert result.returncode == 2 and "site secret" in result.stderr


RESEARCH = ("--date-from", "2017-07-07", "--date-to", "2017-07-07")


@pytest.fixture(scope="module")
def research_objects(pipeline, tmp_path_factory):
    """One study full of identifying values in every Table E.1-1 attribute: a CT, an SR and a secondary capture."""
    root = tmp_path_factory.mktemp("research")
    study = generate_uid()
    objects = [identifying_object("ct", study_uid=study), identifying_object("sr", study_uid=study)]
    capture = identifying_object("ct", study_uid=study)
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    capture.Modality = "OT"
    objects.append(capture)
    paths = []
    for i, ds in enumerate(objects):
        ds.StudyDate = "20170707"
        paths.append(root / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    result = storescu(pipeline.cfg, paths)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg)
    return objects


def _research(pipeline, secret: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return diana(
        pipeline,
        "cohort",
        "export",
        *RESEARCH,
        "--research",
        "--secret-file",
        str(secret),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    )


def test_research_export_cli_refuses_risky_objects_reports_and_guards_its_files(pipeline, research_objects, tmp_path):
    secret = tmp_path / "site.secret"
    secret.write_bytes(hashlib.sha256(b"research site").digest())
    secret.chmod(0o600)
    out, key = tmp_path / "research", tmp_path / "key.csv"
    result = _research(pipeline, secret, out, "--project", "lung", "--key-file", str(key), "--clean-structured-content")
    # the secondary capture is withheld by the risk policy: deliberate, not a gap, so the export is complete
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 objects withheld by the risk policy" in result.stdout and "secondary capture" in result.stdout
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "complete" and report["exported"] == 2 and report["refused"] == []
    assert len(report["withheld_by_policy"]) == 1
    assert [c["code"] for c in report["deidentification_method_codes"]] == ["113100", "113104", "113107"]
    assert report["table"].startswith("DICOM PS3.15 2026c Table E.1-1")
    assert not (out / INCOMPLETE_NAME).exists() and "INCOMPLETE" not in result.stdout
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    d = Deidentifier(ProjectKeys(b"unused-secret-0123456789", "x"), ProfileOptions(clean_structured_content=True))
    exported = [pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]
    assert len(exported) == 2
    for ds in exported:
        for source in research_objects:
            assert scan(ds, collect(source, d.table, d.options)) == []  # no identifier of any source object
        assert ds.PatientIdentityRemoved == "YES"
    [sr] = [ds for ds in exported if ds.Modality == "SR"]
    assert sr.ContentSequence[0].TextValue == "Patient [REDACTED] [REDACTED], [REDACTED], has a mass in the left lung"

    opted_in = tmp_path / "opted-in"
    result = _research(pipeline, secret, opted_in, "--project", "lung", "--allow-risky")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING: 1 risky objects exported" in result.stdout
    flags = sorted(pydicom.dcmread(p).PatientIdentityRemoved for p in opted_in.rglob("*.dcm"))
    assert flags == ["NO", "YES", "YES"]
    assert not (opted_in / INCOMPLETE_NAME).exists()  # every object went out

    result = _research(pipeline, secret, tmp_path / "no-project")
    assert result.returncode == 2 and "--project NAME" in result.stderr
    result = _research(
        pipeline, secret, tmp_path / "k", "--project", "lung", "--key-file", str(tmp_path / "k" / "key.csv")
    )
    assert result.returncode == 2 and "inside the export" in result.stderr
    assert not (tmp_path / "k").exists()
    secret.chmod(0o644)
    result = _research(pipeline, secret, tmp_path / "readable", "--project", "lung")
    assert result.returncode == 2 and f"chmod 600 {secret}" in result.stderr
