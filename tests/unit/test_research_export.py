"""The research export end to end on a real archive folder (no services needed): refusals listed and
the export goes on, the report, the incomplete marker, the scan failing an export, pseudonyms per
project/patient/study, and the safety of the key and secret files."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid

from diana.access.deid import Deidentified, Deidentifier
from diana.access.deid_options import ProfileOptions
from diana.access.export import (
    INCOMPLETE_NAME,
    REPORT_NAME,
    ExportError,
    NothingToExport,
    export_batches,
    export_instances,
)
from diana.access.keyfiles import KeyFileError, read_site_secret
from diana.access.pseudonyms import ProjectKeys
from diana.access.residual import collect, scan
from diana.schemas.uid import is_valid_uid
from tests.support.deidcheck import check_actions
from tests.support.deidgen import PATIENT_ID, PATIENT_NAME, SOP_CLASSES, identifying_object
from tests.support.paths import dose_acceptance_dir
from tests.support.umask import umask

SECRET = b"unit-test-site-secret-32-bytes!!"


def _archive(root: Path, datasets: list[Dataset]) -> list[dict]:
    """Lay the objects out as the archive does and return their index rows."""
    rows = []
    for ds in datasets:
        uids = [str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        uids = [u if is_valid_uid(u) else generate_uid() for u in uids]  # pydicom's broken files need a place
        path = root.joinpath(uids[0], uids[1], uids[2] + ".dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(
            getattr(ds, "filename", None), str
        ):  # one of pydicom's files: its bytes as they are, broken or not
            path.write_bytes(Path(ds.filename).read_bytes())
        else:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            path.write_bytes(buf.getvalue())
        rows.append(
            {
                "study_instance_uid": uids[0],
                "series_instance_uid": uids[1],
                "sop_instance_uid": uids[2],
                "patient_id": str(ds.get("PatientID", "")),
            }
        )
    return rows


def _export(tmp_path: Path, datasets, name="out", project="lung", **kw):
    d = kw.pop("deidentifier", None) or Deidentifier(
        ProjectKeys(SECRET, project), kw.pop("options", ProfileOptions()), allow_risky=kw.pop("allow_risky", False)
    )
    archive = tmp_path / f"archive-{name}"
    rows = _archive(archive, datasets)
    target = tmp_path / name
    summary = export_instances(rows, archive, target, deidentifier=d, **kw)
    return d, summary, target


def _exported(target: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(target.rglob("*.dcm"))]


def _pydicom_files() -> list[Dataset]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in get_testdata_files():
            try:
                out.append(pydicom.dcmread(path))
            except Exception:  # non-DICOM and deliberately broken files in pydicom's collection
                continue
    return out


EXPORT_OPTIONS = {
    "modified-dates": ProfileOptions(),
    "retain-and-clean": ProfileOptions(
        retain_patient_characteristics=True,
        retain_device_identity=True,
        retain_institution_identity=True,
        clean_descriptors=True,
        clean_structured_content=True,
        clean_graphics=True,
    ),
}


@pytest.mark.parametrize("options_name", sorted(EXPORT_OPTIONS))
def test_export_over_pydicom_files_and_generated_objects_reports_instead_of_crashing(tmp_path, options_name):
    generated = [identifying_object(kind) for kind in ("sr", "rtplan", "enhanced_ct", "ct")]
    bad_date = identifying_object("ct")
    bad_date.ContentDate = "20190510%"  # the value that stopped the old export after 128 objects
    sources = _pydicom_files() + generated + [bad_date]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d, summary, target = _export(tmp_path, copy.deepcopy(sources), options=EXPORT_OPTIONS[options_name])
    report = json.loads((target / REPORT_NAME).read_text())
    # objects were refused: the export is not the whole cohort and says so where a user looks
    assert f"{len(summary.refused)} objects refused" in (target / INCOMPLETE_NAME).read_text()
    assert summary.exported + len(summary.refused) + len(summary.withheld) == len(sources) and summary.exported > 100
    assert report["status"] == "partial" and report["exported"] == summary.exported
    assert report["table"].startswith("DICOM PS3.15 2026c Table E.1-1 (dicom-anonymizer")
    reasons = {r["reason"] for r in report["refused"]}
    assert "ContentDate: not a DA (YYYYMMDD)" in reasons
    assert not any(r.startswith("risky object") for r in reasons)  # withheld by policy: not a gap
    assert any(r["reason"].startswith("risky object: secondary capture") for r in report["withheld_by_policy"])
    assert summary.residual_hits == []
    by_sop = {d.keys.uid(str(s.SOPInstanceUID).strip()): s for s in sources if "SOPInstanceUID" in s}
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for out in _exported(target):  # read back from the export's files
            assert out.PatientIdentityRemoved == "YES"
            source = by_sop[out.SOPInstanceUID]
            assert scan(out, collect(source, d.table, d.options)) == []  # scanned again, from the files
            subject = d.subjects.subject(str(source.StudyInstanceUID).strip(), "")
            checked += check_actions(source, out, d, d.keys.date_shift_days(subject))
    assert checked > 4000  # every attribute of every exported object against its action
    text = (target / REPORT_NAME).read_text()
    for generated_object in generated:
        assert generated_object.SOPInstanceUID not in text  # the report names objects by pseudonymous UID only
    assert PATIENT_ID not in text and "Doe" not in text


@pytest.mark.parametrize(
    "options",
    [
        ProfileOptions(),
        ProfileOptions(clean_structured_content=True, clean_descriptors=True),
        EXPORT_OPTIONS["retain-and-clean"],
    ],
    ids=["default", "clean-content-and-descriptors", "retain-and-clean"],
)
def test_vendor_dose_reports_export_completely(tmp_path, options):
    """The vendor dose files (RDSR content trees, the ones that crashed the old export): all exported, scan clean."""
    files = sorted(dose_acceptance_dir().glob("*.dcm"))
    assert files, "the dose acceptance folder holds no .dcm files"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sources = [pydicom.dcmread(f) for f in files]
        _, summary, target = _export(tmp_path, sources, options=options)
    assert (summary.exported, summary.refused, summary.residual_hits) == (len(files), [], [])
    assert json.loads((target / REPORT_NAME).read_text())["status"] == "complete"


def test_risky_objects_are_refused_by_default_and_flagged_with_the_opt_in(tmp_path):
    burned = identifying_object("ct")
    burned.BurnedInAnnotation = "YES"
    capture = identifying_object("ct")
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    video = identifying_object("ct")
    video.SOPClassUID = video.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
    ultrasound = identifying_object("ct")
    ultrasound.SOPClassUID = ultrasound.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    pdf = identifying_object("ct")
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    plain = identifying_object("ct")
    objects = [burned, capture, video, ultrasound, pdf, plain]
    _, summary, target = _export(tmp_path, copy.deepcopy(objects))
    assert summary.exported == 1 and len(summary.withheld) == 5 and not summary.refused
    reasons = sorted(why.split(": ", 1)[1].split(" (export it with --allow-risky")[0] for _, why in summary.withheld)
    assert reasons == [
        "BurnedInAnnotation is YES (identifying text in the pixels)",
        "encapsulated document (its payload is not examined)",
        "secondary capture (screenshots often show names)",
        "ultrasound (text in the pixels is common)",
        "visible light / video (faces and text in the pixels)",
    ]
    assert len(json.loads((target / REPORT_NAME).read_text())["withheld_by_policy"]) == 5

    _, summary, target = _export(tmp_path, copy.deepcopy(objects), name="optin", allow_risky=True)
    assert summary.exported == 6 and not summary.refused and len(summary.risky_exported) == 5
    assert sorted(ds.PatientIdentityRemoved for ds in _exported(target)) == ["NO"] * 5 + ["YES"]
    report = json.loads((target / REPORT_NAME).read_text())
    assert len(report["risky_exported"]) == 5 and report["status"] == "complete"
    assert any("WARNING: 5 risky objects" in line for line in summary.lines())


def test_empty_patient_ids_are_pseudonymised_per_study(tmp_path):
    study_a, study_b = generate_uid(), generate_uid()
    objects = [
        identifying_object("ct", patient_id="", study_uid=study_a),
        identifying_object("ct", patient_id="", study_uid=study_a),
        identifying_object("ct", patient_id="", study_uid=study_b),
    ]
    _, summary, target = _export(tmp_path, objects, options=ProfileOptions(clean_descriptors=True))
    assert summary.exported == 3
    out = _exported(target)
    by_study: dict[str, set] = {}
    for ds in out:
        by_study.setdefault(ds.StudyInstanceUID, set()).add((ds.PatientID, ds.StudyDate))
    assert len(by_study) == 2 and all(len(v) == 1 for v in by_study.values())
    (a,), (b,) = by_study.values()
    assert a[0] != b[0] and a[0] and b[0]  # two patients with no ID are not merged


def test_a_study_with_mixed_patient_ids_is_never_split(tmp_path):
    study = generate_uid()
    objects = [identifying_object("ct", patient_id=pid, study_uid=study) for pid in ("MRN1", "MRN2", "MRN1", "")]
    _, summary, target = _export(tmp_path, objects, key_file=tmp_path / "key.csv")
    out = _exported(target)
    assert summary.exported == 4 and summary.mixed_patient_studies == 1
    rows = [line.split(",") for line in (tmp_path / "key.csv").read_text().splitlines()[1:]]
    assert sorted(r[1] for r in rows) == ["", "MRN1", "MRN2"] and len({r[3] for r in rows}) == 1
    assert len({ds.StudyInstanceUID for ds in out}) == 1
    assert len({(ds.PatientID, ds.PatientName, ds.StudyDate) for ds in out}) == 1
    assert json.loads((target / REPORT_NAME).read_text())["studies_with_several_patient_ids"] == 1


def test_an_export_in_batches_decides_each_study_from_its_whole_batch_and_refuses_a_split_study(tmp_path):
    mixed, other = generate_uid(), generate_uid()
    objects = [identifying_object("ct", patient_id=pid, study_uid=mixed) for pid in ("MRN2", "MRN1")]
    objects.append(identifying_object("ct", patient_id="MRN3", study_uid=other))
    rows = _archive(tmp_path / "a", objects)
    d = Deidentifier(ProjectKeys(SECRET, "lung"), ProfileOptions())
    summary = export_batches([rows[:2], rows[2:]], tmp_path / "a", tmp_path / "out", deidentifier=d)
    assert (summary.exported, summary.studies, summary.mixed_patient_studies) == (3, 2, 1)
    assert len({ds.PatientID for ds in _exported(tmp_path / "out") if ds.StudyInstanceUID == d.keys.uid(mixed)}) == 1
    with pytest.raises(ValueError, match="two batches"):
        export_batches([rows[:1], rows[1:]], tmp_path / "a", tmp_path / "split", deidentifier=d)


def test_two_projects_cannot_be_linked_and_one_project_is_stable(tmp_path):
    source = identifying_object("ct")
    runs = {}
    for name, project in (("x1", "project-x"), ("x2", "project-x"), ("y", "project-y")):
        _, _, target = _export(tmp_path, [copy.deepcopy(source)], name=name, project=project)
        [ds] = _exported(target)
        runs[name] = (ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.StudyDate)
    assert runs["x1"] == runs["x2"]
    assert all(a != b for a, b in zip(runs["x1"], runs["y"], strict=True))


def test_key_file_is_private_from_creation_and_never_inside_the_export(tmp_path):
    old = os.umask(0)  # even with a permissive umask
    try:
        d, _, target = _export(tmp_path, [identifying_object("ct")], key_file=tmp_path / "keys" / "key.csv")
    finally:
        os.umask(old)
    key = tmp_path / "keys" / "key.csv"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    [row] = key.read_text().splitlines()[1:]
    assert row.startswith(f"lung,{PATIENT_ID},{PATIENT_NAME},ANON")
    assert PATIENT_ID not in "".join(p.read_text(errors="ignore") for p in target.rglob("*.json"))
    for inside in (tmp_path / "inside" / "key.csv", tmp_path / "inside" / "a" / "key.csv"):
        with pytest.raises(KeyFileError, match="inside the export"):
            _export(tmp_path, [identifying_object("ct")], name="inside", key_file=inside)
        assert not inside.exists()
    with pytest.raises(KeyFileError, match="inside the export"):
        _export(tmp_path, [identifying_object("ct")], name="z.zip", key_file=tmp_path / "z.zip")
    # A folder named as the key file is refused before anything is exported.
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(KeyFileError, match="is a folder"):
        _export(tmp_path, [identifying_object("ct")], name="folder-key", key_file=tmp_path / "a-folder")
    assert not (tmp_path / "folder-key").exists()


def test_a_secret_file_others_can_read_is_refused_with_the_fix(tmp_path):
    secret = tmp_path / "site.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {secret}"):
        read_site_secret(secret)
    secret.chmod(0o600)
    assert read_site_secret(secret) == SECRET
    secret.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="at least 16"):
        read_site_secret(secret)


class _Leaky(Deidentifier):
    """A de-identifier with a bug: it leaves the patient's name in the study description."""

    def deidentify(self, ds: Dataset) -> Deidentified:
        name = str(ds.PatientName)
        result = super().deidentify(ds)
        result.dataset.StudyDescription = f"study of {name}"
        return result


@pytest.mark.parametrize("name", ["leak", "leak.zip"])
def test_a_residual_identifier_fails_the_export(tmp_path, name):
    leaky = _Leaky(ProjectKeys(SECRET, "lung"), ProfileOptions())
    _, summary, target = _export(
        tmp_path, [identifying_object("ct"), identifying_object("sr")], name, deidentifier=leaky
    )
    assert summary.failed and summary.exported == 0
    assert {where for _, where in summary.residual_hits} == {
        "StudyDescription holds a person name of the source object"
    }
    assert any(line.startswith("FAILED: the residual-identifier scan") for line in summary.lines())
    if name.endswith(".zip"):
        assert not target.exists()  # a zip that failed its scan is never published
    else:
        assert (target / INCOMPLETE_NAME).exists() and not list(target.rglob("*.dcm"))
        assert json.loads((target / REPORT_NAME).read_text())["status"] == "failed: residual identifiers found"


def test_an_interrupted_folder_export_stays_marked_incomplete(tmp_path):
    calls = []

    def stop_after_two(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _export(tmp_path, [identifying_object("ct") for _ in range(4)], progress=stop_after_two)
    target = tmp_path / "out"
    assert (target / INCOMPLETE_NAME).exists() and not (target / REPORT_NAME).exists()
    assert "do not use" in (target / INCOMPLETE_NAME).read_text()


def test_a_zip_export_carries_its_report(tmp_path):
    _, summary, target = _export(tmp_path, [identifying_object("ct"), identifying_object("rtplan")], "r.zip")
    with zipfile.ZipFile(target) as zf:
        names = zf.namelist()
        report = json.loads(zf.read(REPORT_NAME))
    assert len(names) == 3 and report["status"] == "complete" and report["exported"] == 2 == summary.exported
    assert [c["code"] for c in report["deidentification_method_codes"]] == ["113100", "113107"]


def test_a_plain_folder_export_is_marked_until_complete(tmp_path):
    rows = _archive(tmp_path / "a", [identifying_object("ct"), identifying_object("ct")])
    calls = []

    def stop_after_one(n: int) -> None:
        calls.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_instances(rows, tmp_path / "a", tmp_path / "stopped", progress=stop_after_one)
    assert (tmp_path / "stopped" / INCOMPLETE_NAME).exists()
    summary = export_instances(rows, tmp_path / "a", tmp_path / "done")
    assert summary.complete and summary.exported == 2
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == sorted(
        [REPORT_NAME, *(r["study_instance_uid"] for r in rows)]
    )
    report = json.loads((tmp_path / "done" / REPORT_NAME).read_text())
    assert (report["status"], report["exported"], report["deidentified"]) == ("complete", 2, False)


def _with_gaps(tmp_path: Path) -> tuple[list[dict], Path]:
    """Three archived objects indexed, one of them gone from the archive and one changed since it arrived."""
    archive = tmp_path / "a"
    rows = _archive(archive, [identifying_object("ct") for _ in range(3)])
    for row in rows:
        row["sha256"] = hashlib.sha256(archive.joinpath(*_uids(row)).read_bytes()).hexdigest()
    archive.joinpath(*_uids(rows[0])).unlink()
    archive.joinpath(*_uids(rows[1])).write_bytes(b"changed")
    return rows, archive


def _uids(row: dict) -> list[str]:
    return [row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"] + ".dcm"]


@pytest.mark.parametrize("research", [False, True])
def test_a_folder_export_with_objects_left_out_stays_marked_with_the_counts(tmp_path, research):
    rows, archive = _with_gaps(tmp_path)
    deidentifier = Deidentifier(ProjectKeys(SECRET, "lung"), ProfileOptions()) if research else None
    summary = export_instances(rows, archive, tmp_path / "out", deidentifier=deidentifier)
    assert not summary.complete and summary.exported == 1
    marker = (tmp_path / "out" / INCOMPLETE_NAME).read_text()
    assert "INCOMPLETE" in marker and "1 indexed objects not in the archive" in marker
    assert "1 archived objects differing from the SHA-256" in marker
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert (report["status"], len(report["not_in_archive"]), len(report["hash_mismatch"])) == ("partial", 1, 1)
    assert any(line.startswith("INCOMPLETE: written to") for line in summary.lines())


def test_a_zip_export_with_objects_left_out_is_not_published_under_its_name(tmp_path):
    rows, archive = _with_gaps(tmp_path)
    summary = export_instances(rows, archive, tmp_path / "c.zip")
    assert not (tmp_path / "c.zip").exists()
    assert summary.published == tmp_path / "c-INCOMPLETE.zip"
    with zipfile.ZipFile(tmp_path / "c-INCOMPLETE.zip") as zf:
        assert "2 objects" not in zf.read(INCOMPLETE_NAME).decode()
        assert "1 objects of 3 studies exported" in zf.read(INCOMPLETE_NAME).decode()
        assert json.loads(zf.read(REPORT_NAME))["status"] == "partial"
        assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == 1
    with pytest.raises(ExportError, match="c-INCOMPLETE.zip exists"):
        export_instances(rows, archive, tmp_path / "c.zip")
    complete = export_instances(rows[2:], archive, tmp_path / "d.zip")
    assert complete.complete and complete.published == tmp_path / "d.zip"
    with zipfile.ZipFile(tmp_path / "d.zip") as zf:
        assert INCOMPLETE_NAME not in zf.namelist() and json.loads(zf.read(REPORT_NAME))["status"] == "complete"


def _secondary_capture() -> Dataset:
    capture = identifying_object("ct")
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    return capture


@pytest.mark.parametrize("name", ["out", "out.zip"])
def test_objects_withheld_by_the_risk_policy_alone_leave_the_export_complete(tmp_path, name):
    """A CT study's dose screen (a secondary capture) is withheld by policy: not a gap. The export gets its
    final name, no marker, status complete; the withheld objects are counted and named (pseudonymously)."""
    d, summary, target = _export(tmp_path, [identifying_object("ct"), _secondary_capture()], name)
    assert summary.complete and summary.status == "complete" and summary.exported == 1
    assert summary.published == target and not summary.refused and len(summary.withheld) == 1
    if name.endswith(".zip"):
        with zipfile.ZipFile(target) as zf:
            assert INCOMPLETE_NAME not in zf.namelist()
            report = json.loads(zf.read(REPORT_NAME))
    else:
        assert not (target / INCOMPLETE_NAME).exists()
        report = json.loads((target / REPORT_NAME).read_text())
    [source_sop] = [uid for uid, _ in summary.withheld]
    assert report["status"] == "complete" and report["refused"] == []
    assert report["withheld_by_policy"] == [
        {"sop_instance_uid": d.keys.uid(source_sop), "reason": summary.withheld[0][1]}
    ]
    lines = summary.lines()
    assert lines[0].endswith("; 1 withheld by the risk policy")
    assert f"  {d.keys.uid(source_sop)}: {summary.withheld[0][1]}" in lines
    assert source_sop not in "\n".join(lines) and not any(line.startswith("INCOMPLETE") for line in lines)


def test_a_gap_beside_withheld_objects_still_marks_the_export_incomplete(tmp_path):
    rows, archive = _with_gaps(tmp_path)
    rows += _archive(archive, [_secondary_capture()])
    d = Deidentifier(ProjectKeys(SECRET, "lung"), ProfileOptions())
    summary = export_instances(rows, archive, tmp_path / "g.zip", deidentifier=d)
    assert not summary.complete and len(summary.withheld) == 1
    assert summary.published == tmp_path / "g-INCOMPLETE.zip"
    with zipfile.ZipFile(summary.published) as zf:
        marker = zf.read(INCOMPLETE_NAME).decode()
    assert "1 indexed objects not in the archive" in marker and "1 objects withheld by the risk policy" in marker


@pytest.mark.parametrize("name", ["empty", "empty.zip"])
def test_an_export_without_any_instance_is_an_error_and_leaves_nothing(tmp_path, name):
    with pytest.raises(NothingToExport, match="no object to export"):
        export_batches([[], []], tmp_path / "a", tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no zip, no partial file


def test_a_zip_never_replaces_a_file_made_under_its_name_while_it_ran(tmp_path):
    rows = _archive(tmp_path / "a", [identifying_object("ct"), identifying_object("ct")])
    target = tmp_path / "c.zip"
    partials: list[list[str]] = []

    def someone_else_writes_the_name(n: int) -> None:
        partials.append(sorted(p.name for p in tmp_path.glob(".c.zip.*.partial")))
        if not target.exists():
            target.write_bytes(b"the user's own file")

    with pytest.raises(ExportError, match="c.zip was created while the export ran"):
        export_instances(rows, tmp_path / "a", target, progress=someone_else_writes_the_name)
    assert target.read_bytes() == b"the user's own file"
    assert not list(tmp_path.glob(".c.zip*"))  # the temporary zip removed
    # one temporary zip, named uniquely per export (two exports to one name never share it)
    [[partial], _] = partials
    assert partial.startswith(".c.zip.") and partial.endswith(".partial") and partial != ".c.zip.partial"


def test_two_exports_to_one_zip_name_do_not_share_a_temporary_file(tmp_path):
    rows = _archive(tmp_path / "a", [identifying_object("ct"), identifying_object("ct")])
    target = tmp_path / "c.zip"
    inner: list[object] = []

    def a_second_export_runs_meanwhile(n: int) -> None:
        if not inner:
            inner.append(export_instances(rows[:1], tmp_path / "a", target))

    with pytest.raises(ExportError, match="was created while the export ran"):
        export_instances(rows, tmp_path / "a", target, progress=a_second_export_runs_meanwhile)
    with zipfile.ZipFile(target) as zf:  # the second export's zip, whole and not overwritten
        assert zf.testzip() is None and json.loads(zf.read(REPORT_NAME))["exported"] == 1
    assert not list(tmp_path.glob(".c.zip*"))


def test_plain_export_refuses_a_key_file(tmp_path):
    rows = _archive(tmp_path / "a", [identifying_object("ct")])
    with pytest.raises(ExportError, match="only makes sense"):
        export_instances(rows, tmp_path / "a", tmp_path / "o", key_file=tmp_path / "k.csv")
    assert SOP_CLASSES  # the generator's classes are the ones the other tests export


def test_a_zip_is_written_private_and_a_killed_exports_partial_file_is_replaced(tmp_path):
    """The zip fills under `.<name>.<random>.partial` beside the target. It was opened with ZipFile(path,
    "w"): 0644 with the usual umask while it filled with patient data, and one left by a killed export (its
    ``finally`` never ran) stayed. Now a killed export's (its lock gone with it) is removed and the new one
    made 600; the published zip (a link to it) is 600 too."""
    rows = _archive(tmp_path / "a", [identifying_object("ct"), identifying_object("ct")])
    target = tmp_path / "cohort.zip"
    stale = tmp_path / ".cohort.zip.0123456789ab.partial"
    stale.write_bytes(b"a killed export's patient data")
    stale.chmod(0o644)
    seen: list[list[int]] = []

    def look(n: int) -> None:
        live = [p for p in tmp_path.glob(".cohort.zip.*.partial") if p != stale]
        seen.append([p.stat().st_mode & 0o777 for p in live])

    with umask(0o022):
        summary = export_instances(rows, tmp_path / "a", target, progress=look)
    assert summary.complete and summary.exported == 2
    assert seen == [[0o600], [0o600]]
    assert not stale.exists() and not list(tmp_path.glob(".cohort.zip.*.partial"))
    assert target.stat().st_mode & 0o777 == 0o600
    with zipfile.ZipFile(target) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == 2 and zf.testzip() is None


def test_key_file_cells_a_spreadsheet_would_run_are_quoted(tmp_path):
    import csv

    obj = identifying_object("ct", patient_id="-4711")
    obj.PatientName = "=HYPERLINK^X"
    _export(tmp_path, [obj], key_file=tmp_path / "key.csv")
    [row] = list(csv.DictReader((tmp_path / "key.csv").open(encoding="utf-8")))
    assert (row["original_patient_id"], row["original_patient_name"]) == ("'-4711", "'=HYPERLINK^X")
    assert not row["pseudonym_patient_id"].startswith("'")
