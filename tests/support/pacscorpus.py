"""A small PACS corpus for `diana collect`: studies by accession number, loaded into a real Orthanc
through its REST API; and the PACS-side count of concurrent associations from Orthanc's verbose log."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import requests
from pydicom.uid import generate_uid

from tests.support.dicomgen import make_instance

# A storage SOP class no receiver supports (made up under pydicom's root): a PACS that sends it in a
# C-MOVE sees that sub-operation refused by diana-star's receiver, as with a vendor's private object.
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.424242.1"


@dataclass
class PacsStudy:
    accession: str
    study_uid: str
    patient_id: str
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)
    private_objects: int = 0


def make_pacs_study(
    out_dir: Path,
    accession: str,
    instances: int = 2,
    private_objects: int = 0,
    rows: int = 16,
    study_date: str = "20240315",
    study_time: str = "101500",
    patient_id: str = "",
) -> PacsStudy:
    """A study of ``instances`` small CT images (and ``private_objects`` of PRIVATE_SOP_CLASS) as files."""
    study = PacsStudy(accession, generate_uid(), patient_id or f"PAT{accession}")
    series_uid = generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    for number in range(1, instances + private_objects + 1):
        ds = make_instance(
            study.study_uid, series_uid, number, patient_id=study.patient_id, study_date=study_date, rows=rows
        )
        ds.AccessionNumber, ds.StudyTime = accession, study_time
        if number > instances:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
            study.private_objects += 1
        path = out_dir / f"{accession}_{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.files.append(path)
        study.sop_uids.append(str(ds.SOPInstanceUID))
    return study


def load_into_orthanc(url: str, studies: list[PacsStudy]) -> None:
    for study in studies:
        for path in study.files:
            response = requests.post(url + "/instances", data=path.read_bytes(), timeout=60)
            assert response.ok, f"Orthanc refused {path.name}: {response.status_code} {response.text}"


def max_concurrent_associations(orthanc_log: str, calling_ae: str) -> tuple[int, int]:
    """(most associations from ``calling_ae`` open at once, associations in all) as Orthanc logged them."""
    opened = re.compile(rf"Association Received from AET {re.escape(calling_ae)} ")
    closed = re.compile(rf"Finishing association with AET {re.escape(calling_ae)} ")
    now = peak = total = 0
    for line in orthanc_log.splitlines():
        if opened.search(line):
            now += 1
            total += 1
            peak = max(peak, now)
        elif closed.search(line):
            now -= 1
    return peak, total
