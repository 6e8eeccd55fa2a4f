"""On the real stack: standard names, reference levels and SSDE from sampled CT images.

A CT study of water-cylinder images (real pixel values) and its dose report, sent by storescu,
comes out of the dose worker with its standard name, its DRL verdict against the local level, one
`drl` alert, and SSDE computed from the water-equivalent diameter the worker measured on the image
it read from the landing store or archive. `diana dose names` and `diana dose drl` then read the
indices. Names and levels: tests/support/data/dose-standard-names.yaml, dose-reference-levels.yaml.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from pydicom.uid import generate_uid

from tests.integration.test_dose_stack import wait_for_docs
from tests.support import dosebuilder as b
from tests.support import doseimages as img
from tests.support.helpers import os_search, storescu, wait_until_caught_up
from tests.support.paths import REPO


def diana(pipeline, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(pipeline.config_file)
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


def test_standard_name_drl_and_ssde_from_images(pipeline, tmp_path: Path):
    cfg = pipeline.cfg
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for n in (1, 2, 3):
        ds = img.water_phantom_ct(study_uid, series_uid, n, radius_mm=60, hu_inside=0, size=128)
        ds.PatientID = "SSDEPAT1"
        files.append(b.save(ds, tmp_path / f"ct{n}.dcm"))
    rdsr = b.ct_report(
        [
            b.ct_event(generate_uid(), ctdivol="65", dlp="500", protocol="DRL Head"),
            b.ct_event(generate_uid(), ctdivol="40", dlp="400", protocol="DRL Head"),
            b.ct_event(generate_uid(), ctdivol="0.2", dlp="5", protocol="Unmapped Scout Xyz"),
        ],
        total_dlp="905",
        study_uid=study_uid,
        patient_id="SSDEPAT1",
    )
    files.append(b.save(rdsr, tmp_path / "rdsr.dcm"))
    result = storescu(cfg, files)
    assert result.returncode == 0, result.stdout + result.stderr
    by_study = {"term": {"study_instance_uid": study_uid}}
    alerts, _ = wait_for_docs(
        cfg, "diana-dose-alerts", {"bool": {"filter": [by_study, {"term": {"rule_type": "drl"}}]}}, 1
    )
    wait_until_caught_up(cfg)

    [study] = os_search(cfg, "diana-dose-studies", by_study)
    assert (study["standard_name"], study["body_region"]) == ("CT Head", "Head")
    # 905 mGy·cm against the local level 850 (the national 970 is not the one applied)
    assert (study["drl_metric"], study["drl_value"], study["drl_level"]) == ("total_dlp_mGycm", 905.0, 850.0)
    assert study["drl_source"] == "local" and study["over_drl"] is True
    # Image 1 of 3 was sampled: a 60 mm water cylinder has Dw of about 120 mm.
    assert study["size_images"] == 1 and abs(study["water_equivalent_diameter_mm"] - 120.0) < 2.0

    events = {e["ctdivol_mGy"]: e for e in os_search(cfg, "diana-dose-events", by_study)}
    head = events[65.0]
    assert head["standard_name"] == "CT Head" and head["over_drl"] is True and head["drl_level"] == 60.0
    assert events[40.0]["over_drl"] is False and events[0.2].get("standard_name") is None
    factor = 3.704369 * math.exp(-0.03671937 * study["water_equivalent_diameter_mm"] / 10)
    assert math.isclose(head["ssde_mGy"], 65 * factor, rel_tol=1e-3)
    assert head["ssde_method"].startswith("AAPM 220 mean Dw(z) of 1 axial images")
    assert study["max_ssde_mGy"] == head["ssde_mGy"]

    [alert] = alerts
    assert alert["value"] == 905.0 and alert["threshold"] == 850.0 and alert["rule"] == "DRL CT Head"

    names = diana(pipeline, "dose", "names")
    assert names.returncode == 0, names.stderr
    line = next(row for row in names.stdout.splitlines() if row.endswith("Unmapped Scout Xyz"))
    assert line.split()[:3] == ["1", "protocol", "CT"]
    assert "DRL Head" not in names.stdout

    survey = diana(pipeline, "dose", "drl")
    assert survey.returncode == 0, survey.stderr
    row = next(r for r in survey.stdout.splitlines() if r.startswith("CT Head"))
    assert "905" in row and "OVER" in row
