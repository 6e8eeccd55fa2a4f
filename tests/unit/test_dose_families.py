"""Dose from the families beyond the RDSR: PET/NM images, dose screens, dual-source CT, mammography
For Presentation, dental, mobile C-arms; and size-specific dose (AAPM 204/220). No services.

Every object is built from the attributes and concepts the standard defines (tests/support/
doseimages.py, dosebuilder.py); each expected value is worked out by hand beside its assertion.
"""

from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from diana.producers.header import read_header
from diana.stream_apps.dose.agent import may_carry_dose
from diana.stream_apps.dose.extract import dataset_from_header_json, extract_dose
from diana.stream_apps.dose.image_files import ImageFiles
from diana.stream_apps.dose.size import (
    conversion_factor,
    event_ssde,
    image_water_equivalent_diameter_mm,
    water_equivalent_diameter_mm,
)
from diana.stream_apps.dose.study import fold_report, fold_size, new_study, summarize
from tests.support import dosebuilder as b
from tests.support import doseimages as img


def instance_of(ds) -> dict:
    """The instance event fields the dose worker reads, from the receiver's own header reader."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    header = read_header(buf.getvalue())
    return {
        **header.fields,
        "sop_class_uid": header.sop_class_uid,
        "sop_instance_uid": header.sop_instance_uid,
        "study_instance_uid": header.study_instance_uid,
        "series_instance_uid": header.series_instance_uid,
    }


def extracted(ds) -> tuple[dict, dict]:
    instance = instance_of(ds)
    assert may_carry_dose(instance), "the worker's pre-filter must let this object through"
    result = extract_dose(dataset_from_header_json(instance["header_json"]))
    assert result is not None
    return result


def fold(*datasets) -> tuple[dict, list[dict]]:
    state = None
    for at, ds in enumerate(datasets):
        report, context = extracted(ds)
        state = state or new_study(context["study_instance_uid"])
        fold_report(state, report, context, at)
    return summarize(state)


# ---- 1. PET and NM image headers
def test_pet_images_give_one_administration_per_series_in_mbq():
    study, series = generate_uid(), generate_uid()
    # PET Isotope Module: Radionuclide Total Dose in Bq; 370 000 000 Bq = 370 MBq.
    pets = [
        img.radiopharmaceutical(study, pet=True, activity="370000000", series_uid=series, number=n) for n in (1, 2, 3)
    ]
    report, context = extracted(pets[0])
    event = report["events"][0]
    assert report["kind"] == "NM" and report["source"] == "IMAGE"
    assert event["administered_activity_MBq"] == 370.0
    assert event["radiopharmaceutical"] == "Fluorodeoxyglucose F^18^" and event["radionuclide"] == "^18^Fluorine"
    assert event["datetime_started"] == "20240315083045" and event["radionuclide_half_life_s"] == 6586.2
    assert context["patient_weight_kg"] == 72.5
    summary, events = fold(*pets)
    # The three images repeat one administration: one event, 370 MBq (not 1110).
    assert summary["events"] == 1 and summary["administered_activity_MBq"] == 370.0 and len(events) == 1


def test_nm_image_activity_is_already_in_mbq():
    report, _ = extracted(img.radiopharmaceutical(generate_uid(), pet=False, activity="740"))
    assert report["events"][0]["administered_activity_MBq"] == 740.0
    assert report["events"][0]["radionuclide"] == "^99m^Technetium"


# ---- 2. Secondary capture dose screens (Exposure Dose Sequence)
def test_ct_dose_screen_gives_one_event_per_exposure_dose_item():
    screen = img.ct_dose_screen(
        generate_uid(),
        img.SCOUT_AND_SPIRAL,
    )
    report, _ = extracted(screen)
    assert report["kind"] == "CT" and len(report["events"]) == 2
    scout, spiral = report["events"]
    assert scout["acquisition_type_code"] == "constant_angle" and spiral["acquisition_type_code"] == "spiral"
    # 245 000 uA = 245 mA; 6150 ms = 6.15 s
    assert spiral["tube_current_mA"] == 245.0 and spiral["exposure_time_s"] == 6.15
    assert spiral["ctdivol_mGy"] == 9.75 and spiral["scan_length_mm"] == 420.0 and spiral["phantom_cm"] == 32
    assert spiral["protocol"] == "Abdomen" and "dlp_mGycm" not in spiral  # no standard attribute holds a DLP
    assert report["accumulated"]["events_reported"] == 2.0
    summary, _ = fold(screen)
    assert (
        summary["max_ctdivol_mGy"] == 9.75 and summary["events_spiral"] == 1 and summary["events_constant_angle"] == 1
    )


# ---- 3. Dual-source CT
def test_dual_source_ct_keeps_source_b():
    event = b.ct_event_with(
        "7.7.1",
        ctdivol="11.5",
        dlp="420",
        # Source B listed first: it is found by its identification, not its position.
        sources=[b.ct_source("B", "140", "95", "110", "0.28"), b.ct_source("A", "80", "410", "500", "0.28")],
    )
    ds = b.ct_report([event], total_dlp="420", study_uid=generate_uid())
    report, _ = extracted(ds)
    ev = report["events"][0]
    assert (ev["source_b_kvp"], ev["source_b_tube_current_mA"], ev["source_b_max_tube_current_mA"]) == (
        140.0,
        95.0,
        110.0,
    )
    assert ev["source_b_exposure_time_per_rotation_s"] == 0.28 and ev["xray_sources"] == 2.0
    assert [s["source"] for s in ev["xray_source_parameters"]] == ["B", "A"]
    assert all(s["exposure_time_per_rotation_s"] == 0.28 for s in ev["xray_source_parameters"])


def test_single_source_ct_has_no_source_b():
    ds = b.ct_report([b.ct_event("7.8.1", ctdivol="5", dlp="100")], total_dlp="100", study_uid=generate_uid())
    report, _ = extracted(ds)
    assert not any(k.startswith("source_b_") for k in report["events"][0])


# ---- 4. Mammography For Presentation and For Processing
def test_mammography_for_presentation_and_processing_are_one_exposure():
    study = generate_uid()
    rcc_processing = img.mammogram(
        study, presentation=False, side="R", view="CC", acquired="20240315101010.250", organ_dose_dGy="0.0142"
    )
    # The For Presentation image of the same exposure, without an organ dose (it still is the exposure).
    rcc_presentation = img.mammogram(
        study, presentation=True, side="R", view="CC", acquired="20240315101010.250", organ_dose_dGy=None
    )
    lcc_presentation = img.mammogram(
        study, presentation=True, side="L", view="CC", acquired="20240315101130.500", organ_dose_dGy="0.0131"
    )
    report, _ = extracted(rcc_presentation)
    assert report["kind"] == "MG" and report["events"][0]["presentation_intent"] == "FOR PRESENTATION"
    assert report["events"][0]["kvp"] == 29.0 and report["events"][0]["exposure_mAs"] == 112.0
    summary, events = fold(rcc_presentation, rcc_processing, lcc_presentation)
    assert summary["events"] == 2  # R CC once, L CC once
    right = next(e for e in events if e["laterality"] == "Right")
    assert math.isclose(right["agd_mGy"], 1.42)  # 0.0142 dGy, taken from the For Processing image
    assert math.isclose(summary["agd_right_mGy"], 1.42) and math.isclose(summary["agd_left_mGy"], 1.31)


def test_an_object_of_another_class_at_the_same_time_is_another_exposure():
    # A combo exposure's tomo projection object (Secondary Capture, modality MG) shares the 2D
    # image's acquisition time; it is not the 2D image's other form (OpenREM issue 125).
    study = generate_uid()
    image = img.mammogram(
        study, presentation=True, side="R", view="CC", acquired="20240315101010", organ_dose_dGy="0.01"
    )
    tomo = img.mammogram(
        study, presentation=True, side="R", view="CC", acquired="20240315101010", organ_dose_dGy="0.02"
    )
    tomo.SOPClassUID = tomo.file_meta.MediaStorageSOPClassUID = img.SECONDARY_CAPTURE
    del tomo.PresentationIntentType
    summary, _ = fold(image, tomo)
    assert summary["events"] == 2 and math.isclose(summary["agd_right_mGy"], 3.0)


def test_mammograms_with_irradiation_event_uid_are_keyed_by_it():
    study = generate_uid()
    one = img.mammogram(
        study,
        presentation=True,
        side="L",
        view="MLO",
        acquired="20240315101500",
        organ_dose_dGy="0.012",
        event_uid="9.9.1",
    )
    two = img.mammogram(
        study,
        presentation=False,
        side="L",
        view="MLO",
        acquired="20240315101501",
        organ_dose_dGy="0.012",
        event_uid="9.9.1",
    )
    summary, events = fold(one, two)
    assert summary["events"] == 1 and events[0]["irradiation_event_uid"] == "9.9.1"


# ---- 5. Dental and mobile C-arm
def test_dental_panoramic_technique_is_an_exposure():
    report, _ = extracted(img.dental(generate_uid(), "PX"))
    event = report["events"][0]
    assert report["kind"] == "DX" and event["kvp"] == 70.0 and event["exposure_mAs"] == 112.0
    assert event["exposure_time_s"] == 14.0  # 14000 ms


def test_cone_beam_ct_gives_a_dap_event_per_series():
    study, series = generate_uid(), generate_uid()
    summary, events = fold(*(img.cone_beam_ct(study, series, n) for n in (1, 2, 3)))
    # Every image repeats the scan's 5.6 dGy·cm² = 5.6e-5 Gy·m²: one event.
    assert summary["events"] == 1 and math.isclose(summary["total_dap_Gym2"], 5.6e-5)
    assert events[0]["acquisition_type_code"] == "cone_beam"


def test_c_arm_procedure_step_totals_count_once_with_the_latest_values():
    study = generate_uid()
    images = [
        img.c_arm_image(study, number=1, dap_dGycm2="12.0", fluoro_s=30, exposures=1),
        img.c_arm_image(study, number=2, dap_dGycm2="20.5", fluoro_s=55, exposures=2),
    ]
    summary, events = fold(*images)
    assert summary["kind"] == "RF" and summary["events"] == 1
    assert math.isclose(summary["total_dap_Gym2"], 20.5e-5) and summary["fluoro_time_s"] == 55.0
    assert events[0]["exposures"] == 2.0


# ---- SSDE: AAPM 204 conversion factors
@pytest.mark.parametrize(
    ("diameter_cm", "phantom_cm", "tabulated"),
    [
        # AAPM Report 204 Table 1D (32 cm phantom) and Table 1B (16 cm phantom), two decimals.
        (8, 32, 2.76),
        (20, 32, 1.78),
        (30, 32, 1.23),
        (45, 32, 0.71),
        (8, 16, 1.38),
        (20, 16, 0.86),
    ],
)
def test_conversion_factor_reproduces_the_tabulated_values(diameter_cm, phantom_cm, tabulated):
    assert round(conversion_factor(diameter_cm, phantom_cm), 2) == tabulated


def test_conversion_factor_refuses_unknown_phantoms_and_sizes():
    with pytest.raises(ValueError, match="16, 32"):
        conversion_factor(20, 10)
    with pytest.raises(ValueError, match="positive"):
        conversion_factor(0, 32)


# ---- SSDE: AAPM 220 water-equivalent diameter
def test_water_equivalent_diameter_of_water_and_denser_cylinders():
    # A 1 mm grid: a water disc (0 HU) of radius 40 mm in air has Dw = its diameter, about 80 mm.
    water = img.water_phantom_ct(generate_uid(), generate_uid(), 1, radius_mm=40, hu_inside=0)
    assert abs(image_water_equivalent_diameter_mm(water) - 80.0) < 1.0
    # At +1000 HU each pixel counts twice: Aw doubles, Dw grows by sqrt(2).
    dense = img.water_phantom_ct(generate_uid(), generate_uid(), 1, radius_mm=40, hu_inside=1000)
    assert abs(image_water_equivalent_diameter_mm(dense) - 80.0 * math.sqrt(2)) < 1.5
    assert water_equivalent_diameter_mm([-1000.0] * 10, 1.0) is None  # all air: no patient


def test_localizer_is_not_measured():
    scout = img.water_phantom_ct(generate_uid(), generate_uid(), 1, radius_mm=40, hu_inside=0)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert image_water_equivalent_diameter_mm(scout) is None


def test_image_files_finds_the_landing_copy_then_the_archive(tmp_path: Path):
    study, series = generate_uid(), generate_uid()
    ds = img.water_phantom_ct(study, series, 1, radius_mm=30, hu_inside=0)
    files = ImageFiles(tmp_path / "landing", tmp_path / "archive")
    instance = {
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_instance_uid": ds.SOPInstanceUID,
        "landing_path": "x/1.dcm",
    }
    assert files.read(instance) is None
    archived = tmp_path / "archive" / study / series / f"{ds.SOPInstanceUID}.dcm"
    archived.parent.mkdir(parents=True)
    ds.save_as(archived, enforce_file_format=True)
    assert abs(image_water_equivalent_diameter_mm(files.read(instance)) - 60.0) < 1.0


# ---- SSDE per event and per study
def test_ssde_from_the_report_diameter_from_images_and_as_reported():
    study = generate_uid()
    wed = b.with_method(b.num("28", "113980", "cm"), ("113987", "DCM", "AAPM 220"))
    reported = b.with_method(
        b.num("14.2", "113930", "mGy"), ("113988", "DCM", "Estimated from Water Equivalent Diameter")
    )
    events = [
        b.ct_event_with(
            "5.1", ctdivol="10", dlp="400", sources=[b.ct_source("A", "120", "200", "250", "0.5")], size_items=[wed]
        ),
        b.ct_event_with("5.2", ctdivol="8", dlp="300", sources=[b.ct_source("A", "120", "200", "250", "0.5")]),
        b.ct_event_with(
            "5.3",
            ctdivol="12",
            dlp="480",
            sources=[b.ct_source("A", "120", "200", "250", "0.5")],
            size_items=[reported],
        ),
    ]
    ds = b.ct_report(events, total_dlp="1180", study_uid=study)
    report, context = extracted(ds)
    state = new_study(study)
    fold_report(state, report, context, 0)
    summary, out = summarize(state)
    by_uid = {e["irradiation_event_uid"]: e for e in out}
    # 5.1: Dw 28 cm from the report; f = 3.704369·exp(−0.03671937·28) = 1.3263; SSDE = 13.263 mGy
    f28 = 3.704369 * math.exp(-0.03671937 * 28)
    assert (
        math.isclose(by_uid["5.1"]["ssde_mGy"], round(10 * f28, 4))
        and "from the dose report" in by_uid["5.1"]["ssde_method"]
    )
    assert by_uid["5.1"]["report_water_equivalent_diameter_method"] == "AAPM 220"
    # 5.2: no size yet; 5.3: the report's own SSDE, with its method.
    assert "ssde_mGy" not in by_uid["5.2"]
    assert (
        by_uid["5.3"]["ssde_mGy"] == 14.2 and "Estimated from Water Equivalent Diameter" in by_uid["5.3"]["ssde_method"]
    )
    # Two axial images measured 250 and 270 mm: mean Dw(z) 260 mm applies to 5.2.
    fold_size(state, "1.1", "s", 250.0)
    fold_size(state, "1.2", "s", 270.0)
    assert not fold_size(state, "1.2", "s", 270.0)  # the same image twice counts once
    summary, out = summarize(state)
    e52 = next(e for e in out if e["irradiation_event_uid"] == "5.2")
    assert math.isclose(e52["ssde_mGy"], round(8 * 3.704369 * math.exp(-0.03671937 * 26), 4))
    assert e52["ssde_method"].startswith("AAPM 220 mean Dw(z) of 2 axial images")
    assert summary["water_equivalent_diameter_mm"] == 260.0 and summary["size_images"] == 2
    assert summary["max_ssde_mGy"] == 14.2


def test_each_ct_event_gets_the_diameter_of_its_own_images():
    """A head scan (Dw 160 mm) and a body scan (Dw 300 mm) in one study: each event's SSDE uses the
    images its irradiation event made ((0008,3010) on the images), not one mean over both (230 mm),
    which gave the head 38.5 mGy for 50.5; images without the event's UID fall back to the study."""
    study = generate_uid()
    source = [b.ct_source("A", "120", "200", "250", "0.5")]
    events = [
        b.ct_event_with("7.1", ctdivol="50", dlp="800", sources=source),
        b.ct_event_with("7.2", ctdivol="10", dlp="500", sources=source),
    ]
    report, context = extracted(b.ct_report(events, total_dlp="1300", study_uid=study))
    for event in report["events"]:
        event["phantom_cm"] = 16 if event["irradiation_event_uid"] == "7.1" else 32
    state = new_study(study)
    fold_report(state, report, context, 0)
    for n in range(3):
        fold_size(state, f"h{n}", "HEAD", 160.0, "7.1")
        fold_size(state, f"b{n}", "BODY", 300.0, "7.2")
    summary, out = summarize(state)
    by_uid = {e["irradiation_event_uid"]: e for e in out}
    head, body = by_uid["7.1"], by_uid["7.2"]
    assert head["size_diameter_mm"] == 160.0 and body["size_diameter_mm"] == 300.0
    assert math.isclose(head["ssde_mGy"], round(50 * 1.874799 * math.exp(-0.03871313 * 16), 4))
    assert "axial images of its irradiation event" in head["ssde_method"]
    assert summary["water_equivalent_diameter_mm"] == 230.0  # the study's, as a description
    state["sizes"] = {k: {**v, "event": None} for k, v in state["sizes"].items()}  # images that do not say
    _, out = summarize(state)
    assert all(e["size_diameter_mm"] == 230.0 and "of the study" in e["ssde_method"] for e in out)


def test_head_phantom_uses_the_16_cm_fit():
    event = {"ctdivol_mGy": 50.0, "phantom_cm": 16, "report_effective_diameter_mm": 160.0}
    out = event_ssde(event, None)
    assert math.isclose(out["ssde_conversion_factor"], round(1.874799 * math.exp(-0.03871313 * 16), 4))
    assert "16 cm phantom" in out["ssde_method"] and "AAPM 204 effective diameter" in out["ssde_method"]


# ---- the worker's choices before parsing
def test_worker_parses_per_series_images_once_and_samples_ct_images():
    from diana.stream_apps.dose.agent import _series_done, _size_sample

    study, series = generate_uid(), generate_uid()
    first = instance_of(img.radiopharmaceutical(study, pet=True, activity="1", series_uid=series, number=1))
    second = instance_of(img.radiopharmaceutical(study, pet=True, activity="1", series_uid=series, number=2))
    state = new_study(study)
    assert not _series_done(state, first)
    report, context = extracted(img.radiopharmaceutical(study, pet=True, activity="1", series_uid=series))
    fold_report(state, report, context, 0)
    assert _series_done(state, second)  # the series' administration is already counted
    other = instance_of(img.radiopharmaceutical(study, pet=True, activity="1", number=1))
    assert not _series_done(state, other)  # another series
    ct = {"modality": "CT", "instance_number": 11}
    assert _size_sample(ct, 10) and not _size_sample({**ct, "instance_number": 12}, 10)
    assert not _size_sample(ct, 0) and not _size_sample({**ct, "modality": "MR"}, 10)


def test_worker_tells_a_redelivered_object_from_another_instance_of_its_series():
    """An object already in the state (a redelivery) re-sends the study's outputs; another image does not."""
    from diana.stream_apps.dose.agent import _already_folded

    study, series = generate_uid(), generate_uid()
    first = instance_of(img.radiopharmaceutical(study, pet=True, activity="1", series_uid=series, number=1))
    second = instance_of(img.radiopharmaceutical(study, pet=True, activity="1", series_uid=series, number=2))
    state = new_study(study)
    assert not _already_folded(None, first) and not _already_folded(state, first)
    report, context = extracted(img.radiopharmaceutical(study, pet=True, activity="1", series_uid=series))
    report["sop_instance_uid"] = first["sop_instance_uid"]
    assert fold_report(state, report, context, 0)
    assert not fold_report(state, report, context, 5)  # the same object again folds to no change...
    assert _already_folded(state, first)  # ...and is known as a redelivery
    assert not _already_folded(state, second)
    state["sizes"] = {second["sop_instance_uid"]: {"series": series, "dw_mm": 250.0}}
    assert _already_folded(state, second)  # a size sample already measured


def test_a_damaged_image_file_gives_no_size_and_no_crash(tmp_path: Path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    landing = tmp_path / "landing" / "x.dcm"
    landing.parent.mkdir()
    landing.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # a preamble, then garbage
    files = ImageFiles(tmp_path / "landing", tmp_path / "archive")
    instance = {
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_instance_uid": sop,
        "landing_path": "x.dcm",
    }
    ds = files.read(instance)  # pydicom may read such a file leniently, as an empty data set
    assert ds is None or image_water_equivalent_diameter_mm(ds) is None


# ---- what a dose report supersedes, and reports of odd content (from a dose audit, stop 33)
def test_a_ct_report_keeps_the_pet_activity_of_a_pet_ct_study():
    """The CT report superseded every image header of the study: the PET images' 370 MBq was gone, and
    the PET images that came after it were no longer read. It supersedes the CT images' only."""
    from diana.stream_apps.dose.agent import _series_done

    study = generate_uid()
    pet = img.radiopharmaceutical(study, pet=True, activity="370000000", series_uid=generate_uid(), number=1)
    ct = b.ct_report(
        [b.ct_event_with("8.1", ctdivol="5", dlp="200", sources=[b.ct_source("A", "120", "200", "250", "0.5")])],
        total_dlp="200",
        study_uid=study,
    )
    summary, _ = fold(pet, ct)
    assert summary["administered_activity_MBq"] == 370.0 and summary["total_dlp_mGycm"] == 200.0
    state = new_study(study)
    fold_report(state, *extracted(ct), 0)
    assert not _series_done(state, {"modality": "PT", "series_instance_uid": "9.9", "header_json": "{}"})
    assert _series_done(state, {"modality": "CT", "series_instance_uid": "9.8", "header_json": '{"00189345": {}}'})


def test_a_report_of_totals_only_is_not_replaced_by_an_unrelated_report():
    study = generate_uid()
    totals_only = b.ct_report([], total_dlp="700", study_uid=study)
    other = b.ct_report(
        [b.ct_event_with("8.2", ctdivol="3", dlp="60", sources=[b.ct_source("A", "120", "200", "250", "0.5")])],
        total_dlp="60",
        study_uid=study,
    )
    summary, _ = fold(totals_only, other)
    assert summary["total_dlp_mGycm"] == 760.0 and summary["report_count"] == 2


def test_a_reported_size_of_zero_is_no_size():
    """A report with Water Equivalent Diameter 0 crashed the dose worker (ValueError in summarize)."""
    event = {"ctdivol_mGy": 10.0, "phantom_cm": 32, "report_water_equivalent_diameter_mm": 0.0}
    assert event_ssde(event, None) == {}
    with_images = event_ssde(event, 250.0, 4)
    assert with_images["size_diameter_mm"] == 250.0 and "4 axial images" in with_images["ssde_method"]


def test_a_dose_reports_modality_is_the_one_the_dose_was_given_by():
    """An RDSR's own Modality is SR: `match: {modality: CT}` never matched a CT dose report."""
    ct = b.ct_report(
        [b.ct_event_with("8.3", ctdivol="3", dlp="60", sources=[b.ct_source("A", "120", "200", "250", "0.5")])],
        total_dlp="60",
        study_uid=generate_uid(),
    )
    assert ct.Modality == "SR"
    report, context = extracted(ct)
    assert (report["kind"], context["modality"]) == ("CT", "CT")


def test_a_pet_ct_study_with_a_totals_only_ct_report_keeps_its_dlp_and_is_a_ct_study():
    """Two PET series (AC and NAC) repeat one administration: that shared event made the CT total come
    from CT events, of which a totals-only report has none (DLP None). The study stays kind CT (what
    standard names, levels and dashboards go by) and its modality CT, whatever arrives after the report."""
    study = generate_uid()
    ct = b.ct_report([], total_dlp="700", study_uid=study)
    pets = [
        img.radiopharmaceutical(study, pet=True, activity="370000000", series_uid=generate_uid(), number=1)
        for _ in range(2)
    ]
    summary, _ = fold(pets[0], ct, pets[1])
    assert summary["total_dlp_mGycm"] == 700.0 and summary["administered_activity_MBq"] == 370.0
    assert (summary["kind"], summary["modality"]) == ("CT", "CT")


def test_cone_beam_ct_images_are_not_taken_for_the_ct_reports():
    """A cone-beam CT image (modality CT, a DAP, no CTDIvol) is projection X-ray: a CT report does not
    supersede it, so whether it came before or after the report, it is read and counted the same."""
    from diana.stream_apps.dose.agent import _series_done

    study = generate_uid()
    ct = b.ct_report(
        [b.ct_event_with("8.4", ctdivol="5", dlp="200", sources=[b.ct_source("A", "120", "200", "250", "0.5")])],
        total_dlp="200",
        study_uid=study,
    )
    cone = img.cone_beam_ct(study, generate_uid(), 1)
    before, _ = fold(cone, ct)
    after, _ = fold(ct, cone)
    assert before["total_dap_Gym2"] == after["total_dap_Gym2"] is not None
    state = new_study(study)
    fold_report(state, *extracted(ct), 0)
    assert not _series_done(state, instance_of(cone))


def test_a_study_with_reports_of_two_kinds_has_one_modality_whatever_their_order():
    study = generate_uid()
    ct = b.ct_report(
        [b.ct_event_with("8.5", ctdivol="3", dlp="60", sources=[b.ct_source("A", "120", "200", "250", "0.5")])],
        total_dlp="60",
        study_uid=study,
    )
    xa = b.dose_report([b.projection_event("8.6", dap="0.001")], study_uid=study, procedure=b.PROJECTION_PROCEDURE)
    one, _ = fold(ct, xa)
    other, _ = fold(xa, ct)
    assert one["modality"] == other["modality"] and one["kind"] == other["kind"]


def test_c_arm_procedure_step_totals_are_the_largest_whichever_image_arrives_last():
    """Two images of one step arriving in reverse order (a retried association, parallel sends): before,
    the last to arrive won, and the study kept the earlier, smaller totals (12.0 of 20.5 dGy·cm²)."""
    study = generate_uid()
    first = img.c_arm_image(study, number=1, dap_dGycm2="12.0", fluoro_s=30, exposures=1)
    second = img.c_arm_image(study, number=2, dap_dGycm2="20.5", fluoro_s=55, exposures=2)
    summary, events = fold(second, first)
    assert summary["events"] == 1 and math.isclose(summary["total_dap_Gym2"], 20.5e-5)
    assert summary["fluoro_time_s"] == 55.0 and events[0]["exposures"] == 2.0
