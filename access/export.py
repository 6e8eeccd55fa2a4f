"""`diana cohort export`: copy a cohort's objects out of the archive, verified, optionally de-identified.

Each object is read from the archive, checked against the SHA-256 the index recorded at arrival,
and written atomically (a folder: one file at a time; a zip: the whole archive under a temporary
name, renamed when complete), so an interrupted export leaves nothing half-written. Paths inside
the export are built from validated UIDs only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from diana.access.deid import Deidentifier, PseudonymKey
from diana.durable import contained_path, fsync_dir, write_atomic
from diana.schemas.layout import archive_path

__all__ = ["ExportError", "ExportSummary", "export_instances"]


class ExportError(ValueError):
    """The export cannot start (target exists, bad secret, ...): the message says what to change."""


@dataclass
class ExportSummary:
    studies: int = 0
    exported: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)  # indexed but not in the archive
    hash_mismatch: list[str] = field(default_factory=list)  # archive bytes differ from the index

    def lines(self) -> list[str]:
        out = [f"exported {self.exported} objects of {self.studies} studies ({self.bytes / 1e6:.1f} MB)"]
        if self.missing:
            out.append(
                f"{len(self.missing)} indexed objects are not in the archive (not exported): "
                f"{', '.join(self.missing[:5])}"
            )
        if self.hash_mismatch:
            out.append(
                f"{len(self.hash_mismatch)} archived objects differ from the SHA-256 recorded at arrival "
                f"(not exported): {', '.join(self.hash_mismatch[:5])}"
            )
        return out


def export_instances(
    instances: list[dict],
    archive_dir: Path,
    target: Path,
    *,
    deidentifier: Deidentifier | None = None,
    key_file: Path | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> ExportSummary:
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise ExportError(f"{target} exists and is not empty: choose a new folder or zip name")
    summary = ExportSummary(studies=len({i["study_instance_uid"] for i in instances}))
    key = PseudonymKey()
    as_zip = target.suffix.lower() == ".zip"
    tmp_zip = target.with_name(f".{target.name}.partial")
    zf = zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED, allowZip64=True) if as_zip else None
    try:
        for inst in instances:
            uids = (inst["study_instance_uid"], inst["series_instance_uid"], inst["sop_instance_uid"])
            source = contained_path(archive_dir, archive_path(*uids))
            try:
                data = source.read_bytes()
            except FileNotFoundError:
                summary.missing.append(inst["sop_instance_uid"])
                progress(1)
                continue
            if inst.get("sha256") and hashlib.sha256(data).hexdigest() != inst["sha256"]:
                summary.hash_mismatch.append(inst["sop_instance_uid"])
                progress(1)
                continue
            name = archive_path(*uids)
            if deidentifier is not None:
                ds = pydicom.dcmread(io.BytesIO(data))
                original = (str(ds.get("PatientID", "")), str(ds.get("PatientName", "")))
                deidentifier.deidentify(ds)
                key.add(*original, ds)
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                data = buf.getvalue()
                name = archive_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            if zf is not None:
                zf.writestr(name, data)
            else:
                out = contained_path(target, name)
                write_atomic(out, data)
                if out.read_bytes() != data:
                    raise ExportError(f"{out} does not read back as written: check the disk")
            summary.exported += 1
            summary.bytes += len(data)
            progress(1)
        if zf is not None:
            zf.close()
            zf = None
            with zipfile.ZipFile(tmp_zip) as check:  # verify every member's CRC before publishing
                bad = check.testzip()
                if bad:
                    raise ExportError(f"the zip member {bad} does not read back: check the disk")
            os.replace(tmp_zip, target)
            fsync_dir(target.parent)
    finally:
        if zf is not None:
            zf.close()
        tmp_zip.unlink(missing_ok=True)
    if key_file is not None and deidentifier is not None:
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf,
            fieldnames=[
                "original_patient_id",
                "original_patient_name",
                "pseudonym_patient_id",
                "pseudonym_patient_name",
            ],
        )
        writer.writeheader()
        writer.writerows(key.rows.values())
        write_atomic(key_file, buf.getvalue().encode())
        os.chmod(key_file, 0o600)
    return summary
