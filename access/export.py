"""`diana cohort export`: copy a cohort's objects out of the archive, verified, optionally de-identified.

Each object is read from the archive, checked against the SHA-256 the index recorded at arrival,
and written atomically (a folder: one file at a time; a zip: the whole archive under a temporary
name unique to the export, linked to its name when complete, never over another file). Paths inside
the export are built from validated UIDs only.

A research export (a Deidentifier given) also:
- decides each study's subject from every PatientID the index holds for it before the first
  object is written (a study is never split);
- refuses, one by one, the objects that must not or cannot go out (risky classes, unreadable
  dates, unreadable files) and goes on; each is listed with its reason. The risky ones (access/risk.py:
  secondary captures, such as a CT study's dose screen, ultrasound, documents...) are withheld by
  policy: read and deliberately left out, not a gap, so an export whose only omissions are these is
  complete; the others are gaps;
- runs the residual-identifier scan on every de-identified object before it is written: an object
  with a hit is not written and the export is marked failed, with the element path;
- writes export-report.json into the export (table edition, options, counts, what was refused and
  why, by pseudonymous UID).
Every export carries export-report.json (a plain one: counts and the objects not exported). A folder
carries EXPORT-INCOMPLETE.txt from before its first file until it is complete (every object exported,
its report written, its scan passed; objects withheld by the risk policy do not count against it): an
export that stopped, or that has gaps (objects missing, changed, unreadable or refused for another reason),
says so where a user looks, with the counts. A zip gets its final name only when complete; one with gaps
is published as NAME-INCOMPLETE.zip with EXPORT-INCOMPLETE.txt inside, so it never looks complete.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from diana.access.deid import Deidentifier, Refused, RiskRefused
from diana.access.deid_options import method_codes
from diana.access.deid_table import TABLE_SOURCE
from diana.access.keyfiles import check_key_file_place, key_csv, write_private
from diana.access.residual import scan
from diana.durable import contained_path, fsync_dir, write_atomic
from diana.schemas.layout import archive_path
from diana.scratch import ScratchFile, remove_unless_held
from diana.storage import FilesystemStore, ObjectStore

__all__ = [
    "ExportError",
    "NothingToExport",
    "ExportSummary",
    "export_instances",
    "export_batches",
    "incomplete_zip_path",
    "REPORT_NAME",
    "INCOMPLETE_NAME",
]

REPORT_NAME = "export-report.json"
INCOMPLETE_NAME = "EXPORT-INCOMPLETE.txt"
_INCOMPLETE_TEXT = (
    "This export did not finish, or failed its residual-identifier scan: do not use or share it.\n"
    f"If {REPORT_NAME} is here, it says what happened; otherwise run the export again into a new folder.\n"
)


def incomplete_zip_path(target: Path) -> Path:
    """Where a zip export that left objects out is published instead of ``target``: never under the name
    asked for, which a complete export has."""
    return target.with_name(f"{target.stem}-INCOMPLETE{target.suffix}")


class ExportError(ValueError):
    """The export cannot start (target exists, bad secret, ...): the message says what to change."""


class NothingToExport(ExportError):
    """The matching studies have no instance left in the index (removed between the search and the export):
    nothing was exported, and the folder the export made is removed again."""


def _new_partial_zip(target: Path) -> ScratchFile:
    """The zip's temporary file beside ``target``: ``.<name>.<random>.partial``, readable by its owner only
    from creation (it fills with patient data), and locked while this export lives (diana/scratch.py), so
    that two exports to one name never share it. Those a killed export left (their lock went with it) are
    removed first; a live export's are left alone."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        remove_unless_held(stale)
    return ScratchFile(target.parent, prefix=f".{target.name}.", suffix=".partial")


def _publish(tmp: Path, final: Path) -> None:
    """Give the finished zip ``tmp`` the name ``final`` without replacing a file made there meanwhile
    (os.replace would: another export, or the user's own file); ``tmp`` stays for the caller to remove."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ExportError(
            f"{final} was created while the export ran: nothing published; choose a new zip name"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # a file system without hard links: an exclusive create and a copy, never over another file
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(tmp, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except FileExistsError:
            raise ExportError(
                f"{final} was created while the export ran: nothing published; choose a new zip name"
            ) from None
        except BaseException:
            final.unlink(missing_ok=True)
            raise


@dataclass
class ExportSummary:
    studies: int = 0
    exported: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)  # indexed but not in the archive
    hash_mismatch: list[str] = field(default_factory=list)  # archive bytes differ from the index
    refused: list[tuple[str, str]] = field(default_factory=list)  # (source SOP UID, why): a gap
    # (source SOP UID, why): left out by the research risk policy (RiskRefused), deliberately: not a gap
    withheld: list[tuple[str, str]] = field(default_factory=list)
    risky_exported: list[tuple[str, str]] = field(default_factory=list)  # (exported SOP UID, why risky)
    residual_hits: list[tuple[str, str]] = field(default_factory=list)  # (source SOP UID, element path and kind)
    mixed_patient_studies: int = 0
    unreadable_private: int = 0  # safe-listed private elements removed: not readable as the list says
    # A research export's objects are named on the console by their pseudonymous UIDs, as in its report:
    # a terminal's scrollback and the logs it is pasted into are no place for the original ones.
    pseudonym: Callable[[str], str] | None = field(default=None, repr=False)
    published: Path | None = None  # where the export was written, once published (a zip's name says if incomplete)

    @property
    def failed(self) -> bool:
        return bool(self.residual_hits)

    @property
    def complete(self) -> bool:
        """Every object exported but those the risk policy withheld (a typical CT study's dose screen is a
        secondary capture: counting it would mark nearly every CT research export incomplete)."""
        return not (self.missing or self.hash_mismatch or self.refused or self.residual_hits)

    @property
    def status(self) -> str:
        if self.failed:
            return "failed: residual identifiers found"
        return "complete" if self.complete else "partial"

    def incomplete_text(self) -> str:
        """EXPORT-INCOMPLETE.txt of an export that ended without every object: what is missing, in counts."""
        head = (
            "This export FAILED its residual-identifier scan: do not use or share it.\n"
            if self.failed
            else "This export is INCOMPLETE: it is not the whole cohort. Do not use it as if it were.\n"
        )
        counts = [
            (len(self.missing), "indexed objects not in the archive"),
            (len(self.hash_mismatch), "archived objects differing from the SHA-256 recorded at arrival"),
            (len(self.refused), "objects refused"),
            (len(self.residual_hits), "residual identifiers found by the scan"),
        ]
        return (
            head
            + f"{self.exported} objects of {self.studies} studies exported; not exported:\n"
            + "".join(f"  {n} {what}\n" for n, what in counts if n)
            + (
                f"  (and {len(self.withheld)} objects withheld by the risk policy, not a gap)\n"
                if self.withheld
                else ""
            )
            + f"{REPORT_NAME} lists them.\n"
        )

    def lines(self, *, original_uids: bool = False) -> list[str]:
        """The summary for the console; ``original_uids`` names a research export's objects by their
        original UIDs (to find them in the archive) instead of their pseudonymous ones."""
        name = self.pseudonym if self.pseudonym is not None and not original_uids else str
        out = [f"exported {self.exported} objects of {self.studies} studies ({self.bytes / 1e6:.1f} MB)"]
        if self.withheld:
            out[0] += f"; {len(self.withheld)} withheld by the risk policy"
        if self.published is not None and not self.complete:
            out.append(f"INCOMPLETE: written to {self.published}, marked with {INCOMPLETE_NAME}; not the whole cohort")
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
        if self.withheld:
            out.append(
                f"{len(self.withheld)} objects withheld by the risk policy (not exported, not a gap; "
                "--allow-risky exports them, marked, to be checked by hand):"
            )
            out += [f"  {name(uid)}: {why}" for uid, why in self.withheld[:50]]
            if len(self.withheld) > 50:
                out.append(f"  ... and {len(self.withheld) - 50} more ({REPORT_NAME} lists them all)")
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
    except RiskRefused as exc:
        summary.withheld.append((sop, str(exc)))
        return None
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


def _plain_report(summary: ExportSummary) -> bytes:
    """The report of an export without de-identification: its objects carry their original UIDs, so the
    ones left out are named by them too (to find them in the archive)."""
    report = {
        "status": summary.status,
        "deidentified": False,
        "studies": summary.studies,
        "exported": summary.exported,
        "bytes": summary.bytes,
        "refused": [{"sop_instance_uid": uid, "reason": why} for uid, why in summary.refused],
        "not_in_archive": summary.missing,
        "hash_mismatch": summary.hash_mismatch,
    }
    return (json.dumps(report, indent=1) + "\n").encode()


def _report(summary: ExportSummary, deidentifier: Deidentifier) -> bytes:
    keys = deidentifier.keys
    report = {
        "status": summary.status,
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
        # left out by the risk policy on purpose: not counted against "complete"
        "withheld_by_policy": [{"sop_instance_uid": keys.uid(uid), "reason": why} for uid, why in summary.withheld],
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


def _each_instance(
    batches: Iterable[list[dict]], deidentifier: Deidentifier | None, studies: set[str]
) -> Iterator[dict]:
    """Every instance of the batches, one batch used at a time; with de-identification, each
    batch's studies have their subject decided (from every PatientID the batch holds for them) before
    their first object. ``studies`` collects the study UIDs seen."""
    for batch in batches:
        in_batch = {i["study_instance_uid"] for i in batch}
        if in_batch & studies:  # its subject was decided without this batch's PatientIDs
            raise ValueError("a study's instances came in two batches: each batch must hold its studies whole")
        studies |= in_batch
        if deidentifier is not None:
            _plan_studies(deidentifier, batch)
        yield from batch


def export_instances(
    instances: list[dict],
    archive: ObjectStore | Path,
    target: Path,
    *,
    deidentifier: Deidentifier | None = None,
    key_file: Path | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> ExportSummary:
    """The export of these instances (every one of their studies' instances) as one batch (``export_batches``)."""
    return export_batches([instances], archive, target, deidentifier=deidentifier, key_file=key_file, progress=progress)


def export_batches(
    batches: Iterable[list[dict]],
    archive: ObjectStore | Path,
    target: Path,
    *,
    deidentifier: Deidentifier | None = None,
    key_file: Path | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> ExportSummary:
    """Export the instances of ``batches``, each a list of every indexed instance of its studies (a study
    in one batch only), read one batch at a time: a cohort of any size needs at most two batches' memory (the
    next batch is read while the one before is still referenced)."""
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise ExportError(f"{target} exists and is not empty: choose a new folder or zip name")
    if target.suffix.lower() == ".zip" and incomplete_zip_path(target).exists():
        raise ExportError(
            f"{incomplete_zip_path(target)} exists (where this export would go if incomplete): "
            "choose a new zip name or move it"
        )
    if key_file is not None:
        if deidentifier is None:
            raise ExportError("a key file only makes sense with de-identification (--research)")
        check_key_file_place(key_file, target)
    if isinstance(archive, Path):
        archive = FilesystemStore(archive)
    summary = ExportSummary()
    studies: set[str] = set()
    if deidentifier is not None:
        summary.pseudonym = deidentifier.keys.uid
    as_zip = target.suffix.lower() == ".zip"
    # unique per export: two exports to one name never write into one file (".<name>.<hex>.partial")
    scratch = _new_partial_zip(target) if as_zip else None
    zip_file = scratch.open("w+b") if scratch is not None else None
    zf = zipfile.ZipFile(zip_file, "w", zipfile.ZIP_STORED, allowZip64=True) if zip_file is not None else None
    marker = target / INCOMPLETE_NAME
    made_folder = not target.exists()
    if zf is None:
        write_atomic(marker, _INCOMPLETE_TEXT.encode())
    try:
        for inst in _each_instance(batches, deidentifier, studies):
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
        summary.studies = len(studies)
        if not studies:  # every matching study's instances left the index after the search
            if zf is None:
                marker.unlink()
                if made_folder:
                    target.rmdir()
            raise NothingToExport(
                "no object to export: the matching studies have no instance in the index any more; nothing exported"
            )
        if deidentifier is not None:
            summary.mixed_patient_studies = len(deidentifier.subjects.mixed)
        report = _report(summary, deidentifier) if deidentifier is not None else _plain_report(summary)
        if zf is not None:
            zf.writestr(_member(REPORT_NAME), report)
            if not summary.complete:
                zf.writestr(_member(INCOMPLETE_NAME), summary.incomplete_text().encode())
        else:
            write_atomic(target / REPORT_NAME, report)
        if zf is not None and zip_file is not None and scratch is not None:
            zf.close()
            zf = None
            zip_file.close()  # ZipFile leaves a file object it was given open
            with zipfile.ZipFile(scratch.path) as check:  # verify every member's CRC before publishing
                bad = check.testzip()
                if bad:
                    raise ExportError(f"the zip member {bad} does not read back: check the disk")
            if not summary.failed:  # a zip that failed its scan is never published
                published = target if summary.complete else incomplete_zip_path(target)
                _publish(scratch.path, published)
                fsync_dir(target.parent)
                summary.published = published
        else:
            if summary.complete:
                marker.unlink()
                fsync_dir(target)
            else:  # the marker stays, saying what is missing
                write_atomic(marker, summary.incomplete_text().encode())
            summary.published = target
    finally:
        if zf is not None:
            zf.close()
        if zip_file is not None:
            zip_file.close()
        if scratch is not None:
            scratch.remove()
    if key_file is not None and deidentifier is not None and not summary.failed:
        # Only for an export that was published: a key to objects nobody may use is one more copy of
        # the patients' identities to look after.
        write_private(key_file, key_csv(list(deidentifier.key.rows.values())))
    return summary
