"""Radiopharmaceutical administrations from PET and NM image headers (Radiopharmaceutical Information Sequence).

PS3.3 C.8.4.10 NM Isotope Module and C.8.9.2 PET Isotope Module, item of (0054,0016):
agent (0018,0031) text or (0054,0304) code, radionuclide (0054,0300) code, Radionuclide Total Dose
(0018,1074), start (0018,1078) DateTime or (0018,1072) Time, half life (0018,1075) in s, volume
(0018,1071) in ml, administration event UID (0008,3012).

The unit of Radionuclide Total Dose differs by IOD: the PET Isotope Module defines it in Bq, the NM
Isotope Module in MBq. Every image of a series repeats the same administration, so the event key
is the administration (its UID, else agent + start time), and a series gives one event.
"""

from __future__ import annotations

from pydicom import Dataset

from diana.stream_apps.dose.context import text_value, without_none
from diana.stream_apps.dose.header_values import code_meaning, datetime_of, number

__all__ = ["read_radiopharmaceutical_header", "PET_MODALITIES"]

PET_MODALITIES = {"PT"}
_PET_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.128.1"}


def _is_pet(ds: Dataset) -> bool:
    return text_value(ds, "Modality") in PET_MODALITIES or text_value(ds, "SOPClassUID") in _PET_SOP_CLASSES


def _administration(item: Dataset, pet: bool, study_date: str | None, index: int) -> dict:
    # PET: Bq (PS3.3 C.8.9.2); NM: MBq (C.8.4.10).
    activity = number(item, "RadionuclideTotalDose", 1e-6 if pet else 1.0)
    started = datetime_of(item, "RadiopharmaceuticalStartDateTime", study_date, "RadiopharmaceuticalStartTime")
    agent = code_meaning(item, "RadiopharmaceuticalCodeSequence") or text_value(item, "Radiopharmaceutical")
    nuclide = code_meaning(item, "RadionuclideCodeSequence")
    uid = text_value(item, "RadiopharmaceuticalAdministrationEventUID")
    return without_none(
        {
            "event_key": uid or f"administration:{agent or nuclide or '?'}@{started or index}",
            "irradiation_event_uid": uid,
            "radiopharmaceutical": agent,
            "radionuclide": nuclide,
            "administered_activity_MBq": activity if activity is None or activity > 0 else None,
            "datetime_started": started,
            "radionuclide_half_life_s": number(item, "RadionuclideHalfLife"),
            "radiopharmaceutical_volume_ml": number(item, "RadiopharmaceuticalVolume"),
        }
    )


def read_radiopharmaceutical_header(ds: Dataset) -> dict | None:
    """One event per administration in a PET or NM image header; None without a usable administration."""
    items = ds.get("RadiopharmaceuticalInformationSequence") or []
    pet = _is_pet(ds)
    study_date = text_value(ds, "StudyDate")
    events = [_administration(item, pet, study_date, i) for i, item in enumerate(items)]
    events = [
        e for e in events if "administered_activity_MBq" in e or "radiopharmaceutical" in e or "radionuclide" in e
    ]
    if not events:
        return None
    for index, event in enumerate(events):
        event["index"] = index
    return {
        "kind": "NM",
        "source": "IMAGE",
        "sop_instance_uid": text_value(ds, "SOPInstanceUID"),
        "series_instance_uid": text_value(ds, "SeriesInstanceUID"),
        "events": events,
        "accumulated": {},
    }
