"""Image headers that carry dose, built from the attributes PS3.3 defines (no vendor file).

PET/NM Isotope Modules (Radiopharmaceutical Information Sequence), the Radiation Dose Module's
Exposure Dose Sequence in a Secondary Capture dose screen, mammography For Presentation / For
Processing images, dental (PX) images, mobile C-arm (RF) images with procedure-step totals, and
CT images with real pixel values for the water-equivalent diameter.
"""

from __future__ import annotations

import math
from array import array

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.dicomgen import part10_dataset
from tests.support.dosebuilder import code

PET = "1.2.840.10008.5.1.4.1.1.128"
NM = "1.2.840.10008.5.1.4.1.1.20"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
XRF = "1.2.840.10008.5.1.4.1.1.12.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


def base(sop_class: str, modality: str, study_uid: str, series_uid: str | None = None, **kw) -> Dataset:
    ds = part10_dataset(sop_class)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID, ds.PatientName, ds.PatientSex = kw.get("patient_id", "IMG1"), "Dose^Image", "F"
    ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19800315", kw.get("study_date", "20240315"), "101500"
    ds.PatientWeight = kw.get("weight", "72.5")
    ds.AccessionNumber, ds.Manufacturer, ds.StationName = "ACCIMG", "DianaTest", kw.get("station", "ROOM1")
    ds.SeriesNumber, ds.InstanceNumber = 1, kw.get("number", 1)
    return ds


def radiopharmaceutical(
    study_uid: str, *, pet: bool, activity: str, series_uid: str | None = None, number: int = 1
) -> Dataset:
    ds = base(PET if pet else NM, "PT" if pet else "NM", study_uid, series_uid, number=number)
    item = Dataset()
    item.Radiopharmaceutical = "Fluorodeoxyglucose" if pet else "Technetium Tc99m Medronate"
    item.RadiopharmaceuticalCodeSequence = [
        code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^") if pet else code("C-B1103", "SRT", "Tc-99m MDP")
    ]
    item.RadionuclideCodeSequence = [
        code("C-111A1", "SRT", "^18^Fluorine") if pet else code("C-163A8", "SRT", "^99m^Technetium")
    ]
    item.RadionuclideTotalDose = activity
    item.RadionuclideHalfLife = "6586.2" if pet else "21624.12"
    item.RadiopharmaceuticalStartTime = "083045"
    ds.RadiopharmaceuticalInformationSequence = [item]
    return ds


# A scout and a helical exposure, as a CT dose screen lists them (unit and stack tests expect these values).
SCOUT_AND_SPIRAL = [
    {
        "type": "CONSTANT_ANGLE",
        "kvp": "120",
        "uA": "30000",
        "ms": "2500",
        "ctdivol": "0.8",
        "length": "500",
        "protocol": "Scout",
    },
    {
        "type": "SPIRAL",
        "kvp": "100",
        "uA": "245000",
        "ms": "6150",
        "ctdivol": "9.75",
        "length": "420",
        "protocol": "Abdomen",
    },
]


def ct_dose_screen(study_uid: str, items: list[dict]) -> Dataset:
    """A Secondary Capture dose screen whose Radiation Dose Module has one Exposure Dose item per scan."""
    ds = base(SECONDARY_CAPTURE, "CT", study_uid)
    ds.TotalNumberOfExposures = len(items)
    sequence = []
    for values in items:
        item = Dataset()
        item.AcquisitionType = values["type"]
        item.KVP = values["kvp"]
        item.XRayTubeCurrentInuA = values["uA"]
        item.ExposureTime = values["ms"]
        item.CTDIvol = float(values["ctdivol"])
        item.ScanLength = values["length"]
        item.SpiralPitchFactor = float(values.get("pitch", "1.0"))
        item.SeriesDescription = values["protocol"]
        item.CTDIPhantomTypeCodeSequence = [code("113691", "DCM", "IEC Body Dosimetry Phantom")]
        sequence.append(item)
    ds.ExposureDoseSequence = sequence
    return ds


def mammogram(
    study_uid: str,
    *,
    presentation: bool,
    side: str,
    view: str,
    acquired: str,
    organ_dose_dGy: str | None,
    event_uid: str | None = None,
) -> Dataset:
    ds = base(MG_FOR_PRESENTATION if presentation else MG_FOR_PROCESSING, "MG", study_uid)
    ds.PresentationIntentType = "FOR PRESENTATION" if presentation else "FOR PROCESSING"
    ds.ImageLaterality, ds.ViewPosition = side, view
    ds.AcquisitionDate, ds.AcquisitionTime = acquired[:8], acquired[8:]
    ds.KVP, ds.ExposureInuAs, ds.XRayTubeCurrent = "29", "112000", "100"
    ds.BodyPartThickness, ds.CompressionForce, ds.AnodeTargetMaterial = "53", "98", "TUNGSTEN"
    if organ_dose_dGy is not None:
        ds.OrganDose = organ_dose_dGy
    if event_uid:
        ds.IrradiationEventUID = event_uid
    return ds


def dental(study_uid: str, modality: str = "PX") -> Dataset:
    ds = base(DX_FOR_PRESENTATION, modality, study_uid)
    ds.KVP, ds.Exposure, ds.XRayTubeCurrent, ds.ExposureTime = "70", "112", "8", "14000"
    ds.AcquisitionDate, ds.AcquisitionTime = "20240315", "101700"
    return ds


def cone_beam_ct(study_uid: str, series_uid: str, number: int) -> Dataset:
    ds = base(CT, "CT", study_uid, series_uid, number=number)
    ds.ImageAndFluoroscopyAreaDoseProduct = "5.6"  # dGy·cm²
    ds.KVP = "90"
    return ds


def c_arm_image(study_uid: str, *, number: int, dap_dGycm2: str, fluoro_s: int, exposures: int) -> Dataset:
    """A mobile C-arm image carrying its procedure step's running totals (Radiation Dose Module)."""
    ds = base(XRF, "RF", study_uid, number=number, station="CARM1")
    ds.PerformedProcedureStepID = "PPS1"
    ds.ImageAndFluoroscopyAreaDoseProduct = dap_dGycm2
    ds.TotalTimeOfFluoroscopy = fluoro_s
    ds.TotalNumberOfExposures = exposures
    ds.KVP = "75"
    return ds


def water_phantom_ct(
    study_uid: str, series_uid: str, number: int, *, radius_mm: float, hu_inside: int, size: int = 128
) -> Dataset:
    """An axial CT image of a centred cylinder of ``hu_inside`` HU in air, 1 mm pixels, stored as HU + 1024."""
    ds = base(CT, "CT", study_uid, series_uid, number=number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.CTDIvol = 10.0
    centre = (size - 1) / 2
    pixels = array(
        "H",
        (
            hu_inside + 1024 if math.hypot(x - centre, y - centre) <= radius_mm else 0
            for y in range(size)
            for x in range(size)
        ),
    )
    ds.PixelData = pixels.tobytes()
    return ds
