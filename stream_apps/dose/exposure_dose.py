"""Dose events from a Radiation Dose Module's Exposure Dose Sequence (0040,030E), e.g. CT dose screens.

PS3.3 C.4.16 Radiation Dose Module (a performed procedure step's totals) may sit in any object; CT
scanners without a dose report store a dose screen as a Secondary Capture that carries it, with one
item per exposure. Each item gives an event:
- standard item attributes: Radiation Mode (0018,115A), KVP (0018,0060), X-Ray Tube Current in uA
  (0018,8151), Exposure Time (0018,1150) in ms, Filter Type (0018,1160), Filter Material (0018,7050),
  Comments on Radiation Dose (0040,0310);
- attributes of the CT modules that dose screens add to the items: Acquisition Type (0018,9302),
  CTDIvol (0018,9345), Scan Length (0018,1302 — in mm, though the dictionary gives no unit; OpenREM
  reads it the same), Single / Total Collimation Width (0018,9306 / 9307), Spiral Pitch Factor
  (0018,9311), Acquisition DateTime (0008,002A), Series Description (0008,103E) as the protocol,
  CTDI Phantom Type Code Sequence (0018,9346).
No standard attribute holds a DLP, so a dose screen's events have none unless the screen states it
(the per-vendor private DLP tags are not read).
"""

from __future__ import annotations

from pydicom import Dataset

from diana.stream_apps.dose.context import text_value, without_none
from diana.stream_apps.dose.header_values import code_meaning, first, number, phantom_cm

__all__ = ["read_exposure_dose_sequence"]

# (0018,9302) Acquisition Type defined terms, as the SR's CT Acquisition Type codes.
_ACQUISITION_TYPES = {
    "SEQUENCED": ("sequenced", "Sequenced Acquisition"),
    "SPIRAL": ("spiral", "Spiral Acquisition"),
    "CONSTANT_ANGLE": ("constant_angle", "Constant Angle Acquisition"),
    "STATIONARY": ("stationary", "Stationary Acquisition"),
    "FREE": ("free", "Free Acquisition"),
    "CONE_BEAM": ("cone_beam", "Cone Beam Acquisition"),
}


def _event(item: Dataset, sop: str | None, index: int) -> dict:
    acquisition = _ACQUISITION_TYPES.get((text_value(item, "AcquisitionType") or "").upper())
    uid = text_value(item, "IrradiationEventUID")
    return without_none(
        {
            "event_key": uid or f"exposure:{sop}#{index}",
            "irradiation_event_uid": uid,
            "protocol": text_value(item, "SeriesDescription") or text_value(item, "ProtocolName"),
            "acquisition_type_code": acquisition[0] if acquisition else None,
            "acquisition_type": acquisition[1] if acquisition else None,
            "datetime_started": text_value(item, "AcquisitionDateTime"),
            "kvp": number(item, "KVP"),
            "tube_current_mA": first(number(item, "XRayTubeCurrentInuA", 1e-3), number(item, "XRayTubeCurrent")),
            "exposure_time_s": first(number(item, "ExposureTimeInuS", 1e-6), number(item, "ExposureTime", 1e-3)),
            "ctdivol_mGy": number(item, "CTDIvol"),
            "scan_length_mm": number(item, "ScanLength"),
            "collimation_single_mm": number(item, "SingleCollimationWidth"),
            "collimation_total_mm": number(item, "TotalCollimationWidth"),
            "pitch": number(item, "SpiralPitchFactor"),
            "phantom": code_meaning(item, "CTDIPhantomTypeCodeSequence"),
            "phantom_cm": phantom_cm(item),
            "dap_Gym2": number(item, "ImageAndFluoroscopyAreaDoseProduct", 1e-5),
            "event_type": text_value(item, "RadiationMode"),
        }
    )


def read_exposure_dose_sequence(ds: Dataset) -> dict | None:
    """A record with one event per Exposure Dose Sequence item; None when the object has no such item."""
    items = ds.get("ExposureDoseSequence") or []
    if not items:
        return None
    sop = text_value(ds, "SOPInstanceUID")
    events = [_event(item, sop, index) for index, item in enumerate(items)]
    events = [e for e in events if len(e) > 1]  # more than the key: the item says something
    if not events:
        return None
    for index, event in enumerate(events):
        event["index"] = index
    ct = text_value(ds, "Modality") == "CT" or any(
        "ctdivol_mGy" in e or "acquisition_type_code" in e or "scan_length_mm" in e for e in events
    )
    modality = text_value(ds, "Modality")
    accumulated = without_none(
        {
            "events_reported": number(ds, "TotalNumberOfExposures"),
            "fluoro_time_s": number(ds, "TotalTimeOfFluoroscopy"),
        }
    )
    if not ct:
        for event in events:
            event["plane_id"] = "A"
    return {
        "kind": "CT" if ct else "RF" if modality in ("RF", "XA") else "DX",
        "source": "IMAGE",
        "sop_instance_uid": sop,
        "series_instance_uid": text_value(ds, "SeriesInstanceUID"),
        "events": events,
        "accumulated": accumulated,
    }
