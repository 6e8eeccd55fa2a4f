"""Bad input over the real DICOM network: a clear failure status, nothing written, still serving."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from diana.producers.scp import STATUS
from tests.support.dicomgen import make_instance
from tests.support.helpers import RawStoreSender, storescu, wait_until_caught_up


def _send_file(cfg, path: Path) -> int:
    """C-STORE the raw data set of a Part-10 file, whatever it holds."""
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        meta = pydicom.filereader._read_file_meta_info(fh)
        body = raw[fh.tell() :]
    sender = RawStoreSender(cfg, aet="BADSENDER")
    try:
        status = sender.send(meta.MediaStorageSOPInstanceUID, body)
    finally:
        sender.close()
    assert status is not None, "no C-STORE response"
    return status


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _snapshot(cfg, sandbox: Path) -> dict[str, set[str]]:
    return {
        "landing": _tree(cfg.path(cfg.storage.landing_dir)),
        "archive": _tree(cfg.path(cfg.storage.archive_dir)),
        "sandbox": _tree(sandbox),
    }


@pytest.mark.parametrize("case", ["missing_sop_instance_uid", "traversal_uid", "traversal_study_uid"])
def test_bad_identifiers_fail_cleanly_and_receiver_keeps_serving(pipeline, tmp_path, case):
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    sop_uid = generate_uid()
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="BAD1", study_date="20240101", sop_uid=sop_uid)
    if case == "missing_sop_instance_uid":
        del ds.SOPInstanceUID
    elif case == "traversal_uid":
        ds.SOPInstanceUID = "../../../../tmp/diana-escape"
    else:
        ds.StudyInstanceUID = "1.2/../../../escape"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    before = _snapshot(cfg, tmp_path)

    status = _send_file(cfg, bad)

    assert status == STATUS.INVALID_DATASET
    assert _snapshot(cfg, tmp_path) == before  # nothing half-written, nothing outside the roots
    assert not Path("/tmp/diana-escape").exists()
    assert not (cfg.path(cfg.storage.archive_dir).parent / "escape").exists()

    # The same association endpoint keeps serving: a good instance right after is accepted.
    good = make_instance(generate_uid(), generate_uid(), 1, patient_id="GOOD1", study_date="20240101")
    good_path = tmp_path / "good.dcm"
    good.save_as(good_path, enforce_file_format=True)
    result = storescu(cfg, [good_path])
    assert result.returncode == 0, result.stdout + result.stderr
    assert pipeline.procs["receiver"].poll() is None


def test_undecodable_dataset_gets_cannot_understand(pipeline, tmp_path):
    cfg = pipeline.cfg
    wait_until_caught_up(cfg)
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="BAD2", study_date="20240101")
    path = tmp_path / "trunc.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    # Keep the file meta, then an element header that claims far more bytes than follow.
    meta_end = raw.index(b"\x08\x00\x16\x00")  # (0008,0016) SOP Class UID: first data set element
    path.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2.3")
    before = _snapshot(cfg, tmp_path)

    status = _send_file(cfg, path)

    assert status == STATUS.CANNOT_UNDERSTAND
    assert _snapshot(cfg, tmp_path) == before
    assert pipeline.procs["receiver"].poll() is None
