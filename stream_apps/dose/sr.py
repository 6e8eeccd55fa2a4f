"""Dose events from Radiation Dose Structured Reports, whatever their SOP class.

A report is recognised by its root concept (X-Ray Radiation Dose Report or Radiopharmaceutical
Radiation Dose Report), not by its SOP class: Enhanced and Comprehensive SR carry the same tree.
Every value is found by concept code and converted to the canonical unit (units.py); the
CodeMeaning of a coded *value* (e.g. "Spiral Acquisition") is kept as display text, while counts
and decisions use the code.
"""

from __future__ import annotations

from pydicom import Dataset

from diana.stream_apps.dose import concepts as C
from diana.stream_apps.dose.content import Item
from diana.stream_apps.dose.context import without_none

__all__ = ["DoseReport", "read_dose_report"]

DoseReport = dict  # {"kind", "sop_instance_uid", "events": [...], "accumulated": {...}}

_CT_TYPES = {
    "sequenced": C.SEQUENCED,
    "spiral": C.SPIRAL,
    "constant_angle": C.CONSTANT_ANGLE,
    "stationary": C.STATIONARY,
    "free": C.FREE,
    "cone_beam": C.CONE_BEAM,
}


def _yes_no(item: Item | None, concept) -> bool | None:
    code = None if item is None else item.code(concept)
    return True if code in C.YES else False if code in C.NO else None


def _phantom_cm(code: tuple[str, str] | None) -> int | None:
    return 16 if code in C.HEAD_PHANTOM else 32 if code in C.BODY_PHANTOM else None


def _source_parameters(source: Item) -> dict:
    return without_none(
        {
            "source": source.text(C.SOURCE_ID),
            "kvp": source.num(C.KVP, "voltage"),
            "max_tube_current_mA": source.num(C.MAX_TUBE_CURRENT, "current"),
            "tube_current_mA": source.num(C.TUBE_CURRENT, "current"),
            "exposure_time_per_rotation_s": source.num(C.EXPOSURE_TIME_PER_ROTATION, "time"),
            # A few dual-source reports put the exposure time in each source container (TID 10014 has
            # it per acquisition); kept per source when it is there.
            "exposure_time_s": source.num(C.EXPOSURE_TIME, "time"),
        }
    )


def _second_source(sources: list[Item]) -> dict:
    """Source B of a dual-source scanner (TID 10014, 113832 Identification of the X-Ray Source).

    Source B is the container identified "B" (any case); without identifications, the second one.
    """
    if len(sources) < 2:
        return {}
    named = [s for s in sources if (s.text(C.SOURCE_ID) or "").strip().upper() == "B"]
    second = _source_parameters(named[0] if named else sources[1])
    return {
        "source_b_kvp": second.get("kvp"),
        "source_b_tube_current_mA": second.get("tube_current_mA"),
        "source_b_max_tube_current_mA": second.get("max_tube_current_mA"),
        "source_b_exposure_time_per_rotation_s": second.get("exposure_time_per_rotation_s"),
        "source_b_exposure_time_s": second.get("exposure_time_s"),
    }


def _size(dose: Item) -> dict:
    """Patient size and SSDE as the report states them (TID 10013 CT Dose, CP-1525), with their method."""
    ssde = dose.deep(C.SSDE)
    wed = dose.deep(C.WATER_EQUIVALENT_DIAMETER)
    return {
        "report_ssde_mGy": None if ssde is None else ssde.number("dose"),
        "report_ssde_method": None if ssde is None else ssde.meaning(C.MEASUREMENT_METHOD),
        "report_water_equivalent_diameter_mm": None if wed is None else wed.number("length"),
        "report_water_equivalent_diameter_method": None if wed is None else wed.meaning(C.MEASUREMENT_METHOD),
        "report_effective_diameter_mm": dose.num(C.DERIVED_EFFECTIVE_DIAMETER, "length", deep=True),
        "report_lateral_dimension_mm": dose.num(C.MEASURED_LATERAL_DIMENSION, "length", deep=True),
        "report_ap_dimension_mm": dose.num(C.MEASURED_AP_DIMENSION, "length", deep=True),
    }


def _ct_event(acquisition: Item) -> dict:
    params = acquisition.first(C.CT_ACQUISITION_PARAMETERS) or Item(Dataset())
    sources = params.all(C.CT_SOURCE_PARAMETERS)
    first_source = sources[0] if sources else Item(Dataset())
    dose = acquisition.first(C.CT_DOSE) or Item(Dataset())
    alert, notification = dose.first(C.DOSE_CHECK_ALERT), dose.first(C.DOSE_CHECK_NOTIFICATION)
    type_code = acquisition.code(C.CT_ACQUISITION_TYPE)
    return without_none(
        {
            "irradiation_event_uid": acquisition.uid(C.IRRADIATION_EVENT_UID),
            "protocol": acquisition.text(C.ACQUISITION_PROTOCOL),
            "target_region": acquisition.meaning(C.TARGET_REGION),
            "acquisition_type": acquisition.meaning(C.CT_ACQUISITION_TYPE),
            "acquisition_type_code": next((k for k, c in _CT_TYPES.items() if type_code in c), None),
            "ctdivol_mGy": dose.num(C.MEAN_CTDIVOL, "dose"),
            "dlp_mGycm": dose.num(C.DLP, "dlp"),
            "phantom": dose.meaning(C.PHANTOM_TYPE),
            "phantom_cm": _phantom_cm(dose.code(C.PHANTOM_TYPE)),
            "scan_length_mm": params.num(C.SCANNING_LENGTH, "length"),
            "exposure_time_s": params.num(C.EXPOSURE_TIME, "time"),
            "collimation_single_mm": params.num(C.SINGLE_COLLIMATION, "length"),
            "collimation_total_mm": params.num(C.TOTAL_COLLIMATION, "length"),
            "pitch": params.num(C.PITCH, "ratio"),
            "xray_sources": params.num(C.XRAY_SOURCES, "ratio"),
            # The first source; dual-source scanners list a second one, kept in xray_source_parameters.
            "kvp": first_source.num(C.KVP, "voltage"),
            "max_tube_current_mA": first_source.num(C.MAX_TUBE_CURRENT, "current"),
            "tube_current_mA": first_source.num(C.TUBE_CURRENT, "current"),
            "exposure_time_per_rotation_s": first_source.num(C.EXPOSURE_TIME_PER_ROTATION, "time"),
            "xray_source_parameters": [_source_parameters(source) for source in sources] or None,
            **_second_source(sources),
            **_size(dose),
            "dose_check_dlp_alert_configured": _yes_no(alert, C.DLP_ALERT_CONFIGURED),
            "dose_check_ctdivol_alert_configured": _yes_no(alert, C.CTDIVOL_ALERT_CONFIGURED),
            "dose_check_dlp_alert_mGycm": alert and alert.num(C.DLP_ALERT_VALUE, "dlp"),
            "dose_check_ctdivol_alert_mGy": alert and alert.num(C.CTDIVOL_ALERT_VALUE, "dose"),
            "dose_check_accumulated_dlp_forward_estimate_mGycm": alert
            and alert.num(C.ACCUMULATED_DLP_FORWARD_ESTIMATE, "dlp"),
            "dose_check_accumulated_ctdivol_forward_estimate_mGy": alert
            and alert.num(C.ACCUMULATED_CTDIVOL_FORWARD_ESTIMATE, "dose"),
            "dose_check_reason_for_proceeding": alert and alert.text(C.REASON_FOR_PROCEEDING, deep=True),
            "dose_check_dlp_notification_configured": _yes_no(notification, C.DLP_NOTIFICATION_CONFIGURED),
            "dose_check_ctdivol_notification_configured": _yes_no(notification, C.CTDIVOL_NOTIFICATION_CONFIGURED),
            "dose_check_dlp_notification_mGycm": notification and notification.num(C.DLP_NOTIFICATION_VALUE, "dlp"),
            "dose_check_ctdivol_notification_mGy": notification
            and notification.num(C.CTDIVOL_NOTIFICATION_VALUE, "dose"),
            "dose_check_dlp_forward_estimate_mGycm": notification and notification.num(C.DLP_FORWARD_ESTIMATE, "dlp"),
            "dose_check_ctdivol_forward_estimate_mGy": notification
            and notification.num(C.CTDIVOL_FORWARD_ESTIMATE, "dose"),
        }
    )


def _plane(code) -> str | None:
    return "A" if code in C.PLANE_A or code in C.SINGLE_PLANE else "B" if code in C.PLANE_B else None


def _laterality(item: Item) -> str | None:
    modifier = item.deep(C.LATERALITY)
    return None if modifier is None else modifier.value_meaning


def _projection_event(event: Item, default_plane: tuple[str | None, str | None]) -> dict:
    plane_item = event.deep(C.ACQUISITION_PLANE)
    plane_code = plane_item.value_code if plane_item else None
    return without_none(
        {
            "irradiation_event_uid": event.uid(C.IRRADIATION_EVENT_UID),
            "datetime_started": event.datetime(C.DATETIME_STARTED),
            "plane": plane_item.value_meaning if plane_item else default_plane[1],
            "plane_id": _plane(plane_code) if plane_item else default_plane[0],
            "event_type": event.meaning(C.EVENT_TYPE),
            "fluoroscopy": event.code(C.EVENT_TYPE) in C.FLUOROSCOPY if event.first(C.EVENT_TYPE) else None,
            "protocol": event.text(C.ACQUISITION_PROTOCOL),
            "target_region": event.meaning(C.TARGET_REGION),
            "laterality": _laterality(event),
            "dap_Gym2": event.num(C.DAP, "dap"),
            "dose_rp_mGy": event.num(C.DOSE_RP, "dose"),
            "kvp": event.num(C.KVP, "voltage", deep=True),
            "tube_current_mA": event.num(C.TUBE_CURRENT, "current", deep=True),
            "exposure_time_s": event.num(C.EXPOSURE_TIME, "time", deep=True),
            "exposure_mAs": event.num(C.EXPOSURE, "charge", deep=True),
            "irradiation_duration_s": event.num(C.IRRADIATION_DURATION, "time", deep=True),
            "pulses": event.num(C.NUMBER_OF_PULSES, "ratio", deep=True),
            "exposure_index": event.num(C.EXPOSURE_INDEX, "ratio", deep=True),
            "target_exposure_index": event.num(C.TARGET_EXPOSURE_INDEX, "ratio", deep=True),
            "deviation_index": event.num(C.DEVIATION_INDEX, "ratio", deep=True),
            "agd_mGy": event.num(C.AGD, "dose", deep=True),
            "hvl_mm": event.num(C.HVL, "length", deep=True),
            "entrance_exposure_rp_mGy": event.num(C.ENTRANCE_EXPOSURE_RP, "dose", deep=True),
            "compression_thickness_mm": event.num(C.COMPRESSION_THICKNESS, "length", deep=True),
            "anode": event.meaning(C.ANODE_TARGET_MATERIAL, deep=True),
        }
    )


_PLANE_TOTALS = {
    "dap_Gym2": (C.DAP_TOTAL, "dap"),
    "dose_rp_mGy": (C.DOSE_RP_TOTAL, "dose"),
    "fluoro_dap_Gym2": (C.FLUORO_DAP_TOTAL, "dap"),
    "acquisition_dap_Gym2": (C.ACQUISITION_DAP_TOTAL, "dap"),
    "fluoro_dose_rp_mGy": (C.FLUORO_DOSE_RP_TOTAL, "dose"),
    "acquisition_dose_rp_mGy": (C.ACQUISITION_DOSE_RP_TOTAL, "dose"),
    "fluoro_time_s": (C.TOTAL_FLUORO_TIME, "time"),
    "acquisition_time_s": (C.TOTAL_ACQUISITION_TIME, "time"),
    "radiographic_frames": (C.TOTAL_RADIOGRAPHIC_FRAMES, "ratio"),
}


def _plane_totals(container: Item) -> tuple[str, dict]:
    plane = _plane(container.code(C.ACQUISITION_PLANE)) or "A"
    totals = {name: container.num(concept, quantity, deep=True) for name, (concept, quantity) in _PLANE_TOTALS.items()}
    for item in container.descendants():
        if item.concept in C.ACCUMULATED_AGD:
            side = item.code(C.LATERALITY)
            key = (
                "agd_left_mGy"
                if side in C.LEFT_BREAST or side in C.LEFT
                else "agd_right_mGy"
                if side in C.RIGHT_BREAST or side in C.RIGHT
                else "agd_mGy"
            )
            totals[key] = item.number("dose")
    return plane, without_none(totals)


def _projection(root: Item) -> tuple[str, list[dict], dict]:
    planes = dict(_plane_totals(container) for container in root.all(C.ACCUMULATED_XRAY))
    containers = root.all(C.ACCUMULATED_XRAY)
    default: tuple[str | None, str | None] = (None, None)
    if len(containers) == 1:
        plane_item = containers[0].first(C.ACQUISITION_PLANE)
        if plane_item is not None:
            default = (_plane(plane_item.value_code), plane_item.value_meaning)
    events = [_projection_event(event, default) for event in root.all(C.XRAY_EVENT)]
    mammography = (
        root.code(C.PROCEDURE_REPORTED) in C.MAMMOGRAPHY
        or any("agd_mGy" in e for e in events)
        or any(k.startswith("agd") for p in planes.values() for k in p)
    )
    fluoro = any(e.get("fluoroscopy") for e in events) or any("fluoro_time_s" in p for p in planes.values())
    kind = "MG" if mammography else "RF" if fluoro else "DX"
    return kind, events, {"planes": planes}


def _radiopharmaceutical(root: Item) -> tuple[str, list[dict], dict]:
    events = [
        without_none(
            {
                "irradiation_event_uid": admin.uid(C.ADMINISTRATION_EVENT_UID),
                "radiopharmaceutical": admin.meaning(C.RADIOPHARMACEUTICAL_AGENT, deep=True),
                "radionuclide": admin.meaning(C.RADIONUCLIDE, deep=True),
                "administered_activity_MBq": admin.num(C.ADMINISTERED_ACTIVITY, "activity", deep=True),
                "datetime_started": admin.datetime(C.RADIOPHARMACEUTICAL_START, deep=True),
            }
        )
        for admin in root.all(C.RADIOPHARMACEUTICAL_ADMINISTRATION)
    ]
    return "NM", events, {}


def _ct(root: Item) -> tuple[str, list[dict], dict]:
    accumulated = root.first(C.CT_ACCUMULATED) or Item(Dataset())
    events = [_ct_event(acquisition) for acquisition in root.all(C.CT_ACQUISITION)]
    return (
        "CT",
        events,
        without_none(
            {
                "total_dlp_mGycm": accumulated.num(C.CT_DLP_TOTAL, "dlp"),
                "events_reported": accumulated.num(C.CT_TOTAL_EVENTS, "ratio"),
            }
        ),
    )


def read_dose_report(ds: Dataset) -> DoseReport | None:
    """The dose events and accumulated values of a dose SR; None for anything that is not one."""
    if "ContentSequence" not in ds:
        return None
    root = Item(ds)
    if root.concept in C.RADIOPHARMACEUTICAL_DOSE_REPORT:
        kind, events, accumulated = _radiopharmaceutical(root)
    elif root.concept in C.XRAY_DOSE_REPORT:
        if root.first(C.CT_ACQUISITION) or root.first(C.CT_ACCUMULATED):
            kind, events, accumulated = _ct(root)
        else:
            kind, events, accumulated = _projection(root)
    else:
        return None
    for index, event in enumerate(events):
        event["index"] = index
    return {
        "kind": kind,
        "source": "RDSR",
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")) or None,
        "events": events,
        "accumulated": accumulated,
    }
