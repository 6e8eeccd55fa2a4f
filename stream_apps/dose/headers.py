"""Dose values from image headers, for studies whose modality sends no dose report.

- CT images carry CTDIvol (0018,9345): one event per series; the reconstructed series of one
  acquisition (the same Irradiation Event UID (0008,3010), else the same acquisition number and
  date/time, and the same dose value) count as one, the first to arrive (study.py). Dental and other
  cone-beam CT that gives an area dose product (0018,115E) instead gives one DAP event per series.
- Projection images (CR, DX, RF, XA, PX, IO, MG): one event per exposure. The event is the image's
  Irradiation Event UID (0008,3010) when present, else the acquisition (date, time, laterality,
  view), else the image: so a mammography For Presentation image and the For Processing image of
  the same exposure are one event, whichever arrives, and values either one lacks are taken from
  the other (study.py merges header events by key).
- Mammography, dental (PX panoramic, IO intra-oral) images give an event from their technique
  (kVp with mAs or tube current) even without a dose attribute: the exposure happened.
- A Radiation Dose Module with procedure-step totals (Total Time of Fluoroscopy (0040,0300) or
  Total Number of Exposures (0040,0301)) — as mobile C-arms write into every image — is the step's
  total, not the image's: it gives one event per performed procedure step, holding the largest
  running totals of its images (study.py), whichever image arrives last.
- PET and NM images: radiopharmaceutical_headers.py; an Exposure Dose Sequence (CT dose screens
  stored as secondary captures): exposure_dose.py.
"""

from __future__ import annotations

from pydicom import Dataset

from diana.stream_apps.dose.context import text_value, without_none
from diana.stream_apps.dose.exposure_dose import read_exposure_dose_sequence
from diana.stream_apps.dose.header_values import first, number, phantom_cm
from diana.stream_apps.dose.radiopharmaceutical_headers import read_radiopharmaceutical_header

__all__ = ["read_header_dose"]

_ANODES = {
    "MOLYBDENUM": "Molybdenum or Molybdenum compound",
    "RHODIUM": "Rhodium or Rhodium compound",
    "TUNGSTEN": "Tungsten or Tungsten compound",
    "SILVER": "Silver or Silver compound",
}
_SIDES = {"L": "Left", "R": "Right", "B": "Both"}
_PROJECTION = {"CR", "DX", "RF", "XA", "PX", "IO", "MG"}
_TECHNIQUE_IS_AN_EXPOSURE = {"MG", "PX", "IO"}
_INTENTS = {
    "1.2.840.10008.5.1.4.1.1.1.2": "FOR PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "FOR PROCESSING",
    "1.2.840.10008.5.1.4.1.1.1.1": "FOR PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "FOR PROCESSING",
    "1.2.840.10008.5.1.4.1.1.1.3": "FOR PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "FOR PROCESSING",
}


def _technique(ds: Dataset) -> dict:
    return {
        "kvp": number(ds, "KVP"),
        "tube_current_mA": first(number(ds, "XRayTubeCurrentInuA", 1e-3), number(ds, "XRayTubeCurrent")),
        "exposure_time_s": first(number(ds, "ExposureTimeInuS", 1e-6), number(ds, "ExposureTime", 1e-3)),
        "exposure_mAs": first(number(ds, "ExposureInuAs", 1e-3), number(ds, "Exposure")),
        "protocol": text_value(ds, "ProtocolName") or text_value(ds, "AcquisitionDeviceProcessingDescription"),
        "target_region": text_value(ds, "BodyPartExamined"),
    }


def _exposure_key(ds: Dataset) -> tuple[str, str | None]:
    """(event key, Irradiation Event UID) of a projection image: shared by its For Presentation/Processing forms."""
    uid = text_value(ds, "IrradiationEventUID")
    if uid:
        return uid, uid
    date = text_value(ds, "AcquisitionDate") or text_value(ds, "ContentDate")
    time = text_value(ds, "AcquisitionTime")
    acquired = text_value(ds, "AcquisitionDateTime") or (f"{date}{time}" if date and time else None)
    if acquired:
        side = text_value(ds, "ImageLaterality") or text_value(ds, "Laterality") or ""
        view = text_value(ds, "ViewPosition") or ""
        station = text_value(ds, "StationName") or ""
        # Only the two forms of one IOD pair up: a Hologic combo exposure's 2D image and its tomo
        # projection object (a Secondary Capture) share the acquisition time (OpenREM issue 125).
        sop_class = text_value(ds, "SOPClassUID") or ""
        family = sop_class[:-2] if _INTENTS.get(sop_class) == "FOR PROCESSING" else sop_class
        return f"exposure:{station}|{acquired}|{side}|{view}|{family}", None
    return f"image:{text_value(ds, 'SOPInstanceUID')}", None


def _acquisition(ds: Dataset) -> str | None:
    """What a CT series was reconstructed from, so that the series of one acquisition (a 5 mm and a 1 mm
    reconstruction of one spiral) are one exposure (study.py): its Irradiation Event UID (0008,3010),
    else its acquisition number and date/time; None when the image says neither."""
    uid = text_value(ds, "IrradiationEventUID")
    if uid:
        return f"uid:{uid}"
    date, time = text_value(ds, "AcquisitionDate"), text_value(ds, "AcquisitionTime")
    acquired = text_value(ds, "AcquisitionDateTime") or (f"{date}{time}" if date and time else None)
    if not acquired:
        return None
    return f"acquired:{text_value(ds, 'StationName') or ''}|{text_value(ds, 'AcquisitionNumber') or ''}|{acquired}"


def _ct(ds: Dataset) -> dict | None:
    # The key stays the series (alert ids are made of it: a replay must find the same ones); the
    # acquisition only folds series of one exposure together.
    series = f"series:{text_value(ds, 'SeriesInstanceUID')}"
    ctdivol = number(ds, "CTDIvol")
    if ctdivol is not None:
        # Every image of a series repeats the series' CTDIvol: one event per series.
        event = {
            "event_key": series,
            "acquisition": _acquisition(ds),
            "ctdivol_mGy": ctdivol,
            "phantom_cm": phantom_cm(ds),
            **_technique(ds),
        }
        return {"kind": "CT", "event": event}
    dap = number(ds, "ImageAndFluoroscopyAreaDoseProduct", 1e-5)
    if dap is None:
        return None
    # Cone-beam CT (dental, ENT) states an area dose product per scan, and no CTDIvol.
    event = {"event_key": series, "acquisition": _acquisition(ds), "dap_Gym2": dap, "plane_id": "A", **_technique(ds)}
    event.update(acquisition_type_code="cone_beam", acquisition_type="Cone Beam Acquisition")
    return {"kind": "DX", "event": event}


def _procedure_step_totals(ds: Dataset) -> bool:
    return ds.get("TotalTimeOfFluoroscopy") not in (None, "") or ds.get("TotalNumberOfExposures") not in (None, "")


def _projection(ds: Dataset, modality: str) -> dict | None:
    key, uid = _exposure_key(ds)
    event = {
        "event_key": key,
        "irradiation_event_uid": uid,
        # (0018,115E) is in dGy·cm²; (0040,0316) OrganDose in dGy; (0040,0302) Entrance Dose in dGy.
        "dap_Gym2": number(ds, "ImageAndFluoroscopyAreaDoseProduct", 1e-5),
        "entrance_dose_mGy": first(number(ds, "EntranceDoseInmGy"), number(ds, "EntranceDose", 100.0)),
        "exposure_index": number(ds, "ExposureIndex"),
        "target_exposure_index": number(ds, "TargetExposureIndex"),
        "deviation_index": number(ds, "DeviationIndex"),
        "presentation_intent": text_value(ds, "PresentationIntentType")
        or _INTENTS.get(text_value(ds, "SOPClassUID") or ""),
        **_technique(ds),
    }
    if modality == "MG":
        event.update(
            {
                "agd_mGy": number(ds, "OrganDose", 100.0),
                "compression_thickness_mm": number(ds, "BodyPartThickness"),
                "compression_force_N": number(ds, "CompressionForce"),
                "anode": _ANODES.get((text_value(ds, "AnodeTargetMaterial") or "").upper()),
                "laterality": _SIDES.get(text_value(ds, "ImageLaterality") or text_value(ds, "Laterality") or ""),
            }
        )
    if modality in ("RF", "XA") and _procedure_step_totals(ds):
        # The step's running totals repeated in each image: one event for the step (study.py keeps the largest).
        step = text_value(ds, "PerformedProcedureStepID") or text_value(ds, "StudyInstanceUID")
        event.update(
            event_key=f"procedure-step:{text_value(ds, 'StationName') or ''}|{step}",
            irradiation_event_uid=None,
            fluoroscopy=True,
            irradiation_duration_s=number(ds, "TotalTimeOfFluoroscopy"),
            exposures=number(ds, "TotalNumberOfExposures"),
        )
    has_dose = any(event.get(k) is not None for k in ("dap_Gym2", "entrance_dose_mGy", "agd_mGy", "exposure_index"))
    exposed = event.get("kvp") is not None and (
        event.get("exposure_mAs") is not None or event.get("tube_current_mA") is not None
    )
    if not has_dose and not (modality in _TECHNIQUE_IS_AN_EXPOSURE and exposed):
        return None
    event["plane_id"] = "A"
    return {"kind": "MG" if modality == "MG" else "RF" if modality in ("RF", "XA") else "DX", "event": event}


def read_header_dose(ds: Dataset) -> dict | None:
    """A dose record from an image header; None when the header holds no dose value."""
    exposure_doses = read_exposure_dose_sequence(ds)
    if exposure_doses is not None:
        return exposure_doses
    if ds.get("RadiopharmaceuticalInformationSequence"):
        return read_radiopharmaceutical_header(ds)
    modality = text_value(ds, "Modality") or ""
    found = _ct(ds) if modality == "CT" else _projection(ds, modality) if modality in _PROJECTION else None
    if found is None:
        return None
    event = without_none(found["event"])
    event["index"] = 0
    return {
        "kind": found["kind"],
        "source": "IMAGE",
        "sop_instance_uid": text_value(ds, "SOPInstanceUID"),
        "series_instance_uid": text_value(ds, "SeriesInstanceUID"),
        "events": [event],
        "accumulated": {},
    }
