"""Identifiers that left a research export unnoticed (found by an audit of the de-identification):
each test builds the leaking object and asserts that the value is gone or the residual scan finds it."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pydicom
from pydicom import Dataset

from diana.access.deid import Deidentifier
from diana.access.deid_options import ProfileOptions
from diana.access.export import REPORT_NAME, export_instances
from diana.access.pseudonyms import ProjectKeys
from diana.access.residual import Hit, scan
from tests.support.dicomgen import make_instance

KEYS = ProjectKeys(b"unit-test-site-secret-32-bytes!!", "audit")


def _source(patient_id: str = "MRN998877", name: str = "Doe^John") -> Dataset:
    ds = make_instance("1.2.3.4", "1.2.3.4.5", 1, patient_id=patient_id, study_date="20240115")
    ds.PatientName = name
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deidentify(ds: Dataset, **options) -> tuple[Dataset, list[Hit]]:
    result = Deidentifier(KEYS, ProfileOptions(**options)).deidentify(ds)
    return result.dataset, scan(result.dataset, result.identifiers)


def _export_zip(tmp_path: Path, ds: Dataset, **options) -> tuple[dict, list[Dataset]]:
    """A zip research export of ``ds`` from an archive folder: its report and its objects."""
    archive = tmp_path / "archive"
    path = archive / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(_bytes(ds))
    row = {
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "sop_instance_uid": ds.SOPInstanceUID,
        "patient_id": ds.PatientID,
    }
    target = tmp_path / "out.zip"
    export_instances([row], archive, target, deidentifier=Deidentifier(KEYS, ProfileOptions(**options)))
    with zipfile.ZipFile(target) as zf:
        report = json.loads(zf.read(REPORT_NAME))
        objects = [pydicom.dcmread(io.BytesIO(zf.read(n))) for n in zf.namelist() if n.endswith(".dcm")]
    return report, objects


def test_a_name_part_inside_our_own_words_is_redacted_and_searched(tmp_path):
    """ "Ted" is inside "[REDACTED]": a substring test against the de-identifier's own words dropped it
    from both the redaction and the scan, and "CT follow-up for Ted" went out in a complete export."""
    ds = _source(name="Doe^Ted")
    ds.StudyDescription = "CT follow-up for Ted"
    report, [out] = _export_zip(tmp_path, ds, clean_descriptors=True)
    assert report["status"] == "complete"
    assert out.StudyDescription == "CT follow-up for [REDACTED]"
    for part in ("Ted", "Red", "One", "Anonym"):
        ds = _source(name=f"Doe^{part}")
        ds.AcquisitionProtocolName = f"head for {part}"  # kept as it is (Table E.1-1 does not list it)
        _, hits = _deidentify(ds)
        assert [(h.path, h.kind) for h in hits] == [("AcquisitionProtocolName", "person name")], part
