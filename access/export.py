"""`diana cohort export`: copy a cohort's objects out of the archive, verified, optionally de-identified.

Each object is read from the archive, checked against the SHA-256 the index recorded at arrival,
and written atomically (a folder: one file at a time; a zip: the whole archive under a temporary
name, renamed when complete). Paths inside the export are built from validated UIDs only.

A research export (a Deidentifier given) also:
- decides each study's subject from every PatientID the index holds for it before the first
  object is written (a study is never split);
- refuses, one by one, the objects that must not or cannot go out (risky classes, unreadable
  dates, unreadable files) and goes on; each is listed with its reason;
- runs the residual-identifier scan on every de-identified object before it is written: an object
  with a hit is not written and the export is marked failed, with the element path;
- writes export-report.json into the export (table edition, options, counts, what was refused and
  why, by pseudonymous UID).
Every folder export carries EXPORT-INCOMPLETE.txt from before its first file until it is complete
(its report written, its scan passed), so an export that stopped says so where a user looks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

from diana.access.deid import Deidentifier, Refused
from diana.access.deid_options import method_codes
from diana.access.deid_table import TABLE_SOURCE
from diana.access.keyfiles import check_key_file_place, key_csv, write_private
from diana.access.residual import scan
from diana.durable import contained_path, fsync_dir, write_atomic
from diana.schemas.layout import archive_path
from diana.storage import FilesystemStore, ObjectStore

__all__ = ["ExportError", "ExportSummary", "export_instances", "REPORT_NAME", "INCOMPLETE_NAME"]

REPORT_NAME = "export-report.json"
INCOMPLETE_NAME = "EXPORT-INCOMPLETE.txt"
_INCOMPLETE_TEXT = (
    "This export did not finish, or failed its residual-identifier scan: do not use or share it.\n"
    f"If {REPORT_NAME} is here, it says what happened; otherwise run the export again into a new folder.\n"
)


class ExportError(ValueError):
    """The export cannot start (target exists, bad secret, ...): the message says what to change."""


@dataclass
class ExportSummary:
    studies: int = 0
    exported: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)  # indexed but not in the archive
    hash_mismatch: list[str] = field(default_factory=list)  # archive bytes differ from the index
    refused: list[tuple[str, str]] = field(default_factory=list)  # (source SOP UID, why)
    risky_exported: list[tuple[str, str]] = field(default_factory=list)  # (exported SOP UID, why risky)
    residual_hits: list[tuple[str, str]] = field(default_factory=list)  # (source SOP UID, element path and kind)
    mixed_patient_studies: int = 0
    unreadable_private: int = 0  # safe-listed private elements removed: not readable as the list says
    # A research export's objects are named on the console by their pseudonymous UIDs, as in its report:
    # a terminal's scrollback and the logs it is pasted into are no place for the original ones.
    pseudonym: Callable[[str], str] | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return bool(self.residual_hits)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.hash_mismatch or self.refused or self.residual_hits)

    def lines(self, *, original_uids: bool = False) -> list[str]:
        """The summary for the console; ``original_uids`` names a research export's objects by their
        original UIDs (to find them in the archive) instead of their pseudonymous ones."""
        name = self.pseudonym if self.pseudonym is not None and not original_uids else str
        out = [f"exported {self.exported} objects of {self.studies} studies ({self.bytes / 1e6:.1f} MB)"]
        if self.missing:
            out.append(
                f"{len(self.missing)} indexed objects are not in the archive (not exported): "
                f"{', '.join(map(name, self.missing[:5]))}"
            )
        if self.hash_mismatch:
            out.append(
                f"{len(self.hash_mismatch)} archived objects differ from the SHA-256 recorded at arrival "
                f"(not exported): {', '.join(map(name, self.hash_mismatch[:5]))}"
            )
        if self.refused:
            out.append(f"{len(self.refused)} objects refused (not exported):")
            out += [f"  {name(uid)}: {why}" for uid, why in self.refused[:50]]
            if len(self.refused) > 50:
                out.append(f"  ... and {len(self.refused) - 50} more ({REPORT_NAME} lists them all)")
        if self.risky_exported:
            out.append(
                f"WARNING: {len(self.risky_exported)} risky objects exported by --allow-risky, marked "
                f"PatientIdentityRemoved NO: check their pixels before sharing ({REPORT_NAME} lists them)"
            )
        if self.unreadable_private:
            out.append(
                f"{self.unreadable_private} safe-listed private elements removed: not readable as the VR the "
                "safe list gives them, or as the sequence their bytes begin as, or bytes (UN) with no VR given"
            )
        if self.mixed_patient_studies:
            out.append(
                f"{self.mixed_patient_studies} studies carry more than one PatientID: each was kept whole, "
                "under the pseudonym of its smallest PatientID"
            )
        if self.residual_hits:
            out.append(
                f"FAILED: the residual-identifier scan found source identifiers in {len(self.residual_hits)} places:"
            )
            out += [f"  {name(uid)}: {where}" for uid, where in self.residual_hits[:50]]
        return out


def _member(name: str) -> zipfile.ZipInfo:
    """A zip member stamped 1980-01-01 (the format's first day), not when it was written: the same
    export gives the same bytes, and the zip does not tell when the study was exported."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16  # rw-r--r--, as a file written with the usual umask
    return info


def _plan_studies(deidentifier: Deidentifier, instances: list[dict]) -> None:
    by_study: dict[str, set[str]] = defaultdict(set)
    for inst in instances:
        by_study[inst["study_instance_uid"]].add(str(inst.get("patient_id") or ""))
    for study, ids in by_study.items():
        deidentifier.subjects.plan(study, ids)


def _deidentify(deidentifier: Deidentifier, data: bytes, summary: ExportSummary, sop: str) -> tuple[str, bytes] | None:
    """(name, bytes) of the de-identified object, or None when it was refused or failed the scan."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        result = deidentifier.deidentify(ds)
        hits = scan(result.dataset, result.identifiers)
        if hits:
            summary.residual_hits += [(sop, str(hit)) for hit in hits]
            return None
        out = result.dataset
        name = archive_path(out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID)
        buf = io.BytesIO()
        out.save_as(buf, enforce_file_format=True)
    except Refused as exc:
        summary.refused.append((sop, str(exc)))
        return None
    except (InvalidDicomError, EOFError) as exc:
        summary.refused.append((sop, f"not readable as DICOM ({type(exc).__name__})"))
        return None
    except Exception as exc:  # any object pydicom cannot handle is refused, and the export goes on
        # the exception's text may quote a value of the object: only its type is reported
        summary.refused.append((sop, f"cannot be de-identified or written ({type(exc).__name__})"))
        return None
    summary.unreadable_private += result.unreadable_private
    if result.risk:
        summary.risky_exported.append((out.SOPInstanceUID, result.risk))
    return name, buf.getvalue()


def _report(summary: ExportSummary, deidentifier: Deidentifier) -> bytes:
    keys = deidentifier.keys
    report = {
        "status": "failed: residual identifiers found"
        if summary.failed
        else "complete"
        if summary.complete
        else "partial",
        "profile": "PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "table": TABLE_SOURCE,
        "deidentification_method_codes": [
            {"code": c.CodeValue, "meaning": c.CodeMeaning} for c in method_codes(deidentifier.options)
        ],
        "project": keys.project,
        "studies": summary.studies,
        "exported": summary.exported,
        # refused objects are named by the UID they would have had, never by the original
        "refused": [{"sop_instance_uid": keys.uid(uid), "reason": why} for uid, why in summary.refused],
        "not_in_archive": [keys.uid(uid) for uid in summary.missing],
        "hash_mismatch": [keys.uid(uid) for uid in summary.hash_mismatch],
        "risky_exported": [{"sop_instance_uid": uid, "reason": why} for uid, why in summary.risky_exported],
        "studies_with_several_patient_ids": summary.mixed_patient_studies,
        "safe_private_elements_removed_unreadable": summary.unreadable_private,
        "residual_identifier_hits": [
            {"sop_instance_uid": keys.uid(uid), "where": where} for uid, where in summary.residual_hits
        ],
    }
    return (json.dumps(report, indent=1) + "\n").encode()


def _new_partial_zip(path: Path) -> BinaryIO:
    """The zip's temporary file, readable by its owner only from creation: it fills with patient data. One
    left by an export that was killed (the ``finally`` below never ran) is removed first: the name is the
    target's, so the next export to it is the one to clean up (before, it was truncated and kept the mode
    it had, 0644 with the usual umask, and a killed export's stayed until then)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "w+b")


def export_instances(
    instances: list[dict],
    archive: ObjectStore | Path,
    target: Path,
    *,
    deidentifier: Deidentifier | None = None,
    key_file: Path | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> ExportSummary:
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise ExportError(f"{target} exists and is not empty: choose a new folder or zip name")
    if key_file is not None:
        if deidentifier is None:
            raise ExportError("a key file only makes sense with de-identification (--research)")
        check_key_file_place(key_file, target)
    if isinstance(archive, Path):
        archive = FilesystemStore(archive)
    summary = ExportSummary(studies=len({i["study_instance_uid"] for i in instances}))
    if deidentifier is not None:
        summary.pseudonym = deidentifier.keys.uid
        _plan_studies(deidentifier, instances)
        summary.mixed_patient_studies = len(deidentifier.subjects.mixed)
    as_zip = target.suffix.lower() == ".zip"
    tmp_zip = target.with_name(f".{target.name}.partial")
    zip_file = _new_partial_zip(tmp_zip) if as_zip else None
    zf = zipfile.ZipFile(zip_file, "w", zipfile.ZIP_STORED, allowZip64=True) if zip_file is not None else None
    marker = target / INCOMPLETE_NAME
    if zf is None:
        write_atomic(marker, _INCOMPLETE_TEXT.encode())
    try:
        for inst in instances:
            sop = inst["sop_instance_uid"]
            uids = (inst["study_instance_uid"], inst["series_instance_uid"], sop)
            try:
                with archive.open(archive_path(*uids)) as stream:
                    data = stream.read()
            except FileNotFoundError:  # ObjectNotFound
                summary.missing.append(sop)
                progress(1)
                continue
            except OSError as exc:  # unreadable archive object (or the store unreachable): listed, the export goes on
                summary.refused.append((sop, f"archive file unreadable ({type(exc).__name__})"))
                progress(1)
                continue
            if inst.get("sha256") and hashlib.sha256(data).hexdigest() != inst["sha256"]:
                summary.hash_mismatch.append(sop)
                progress(1)
                continue
            name = archive_path(*uids)
            if deidentifier is not None:
                done = _deidentify(deidentifier, data, summary, sop)
                if done is None:
                    progress(1)
                    continue
                name, data = done
            if zf is not None:
                zf.writestr(_member(name), data)
            else:
                out = contained_path(target, name)
                write_atomic(out, data)
                if out.read_bytes() != data:
                    raise ExportError(f"{out} does not read back as written: check the disk")
            summary.exported += 1
            summary.bytes += len(data)
            progress(1)
        if deidentifier is not None:
            report = _report(summary, deidentifier)
            if zf is not None:
                zf.writestr(_member(REPORT_NAME), report)
            else:
                write_atomic(target / REPORT_NAME, report)
        if zf is not None and zip_file is not None:
            zf.close()
            zf = None
            zip_file.close()  # ZipFile leaves a file object it was given open
            with zipfile.ZipFile(tmp_zip) as check:  # verify every member's CRC before publishing
                bad = check.testzip()
                if bad:
                    raise ExportError(f"the zip member {bad} does not read back: check the disk")
            if not summary.failed:  # a zip that failed its scan is never published
                os.replace(tmp_zip, target)
                fsync_dir(target.parent)
        elif not summary.failed:
            marker.unlink()
            fsync_dir(target)
    finally:
        if zf is not None:
            zf.close()
        if zip_file is not None:
            zip_file.close()
        tmp_zip.unlink(missing_ok=True)
    if key_file is not None and deidentifier is not None and not summary.failed:
        # Only for an export that was published: a key to objects nobody may use is one more copy of
        # the patients' identities to look after.
        write_private(key_file, key_csv(list(deidentifier.key.rows.values())))
    return summary
