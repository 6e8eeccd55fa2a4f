"""Prepared WADO-RS metadata on the real pipeline: the metadata sink writes one file per completed series,
WADO-RS answers study and series metadata from those files with the same bytes as the per-instance
answer, a stale file is not served, and an amended series gets its file rewritten."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from diana.schemas.layout import series_metadata_path
from diana.schemas.series_metadata import read_header
from tests.support.dicomgen import SeriesSpec, make_instance, make_study
from tests.support.helpers import storescu, wait_until_caught_up
from tests.support.paths import port

WEB_PORT = port(18043)
SINK_SETTINGS = {"DIANA_SINKS_METADATA_METRICS_PORT": str(port(19469)), "DIANA_SINKS_METADATA_INDEX_WAIT_S": "60"}


def _header(path: Path):
    with open(path, "rb") as fh:
        return read_header(fh)


def _wait_for(predicate, what: str, timeout: float = 90.0, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout}s\n{log}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory):
    """The metadata sink and DICOMweb (no authentication: loopback) beside the session's pipeline."""
    pipeline.start("metadata-sink", "sink", "metadata", settings=SINK_SETTINGS)
    url = pipeline.start_web(
        "dicomweb-prepared", WEB_PORT, "--only", "web", settings={"DIANA_DICOMWEB_METRICS_PORT": str(port(19470))}
    )
    yield url, tmp_path_factory.mktemp("prepared")
    pipeline.stop("dicomweb-prepared")
    if "metadata-sink" in pipeline.procs:
        pipeline.stop("metadata-sink")


def _get(pipeline, url: str) -> tuple[bytes, str]:
    """The answer's body and where the service says it came from (its log line for this request)."""
    before = pipeline.log_text("dicomweb-prepared").count("wado.metadata")
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    lines = []
    deadline = time.monotonic() + 10
    while len(lines) <= before and time.monotonic() < deadline:
        lines = [line for line in pipeline.log_text("dicomweb-prepared").splitlines() if "wado.metadata" in line]
        time.sleep(0.1)
    source = "prepared" if "prepared" in lines[-1] else "per-instance" if "per-instance" in lines[-1] else lines[-1]
    return response.content, source


def test_prepared_files_answer_as_the_index_does_and_an_amended_series_is_prepared_again(pipeline, served):
    url, tmp = served
    cfg = pipeline.cfg
    archive = cfg.path(cfg.storage.archive_dir)
    study = make_study(tmp / "a", [SeriesSpec("CT", "PREP AXIAL", 4), SeriesSpec("CT", "PREP SCOUT", 2)])
    result = storescu(cfg, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    files = {uid: archive / series_metadata_path(study.study_uid, uid) for uid in study.series}
    _wait_for(
        lambda: all(p.exists() for p in files.values()),
        "a prepared metadata file for each completed series",
        log=pipeline.log_text("metadata-sink")[-3000:],
    )
    axial, scout = list(study.series)
    assert _header(files[axial]).indexed_instances == 4 and _header(files[scout]).indexed_instances == 2

    study_url = f"{url}/studies/{study.study_uid}/metadata"
    series_url = f"{url}/studies/{study.study_uid}/series/{axial}/metadata"
    prepared_study, source = _get(pipeline, study_url)
    assert source == "prepared"
    prepared_series, source = _get(pipeline, series_url)
    assert source == "prepared"
    models = json.loads(prepared_study)
    assert len(models) == 6 and len(json.loads(prepared_series)) == 4
    # BulkDataURIs absolute under the URL the client used
    assert all(m["7FE00010"]["BulkDataURI"].startswith(f"{url}/studies/{study.study_uid}/") for m in models)

    # Without the files, the same requests are answered one index document per instance: same bytes.
    aside = {uid: path.rename(path.with_name(".aside")) for uid, path in files.items() if uid == axial}
    assert _get(pipeline, study_url) == (prepared_study, "per-instance")
    assert _get(pipeline, series_url) == (prepared_series, "per-instance")
    aside[axial].rename(files[axial])
    assert _get(pipeline, study_url) == (prepared_study, "prepared")

    # A late instance while the sink is stopped: the file no longer matches the index and is not served.
    revision = _header(files[axial]).revision
    pipeline.stop("metadata-sink")
    late = make_instance(
        study.study_uid, axial, 5, patient_id=study.patient_id, study_date=study.study_date, series_number=1
    )
    late_path = tmp / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    result = storescu(cfg, [late_path])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(cfg)
    stale_series, source = _get(pipeline, series_url)
    assert source == "per-instance" and len(json.loads(stale_series)) == 5
    assert _get(pipeline, study_url)[1] == "per-instance"

    # The sink again: the AMENDED revision rewrites the file, which is served again, equal to the index's answer.
    pipeline.start("metadata-sink", "sink", "metadata", settings=SINK_SETTINGS)
    _wait_for(
        lambda: _header(files[axial]).indexed_instances == 5,
        "the amended series' metadata prepared again",
        log=pipeline.log_text("metadata-sink")[-3000:],
    )
    assert _header(files[axial]).revision > revision
    amended, source = _get(pipeline, series_url)
    assert source == "prepared" and amended == stale_series
    amended_study, source = _get(pipeline, study_url)
    assert source == "prepared" and len(json.loads(amended_study)) == 7
