"""Builds synthetic but valid DICOM studies with pydicom, for tests and benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass
class SeriesSpec:
    modality: str
    description: str
    count: int
    body_part: str = "CHEST"


@dataclass
class GeneratedStudy:
    study_uid: str
    patient_id: str
    study_date: str
    files: list[Path] = field(default_factory=list)
    series: dict[str, dict] = field(default_factory=dict)  # series uid -> {description, modality, count}


def part10_dataset(sop_class_uid: str, sop_uid: str | None = None) -> Dataset:
    """An empty data set with its file meta (explicit VR little endian) and SOP identity set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    return ds


def make_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    patient_id: str,
    study_date: str,
    modality: str = "CT",
    series_description: str = "AXIAL",
    series_number: int = 1,
    body_part: str = "CHEST",
    rows: int = 64,
    sop_uid: str | None = None,
) -> Dataset:
    ds = part10_dataset(CTImageStorage, sop_uid)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = f"ACC{patient_id[-6:]}"
    ds.StudyDescription = "CT CHEST ABDOMEN"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    ds.InstanceNumber = number
    ds.StationName = "CTSTATION1"
    ds.Manufacturer = "DianaTest"
    ds.ManufacturerModelName = "Synthetic"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # 12-bit noise, reproducible per instance number
    ds.PixelData = random.Random(number).randbytes(rows * rows * 2)
    return ds


def make_study(
    out_dir: Path,
    series: list[SeriesSpec] | None = None,
    patient_id: str | None = None,
    study_date: str = "20240315",
    rows: int = 64,
) -> GeneratedStudy:
    """Write one study (default: 3 series, 40 instances) as Part-10 files under ``out_dir``."""
    series = series or [
        SeriesSpec("CT", "AXIAL 5mm", 20),
        SeriesSpec("CT", "CORONAL", 12),
        SeriesSpec("CT", "SCOUT", 8),
    ]
    study_uid = generate_uid()
    patient_id = patient_id or f"PID{study_uid[-8:]}"
    study = GeneratedStudy(study_uid, patient_id, study_date)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s_index, spec in enumerate(series, start=1):
        series_uid = generate_uid()
        study.series[series_uid] = {"description": spec.description, "modality": spec.modality, "count": spec.count}
        for number in range(1, spec.count + 1):
            ds = make_instance(
                study_uid,
                series_uid,
                number,
                patient_id=patient_id,
                study_date=study_date,
                modality=spec.modality,
                series_description=spec.description,
                series_number=s_index,
                body_part=spec.body_part,
                rows=rows,
            )
            path = out_dir / f"s{s_index:02d}_i{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.files.append(path)
    return study
