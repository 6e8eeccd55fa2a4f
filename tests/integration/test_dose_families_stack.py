"""On the real stack: the families beyond the CT/projection dose report reach OpenSearch.

Sent with storescu: a PET series (four images repeating one administration), a CT dose screen
stored as a Secondary Capture with an Exposure Dose Sequence, a mammography exposure as its For
Processing and For Presentation images plus a second exposure, and a dual-source CT dose report.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydicom.uid import generate_uid

from tests.integration.test_dose_stack import wait_for_docs
from tests.support import dosebuilder as b
from tests.support import doseimages as img
from tests.support.helpers import os_search, storescu, wait_until_caught_up


def _study(cfg, uid: str) -> dict:
    [doc], _ = wait_for_docs(cfg, "diana-dose-studies", {"term": {"study_instance_uid": uid}}, 1)
    return doc


def test_pet_dose_screen_mammography_and_dual_source_reach_opensearch(pipeline, tmp_path: Path):
    cfg = pipeline.cfg
    pet_study, pet_series = generate_uid(), generate_uid()
    files = [
        b.save(
            img.radiopharmaceutical(pet_study, pet=True, activity="370000000", series_uid=pet_series, number=n),
            tmp_path / f"pet{n}.dcm",
        )
        for n in (1, 2, 3, 4)
    ]
    screen_study = generate_uid()
    files.append(
        b.save(
            img.ct_dose_screen(
                screen_study,
                img.SCOUT_AND_SPIRAL,
            ),
            tmp_path / "screen.dcm",
        )
    )
    mg_study = generate_uid()
    for name, presentation, side, time, dose in (
        ("rcc-proc", False, "R", "20240315101010.250", "0.0142"),
        ("rcc-pres", True, "R", "20240315101010.250", None),
        ("lcc-pres", True, "L", "20240315101130.500", "0.0131"),
    ):
        ds = img.mammogram(
            mg_study, presentation=presentation, side=side, view="CC", acquired=time, organ_dose_dGy=dose
        )
        files.append(b.save(ds, tmp_path / f"{name}.dcm"))
    dual_study = generate_uid()
    dual = b.ct_event_with(
        generate_uid(),
        ctdivol="11.5",
        dlp="420",
        sources=[b.ct_source("A", "80", "410", "500", "0.28"), b.ct_source("B", "140", "95", "110", "0.28")],
    )
    files.append(b.save(b.ct_report([dual], total_dlp="420", study_uid=dual_study), tmp_path / "dual.dcm"))
    result = storescu(cfg, files)
    assert result.returncode == 0, result.stdout + result.stderr

    _study(cfg, pet_study)
    wait_until_caught_up(cfg)
    pet = os_search(cfg, "diana-dose-studies", {"term": {"study_instance_uid": pet_study}})[0]
    assert (pet["kind"], pet["sources"], pet["events"]) == ("NM", ["IMAGE"], 1)
    assert pet["administered_activity_MBq"] == 370.0 and pet["radionuclide"] == "^18^Fluorine"
    assert pet["patient_weight_kg"] == 72.5
    assert len(os_search(cfg, "diana-dose-events", {"term": {"study_instance_uid": pet_study}})) == 1

    screen = os_search(cfg, "diana-dose-studies", {"term": {"study_instance_uid": screen_study}})[0]
    assert (screen["kind"], screen["events"], screen["max_ctdivol_mGy"]) == ("CT", 2, 9.75)
    events = os_search(cfg, "diana-dose-events", {"term": {"study_instance_uid": screen_study}})
    spiral = next(e for e in events if e["acquisition_type_code"] == "spiral")
    assert spiral["tube_current_mA"] == 245.0 and spiral["exposure_time_s"] == 6.15

    mg = os_search(cfg, "diana-dose-studies", {"term": {"study_instance_uid": mg_study}})[0]
    assert mg["kind"] == "MG" and mg["events"] == 2
    assert math.isclose(mg["agd_right_mGy"], 1.42) and math.isclose(mg["agd_left_mGy"], 1.31)

    [event] = os_search(cfg, "diana-dose-events", {"term": {"study_instance_uid": dual_study}})
    assert (event["source_b_kvp"], event["source_b_tube_current_mA"], event["kvp"]) == (140.0, 95.0, 80.0)
    assert [s["source"] for s in event["xray_source_parameters"]] == ["A", "B"]
