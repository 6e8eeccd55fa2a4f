"""On the real stack: a CT study with its dose report sent by storescu yields dose events, study
totals and alerts in OpenSearch (rules: tests/support/data/dose-rules.yaml)."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom.uid import generate_uid

from tests.support import dosebuilder as b
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import os_search, storescu, wait_until_caught_up


def wait_for_docs(cfg, index: str, query: dict, count: int, timeout: float = 90.0) -> tuple[list[dict], float]:
    started = time.monotonic()
    docs: list[dict] = []
    while time.monotonic() - started < timeout:
        docs = os_search(cfg, index, query) if _exists(cfg, index) else []
        if len(docs) >= count:
            return docs, time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{index}: {len(docs)} documents for {query}, expected {count}")


def _exists(cfg, index: str) -> bool:
    from opensearchpy import OpenSearch

    return OpenSearch(hosts=[cfg.opensearch.url]).indices.exists_alias(name=index)


def ct_study_with_report(folder: Path, patient_id: str, study_date: str, spiral_dlp: str):
    study = make_study(
        folder, [SeriesSpec("CT", "ABDOMEN 5mm", 5, body_part="ABDOMEN")], patient_id=patient_id, study_date=study_date
    )
    rdsr = b.ct_report(
        [
            b.ct_event(generate_uid(), ctdivol="0.3", dlp="10", kind=b.CONSTANT_ANGLE),
            b.ct_event(generate_uid(), ctdivol="18.5", dlp=spiral_dlp),
        ],
        total_dlp=str(10 + float(spiral_dlp)),
        study_uid=study.study_uid,
        patient_id=patient_id,
        study_date=study_date,
    )
    return study, b.save(rdsr, folder / "rdsr.dcm")


def test_ct_study_with_dose_report_gives_events_totals_and_alerts(pipeline, tmp_path: Path):
    cfg = pipeline.cfg
    study, rdsr = ct_study_with_report(tmp_path / "s1", "DOSEPAT1", "20240301", spiral_dlp="790")
    sent = time.monotonic()
    result = storescu(cfg, [*study.files, rdsr])
    assert result.returncode == 0, result.stdout + result.stderr
    by_study = {"term": {"study_instance_uid": study.study_uid}}

    alerts, _ = wait_for_docs(cfg, "diana-dose-alerts", by_study, 2)
    print(f"first alerts searchable {time.monotonic() - sent:.1f} s after storescu started")
    got = sorted((a["rule_type"], a["metric"], a["value"], a["threshold"]) for a in alerts)
    assert got == [("reference_level", "ctdivol_mGy", 18.5, 15.0), ("reference_level", "dlp_mGycm", 800.0, 700.0)]
    assert {a["patient_id"] for a in alerts} == {"DOSEPAT1"} and {a["kind"] for a in alerts} == {"CT"}

    wait_until_caught_up(cfg)
    events = os_search(cfg, "diana-dose-events", by_study)
    assert sorted(e["ctdivol_mGy"] for e in events) == [0.3, 18.5]
    assert {e["source"] for e in events} == {"RDSR"}  # the images' CTDIvol does not count beside a report
    [record] = os_search(cfg, "diana-dose-studies", by_study)
    assert record["total_dlp_mGycm"] == 800.0 and record["events"] == 2 and record["patient_id"] == "DOSEPAT1"
    assert record["events_spiral"] == 1 and record["events_constant_angle"] == 1

    # The same report again (a modality re-sending): nothing doubles
    result = storescu(cfg, [rdsr])
    assert result.returncode == 0
    wait_until_caught_up(cfg)
    assert len(os_search(cfg, "diana-dose-events", by_study)) == 2
    assert os_search(cfg, "diana-dose-studies", by_study)[0]["total_dlp_mGycm"] == 800.0
    assert len(os_search(cfg, "diana-dose-alerts", by_study)) == 2

    # A second study of the same patient 4 weeks later: 800 + 800 over 12 weeks exceeds 1500
    second, rdsr2 = ct_study_with_report(tmp_path / "s2", "DOSEPAT1", "20240329", spiral_dlp="790")
    assert storescu(cfg, [*second.files, rdsr2]).returncode == 0
    cumulative, _ = wait_for_docs(cfg, "diana-dose-alerts", {"term": {"rule_type": "cumulative"}}, 1)
    [alert] = cumulative
    assert alert["value"] == 1600.0 and alert["threshold"] == 1500.0
    assert sorted(alert["window_study_uids"]) == sorted([study.study_uid, second.study_uid])


def test_ct_images_without_report_give_a_header_record(pipeline, tmp_path: Path):
    from pydicom import dcmread

    cfg = pipeline.cfg
    study = make_study(tmp_path, [SeriesSpec("CT", "HEAD", 3, body_part="HEAD")], patient_id="DOSEPAT2")
    for path in study.files:
        ds = dcmread(path)
        ds.CTDIvol = 42.0
        ds.save_as(path)
    assert storescu(cfg, study.files).returncode == 0
    docs, _ = wait_for_docs(cfg, "diana-dose-studies", {"term": {"study_instance_uid": study.study_uid}}, 1)
    assert docs[0]["sources"] == ["IMAGE"] and docs[0]["max_ctdivol_mGy"] == 42.0 and docs[0]["events"] == 1
