"""Dose extraction, per-study deduplication and alert rules, on reports built here (no services).

Each expected value is computed by hand from the values the builder writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from diana.producers.header import read_header
from diana.stream_apps.dose.alerts import RulesError, cumulative_alerts, load_rules, study_alerts
from diana.stream_apps.dose.extract import dataset_from_header_json, extract_dose
from diana.stream_apps.dose.study import fold_report, new_study, summarize
from diana.stream_apps.dose.units import UnitError, convert
from tests.support import dosebuilder as b

LEFT = ("G-A101", "SRT", "Left")
RIGHT = ("G-A100", "SRT", "Right")
PLANE_A, PLANE_B = ("113620", "DCM", "Plane A"), ("113621", "DCM", "Plane B")


def through_pipeline(ds) -> tuple[dict, dict] | None:
    """As in the stream: the receiver's JSON header, rebuilt and extracted by the dose worker."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    header = read_header(buf.getvalue())
    return extract_dose(dataset_from_header_json(header.fields["header_json"]))


def fold(*datasets) -> tuple[dict, list[dict]]:
    state = None
    for at, ds in enumerate(datasets):
        report, context = through_pipeline(ds)
        state = state or new_study(context["study_instance_uid"])
        fold_report(state, report, context, at)
    return summarize(state)


def test_multi_event_ct_report():
    study = generate_uid()
    ds = b.ct_report(
        [
            b.ct_event("1.2.3.1", ctdivol="0.5", dlp="10.5", kind=b.CONSTANT_ANGLE),
            b.ct_event("1.2.3.2", ctdivol="12.25", dlp="512.0", kind=b.SPIRAL),
            # Same quantity, other unit spelling and SNOMED CT code: 0.25 Gy.cm = 250 mGy.cm
            b.ct_event("1.2.3.3", ctdivol="8", dlp="0.25", dlp_unit="Gy.cm", kind=b.SPIRAL_SCT),
        ],
        total_dlp="772.5",
        study_uid=study,
    )
    report, context = through_pipeline(ds)
    assert report["kind"] == "CT"
    assert [e["dlp_mGycm"] for e in report["events"]] == [10.5, 512.0, 250.0]
    assert [e["acquisition_type_code"] for e in report["events"]] == ["constant_angle", "spiral", "spiral"]
    assert report["events"][1]["kvp"] == 120.0 and report["events"][1]["tube_current_mA"] == 200.0
    assert report["events"][1]["xray_sources"] == 1.0
    assert context["patient_age_years"] == 44.0  # 1980-03-15 to 2024-03-15: 16071 days / 365.25
    summary, events = fold(ds)
    assert summary["total_dlp_mGycm"] == 772.5 and summary["events"] == 3
    assert (summary["events_spiral"], summary["events_constant_angle"]) == (2, 1)
    assert summary["max_ctdivol_mGy"] == 12.25


def test_continued_reports_count_each_event_once_and_superset_replaces():
    study = generate_uid()
    first = b.ct_report(
        [b.ct_event("9.1", ctdivol="2", dlp="100"), b.ct_event("9.2", ctdivol="3", dlp="200")],
        total_dlp="300",
        study_uid=study,
    )
    overlapping = b.ct_report(
        [b.ct_event("9.2", ctdivol="3", dlp="200"), b.ct_event("9.3", ctdivol="4", dlp="50")],
        total_dlp="250",
        study_uid=study,
    )
    summary, events = fold(first, overlapping)
    # Overlap: totals from the distinct events 9.1, 9.2, 9.3 = 100 + 200 + 50
    assert [e["event_key"] for e in events] == ["9.1", "9.2", "9.3"]
    assert summary["total_dlp_mGycm"] == 350.0 and summary["report_count"] == 2
    superset = b.ct_report(
        [
            b.ct_event("9.1", ctdivol="2", dlp="100"),
            b.ct_event("9.2", ctdivol="3", dlp="200"),
            b.ct_event("9.3", ctdivol="4", dlp="50"),
            b.ct_event("9.4", ctdivol="1", dlp="25"),
        ],
        total_dlp="375",
        study_uid=study,
    )
    summary, events = fold(first, overlapping, superset)
    assert summary["report_count"] == 1 and summary["events"] == 4
    assert summary["total_dlp_mGycm"] == 375.0  # the superset report's own accumulated value
    # The same report twice changes nothing
    assert fold(first, first)[0]["total_dlp_mGycm"] == 300.0


def test_disjoint_reports_sum_their_accumulated_values():
    study = generate_uid()
    a = b.ct_report([b.ct_event("7.1", ctdivol="2", dlp="60.17")], total_dlp="60.17", study_uid=study)
    c = b.ct_report([b.ct_event("7.2", ctdivol="2", dlp="56.44")], total_dlp="56.44", study_uid=study)
    summary, _ = fold(a, c)
    assert math.isclose(summary["total_dlp_mGycm"], 116.61) and summary["events"] == 2


def test_dx_report_converts_dap_units():
    ds = b.dose_report(
        [
            b.accumulated_plane(("113622", "DCM", "Single Plane"), {"dap": ("12.5", "dGy.cm2")}),
            b.projection_event("5.1", dap="12.5", dap_unit="dGy.cm2", dose_rp="0.4"),
        ],
        study_uid=generate_uid(),
        procedure=b.PROJECTION_PROCEDURE,
    )
    report, _ = through_pipeline(ds)
    assert report["kind"] == "DX"
    event = report["events"][0]
    assert math.isclose(event["dap_Gym2"], 12.5e-5) and event["dose_rp_mGy"] == 0.4
    assert event["plane"] == "Single Plane"
    summary, _ = fold(ds)
    assert math.isclose(summary["total_dap_Gym2"], 12.5e-5) and summary["planes"] == 1


def test_rf_two_planes():
    ds = b.dose_report(
        [
            b.accumulated_plane(
                PLANE_A,
                {
                    "dap": ("0.003", "Gy.m2"),
                    "dose_rp": ("40", "mGy"),
                    "fluoro_dap": ("0.002", "Gy.m2"),
                    "fluoro_time": ("120", "s"),
                },
            ),
            b.accumulated_plane(
                PLANE_B,
                {
                    "dap": ("0.001", "Gy.m2"),
                    "dose_rp": ("0.01", "Gy"),
                    "fluoro_dap": ("0.0005", "Gy.m2"),
                    "fluoro_time": ("60", "s"),
                },
            ),
            b.projection_event("6.1", dap="0.002", plane=PLANE_A, fluoro=True),
            b.projection_event("6.2", dap="0.001", plane=PLANE_A),
            b.projection_event("6.3", dap="0.0005", plane=PLANE_B, fluoro=True),
            b.projection_event("6.4", dap="0.0005", plane=PLANE_B),
        ],
        study_uid=generate_uid(),
        procedure=b.PROJECTION_PROCEDURE,
    )
    report, _ = through_pipeline(ds)
    assert report["kind"] == "RF"
    assert [e["plane_id"] for e in report["events"]] == ["A", "A", "B", "B"]
    summary, _ = fold(ds)
    assert summary["planes"] == 2
    assert math.isclose(summary["plane_a_dap_Gym2"], 0.003) and math.isclose(summary["plane_b_dap_Gym2"], 0.001)
    assert math.isclose(summary["total_dap_Gym2"], 0.004)
    assert math.isclose(summary["dose_rp_total_mGy"], 50.0)  # 40 mGy + 0.01 Gy
    assert math.isclose(summary["fluoro_dap_Gym2"], 0.0025) and summary["fluoro_time_s"] == 180.0


def test_mammography_report_by_laterality():
    ds = b.dose_report(
        [
            b.projection_event("8.1", dap="0.00001", agd="1.3", laterality=LEFT, protocol="L CC"),
            b.projection_event("8.2", dap="0.00001", agd="1.1", laterality=LEFT, protocol="L MLO"),
            b.projection_event("8.3", dap="0.00001", agd="1.28", laterality=RIGHT, protocol="R CC"),
        ],
        study_uid=generate_uid(),
        procedure=b.MAMMO_PROCEDURE,
    )
    report, _ = through_pipeline(ds)
    assert report["kind"] == "MG" and [e["laterality"] for e in report["events"]] == ["Left", "Left", "Right"]
    summary, _ = fold(ds)
    assert math.isclose(summary["agd_left_mGy"], 2.4) and math.isclose(summary["agd_right_mGy"], 1.28)


def test_image_headers_when_no_report():
    from tests.support.dicomgen import make_instance

    study = generate_uid()
    series = generate_uid()
    images = []
    for n in (1, 2):
        ds = make_instance(study, series, n, patient_id="HDR1", study_date="20240315", modality="DX")
        ds.ImageAndFluoroscopyAreaDoseProduct = "11.013"  # dGy·cm²
        ds.KVP, ds.ExposureTime, ds.Exposure = "80", "19", "10"
        images.append(ds)
    summary, events = fold(*images)
    assert summary["kind"] == "DX" and summary["events"] == 2 and summary["sources"] == ["IMAGE"]
    assert math.isclose(summary["total_dap_Gym2"], 2 * 11.013e-5)
    assert events[0]["exposure_time_s"] == 0.019 and events[0]["exposure_mAs"] == 10.0
    # A dose report supersedes the headers of its study
    rdsr = b.dose_report(
        [b.projection_event("4.1", dap="0.0003")], study_uid=study, procedure=b.PROJECTION_PROCEDURE, patient_id="HDR1"
    )
    summary, _ = fold(*images, rdsr)
    assert summary["sources"] == ["RDSR"] and math.isclose(summary["total_dap_Gym2"], 0.0003)


def test_ct_image_header_ctdivol_and_mg_organ_dose():
    from tests.support.dicomgen import make_instance

    ct = make_instance(generate_uid(), generate_uid(), 1, patient_id="H2", study_date="20240315")
    ct.CTDIvol = 7.5
    record, _ = through_pipeline(ct)
    assert record["kind"] == "CT" and record["events"][0]["ctdivol_mGy"] == 7.5
    mg = make_instance(generate_uid(), generate_uid(), 1, patient_id="H3", study_date="20240315", modality="MG")
    mg.OrganDose, mg.BodyPartThickness, mg.CompressionForce = "0.01373", "53", "50"
    mg.AnodeTargetMaterial, mg.ImageLaterality = "RHODIUM", "L"
    record, _ = through_pipeline(mg)
    event = record["events"][0]
    assert math.isclose(event["agd_mGy"], 1.373) and event["laterality"] == "Left"
    assert event["anode"] == "Rhodium or Rhodium compound" and event["compression_force_N"] == 50.0


def test_not_a_dose_object():
    from tests.support.dicomgen import make_instance

    plain = make_instance(generate_uid(), generate_uid(), 1, patient_id="N1", study_date="20240315", modality="MR")
    assert through_pipeline(plain) is None
    other_sr = b.dose_report([], study_uid=generate_uid(), procedure=b.CT_PROCEDURE)
    other_sr.ConceptNameCodeSequence = [b.code("18748-4", "LN", "Diagnostic imaging report")]
    assert through_pipeline(other_sr) is None


def test_units_refuse_the_wrong_quantity():
    assert convert(1.0, "dGy.cm2", "dap") == 1e-5
    assert convert(2.0, "uA.s", "charge") == 2e-3
    with pytest.raises(UnitError):
        convert(1.0, "mGy", "dlp")
    ds = b.ct_report(
        [b.ct_event("3.1", ctdivol="5", dlp="100", dlp_unit="mGy")], total_dlp=None, study_uid=generate_uid()
    )
    report, _ = through_pipeline(ds)
    assert "dlp_mGycm" not in report["events"][0]  # a DLP in mGy is refused, not misread


def test_reference_level_and_dose_check_alerts(tmp_path: Path):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "reference_levels:\n  - name: Abd\n    match: {kind: CT, target_region: '(?i)abdomen'}\n"
        "    ctdivol_mGy: 10\n    dlp_mGycm: 250\n"
    )
    rules = load_rules(rules_file)
    ds = b.ct_report(
        [
            b.ct_event("2.1", ctdivol="12", dlp="200"),
            b.ct_event("2.2", ctdivol="4", dlp="80", notification_ctdivol="3"),
        ],
        total_dlp="280",
        study_uid=generate_uid(),
    )
    summary, events = fold(ds)
    alerts = study_alerts(rules, summary, events)
    got = sorted((a["rule_type"], a["metric"], a["value"], a["threshold"]) for a in alerts)
    assert got == [
        ("dose_check", "ctdivol_mGy", 4.0, 3.0),
        ("reference_level", "ctdivol_mGy", 12.0, 10.0),
        ("reference_level", "dlp_mGycm", 280.0, 250.0),
    ]
    assert len({a["alert_id"] for a in alerts}) == 3
    assert {a["alert_id"] for a in study_alerts(rules, summary, events)} == {a["alert_id"] for a in alerts}


def test_cumulative_alert_over_a_rolling_window(tmp_path: Path):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("cumulative:\n  - {name: 12w, metric: total_dlp_mGycm, window_days: 84, threshold: 1000}\n")
    rules = load_rules(rules_file)
    studies = [
        {"study_instance_uid": "1", "study_date": "2024-01-01", "total_dlp_mGycm": 600.0},
        {"study_instance_uid": "2", "study_date": "2024-03-01", "total_dlp_mGycm": 300.0},
        {"study_instance_uid": "3", "study_date": "2024-03-20", "total_dlp_mGycm": 200.0},
    ]
    # 2024-03-20 minus 84 days = 2023-12-27: all three, 1100 > 1000
    [alert] = cumulative_alerts(rules, studies, studies[2])
    assert alert["value"] == 1100.0 and alert["window_study_uids"] == ["1", "2", "3"]
    # Two days later the January study has left the window: 500, no alert
    later = {"study_instance_uid": "4", "study_date": "2024-03-26", "total_dlp_mGycm": 0.0}
    assert cumulative_alerts(rules, [*studies, later], later) == []


@pytest.mark.parametrize(
    "text,message",
    [
        ("reference_levels:\n  - {name: X, match: {colour: red}, ctdivol_mGy: 1}\n", "cannot match on 'colour'"),
        ("reference_levels:\n  - {name: X, ctdivol_mGy: -1}\n", "positive number"),
        ("reference_levels:\n  - {name: X, ctdi: 5}\n", "unknown limit 'ctdi'"),
        ("cumulative:\n  - {name: C, metric: dlp, window_days: 84, threshold: 1}\n", "metric must be one of"),
        ("alarms: []\n", "unknown section 'alarms'"),
    ],
)
def test_bad_rules_name_the_fix(tmp_path: Path, text: str, message: str):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError, match=message):
        load_rules(path)
