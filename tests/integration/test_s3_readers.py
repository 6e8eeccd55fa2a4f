"""Everything that reads the archive reads it on S3 too: export, C-GET, WADO-RS (objects and frames) and status.

The session's archive sink is swapped for one writing to S3 (S3Proxy) for this module; the readers
run as their own processes with ``DIANA_STORAGE_BACKEND=s3``, as a site would configure them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from diana.storage import open_store
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import DCMTK_ENV, storescu, wait_until_caught_up
from tests.support.paths import REPO, TEST_HOME, port

S3 = {"DIANA_STORAGE_BACKEND": "s3"}
WEB_PORT = port(18044)
QR_PORT = port(11194)
TOKEN = "diana-s3-test-token-0123456789"


def diana(pipeline, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env.update(DIANA_CONFIG=str(pipeline.config_file), **S3)
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


@pytest.fixture(scope="module")
def s3_study(pipeline, s3_archive_sink, tmp_path_factory):
    study = make_study(
        tmp_path_factory.mktemp("s3study"),
        [SeriesSpec("CT", "S3 AXIAL", 5), SeriesSpec("CT", "S3 SCOUT", 1)],
        patient_id="S3-P1",
        study_date="20220707",
    )
    result = storescu(pipeline.cfg, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg)
    archive = open_store(s3_archive_sink, "archive")
    assert len([k for k in archive.list(f"{study.study_uid}/")]) == 6
    return study, archive


@pytest.fixture(scope="module")
def served(pipeline, s3_study):
    """`diana serve` (Q/R and DICOMweb) reading the S3 archive."""
    token_file = TEST_HOME / "dicomweb-s3-token"
    token_file.write_text(TOKEN)
    url = pipeline.start_web(
        "serve-s3",
        WEB_PORT,
        settings={
            **S3,
            "DIANA_DICOMWEB_BEARER_TOKEN_FILE": str(token_file),
            "DIANA_DICOMWEB_METRICS_PORT": "0",
            "DIANA_QUERY_RETRIEVE_PORT": str(QR_PORT),
        },
    )
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield DICOMwebClient(url, session=session)
    pipeline.stop("serve-s3")


def test_export_reads_the_s3_archive_byte_identical(pipeline, s3_study, tmp_path):
    study, archive = s3_study
    out = tmp_path / "export"
    filters = ("--modality", "CT", "--date-from", "2022-07-07", "--date-to", "2022-07-07")
    result = diana(pipeline, "cohort", "export", *filters, "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    exported = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.dcm")}
    assert len(exported) == 6
    for key, data in exported.items():
        with archive.open(key) as stream:
            assert stream.read() == data, key


def test_c_get_sends_the_objects_from_s3(pipeline, s3_study, served, tmp_path: Path):
    study, _ = s3_study
    out = tmp_path / "got"
    out.mkdir()
    command = ["getscu", "-aec", pipeline.cfg.receiver.ae_title, "-S", "-od", str(out)]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"]
    result = subprocess.run(
        [*command, "127.0.0.1", str(QR_PORT)], capture_output=True, text=True, env=DCMTK_ENV, timeout=300
    )
    got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in out.iterdir()}
    assert len(got) == 6, result.stdout + result.stderr + pipeline.log_text("serve-s3")[-2000:]
    for path in study.files:
        original = pydicom.dcmread(path)
        assert got[original.SOPInstanceUID] == original, f"{path.name}: the data set differs"


def test_wado_rs_retrieves_objects_and_frames_from_s3(s3_study, served):
    study, _ = s3_study
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in study.files}
    retrieved = served.retrieve_study(study.study_uid)
    assert {ds.SOPInstanceUID for ds in retrieved} == set(originals)
    for ds in retrieved:
        assert ds == originals[ds.SOPInstanceUID]
    one = next(iter(originals.values()))
    (frame,) = served.retrieve_instance_frames(
        study.study_uid, one.SeriesInstanceUID, one.SOPInstanceUID, frame_numbers=[1]
    )
    assert frame == one.PixelData


def test_status_counts_the_s3_archive(pipeline, s3_study):
    _, archive = s3_study
    expected = sum(1 for key in archive.list() if key.endswith(".dcm"))
    result = diana(pipeline, "status")
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: an index of the session is missing
    assert f"ARCHIVE  objects: {expected}" in result.stdout and "archive:" not in result.stdout, result.stdout
    secret = (TEST_HOME / "s3-credentials").read_text().split("aws_secret_access_key = ")[1].strip()
    assert secret not in result.stdout + result.stderr
    assert secret not in pipeline.log_text("archive-sink-s3")
