"""Dose values from image headers, for studies whose modality sends no dose report.

CT images carry CTDIvol (one event per series), projection images their area dose product and
exposure indices, mammography images the organ (average glandular) dose, breast thickness and
compression force (one event per image).
"""

from __future__ import annotations

from pydicom import Dataset

from diana.stream_apps.dose.context import text_value, without_none

__all__ = ["read_header_dose"]

_ANODES = {
    "MOLYBDENUM": "Molybdenum or Molybdenum compound",
    "RHODIUM": "Rhodium or Rhodium compound",
    "TUNGSTEN": "Tungsten or Tungsten compound",
    "SILVER": "Silver or Silver compound",
}
_SIDES = {"L": "Left", "R": "Right", "B": "Both"}
_PROJECTION = {"CR", "DX", "RF", "XA", "PX", "IO", "MG"}


def _num(ds: Dataset, keyword: str, factor: float = 1.0) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value) * factor
    except (TypeError, ValueError, IndexError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _technique(ds: Dataset) -> dict:
    return {
        "kvp": _num(ds, "KVP"),
        "tube_current_mA": _first(_num(ds, "XRayTubeCurrentInuA", 1e-3), _num(ds, "XRayTubeCurrent")),
        "exposure_time_s": _first(_num(ds, "ExposureTimeInuS", 1e-6), _num(ds, "ExposureTime", 1e-3)),
        "exposure_mAs": _first(_num(ds, "ExposureInuAs", 1e-3), _num(ds, "Exposure")),
        "protocol": text_value(ds, "ProtocolName") or text_value(ds, "AcquisitionDeviceProcessingDescription"),
        "target_region": text_value(ds, "BodyPartExamined"),
    }


def read_header_dose(ds: Dataset) -> dict | None:
    """A one-event dose record from an image header; None when the header holds no dose value."""
    modality = text_value(ds, "Modality")
    sop = text_value(ds, "SOPInstanceUID")
    if modality == "CT":
        ctdivol = _num(ds, "CTDIvol")
        if ctdivol is None:
            return None
        # Every image of a series repeats the series' CTDIvol: one event per series.
        event = {"event_key": f"series:{text_value(ds, 'SeriesInstanceUID')}", "ctdivol_mGy": ctdivol, **_technique(ds)}
        kind = "CT"
    elif modality in _PROJECTION:
        event = {
            "event_key": f"image:{sop}",
            # (0018,115E) is in dGy·cm²; (0040,0316) OrganDose in dGy.
            "dap_Gym2": _num(ds, "ImageAndFluoroscopyAreaDoseProduct", 1e-5),
            "entrance_dose_mGy": _num(ds, "EntranceDoseInmGy"),
            "exposure_index": _num(ds, "ExposureIndex"),
            "target_exposure_index": _num(ds, "TargetExposureIndex"),
            "deviation_index": _num(ds, "DeviationIndex"),
            **_technique(ds),
        }
        if modality == "MG":
            event.update(
                {
                    "agd_mGy": _num(ds, "OrganDose", 100.0),
                    "compression_thickness_mm": _num(ds, "BodyPartThickness"),
                    "compression_force_N": _num(ds, "CompressionForce"),
                    "anode": _ANODES.get((text_value(ds, "AnodeTargetMaterial") or "").upper()),
                    "laterality": _SIDES.get(text_value(ds, "ImageLaterality") or text_value(ds, "Laterality") or ""),
                }
            )
        if not any(event.get(k) is not None for k in ("dap_Gym2", "entrance_dose_mGy", "agd_mGy", "exposure_index")):
            return None
        kind = "MG" if modality == "MG" else "RF" if modality in ("RF", "XA") else "DX"
        event["plane_id"] = "A"
    else:
        return None
    event["index"] = 0
    return {
        "kind": kind,
        "source": "IMAGE",
        "sop_instance_uid": sop,
        "events": [without_none(event)],
        "accumulated": {},
    }
