"""On the real stack: the archive keeps the encoding the sender chose (dcmtk's dcmsend)."""

from __future__ import annotations

import subprocess

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support.dicomgen import make_instance
from tests.support.helpers import DCMTK_ENV, dataset_body, wait_until_caught_up


def test_explicit_vr_object_from_dcmsend_is_archived_in_explicit_vr_with_private_vrs_intact(pipeline, tmp_path):
    cfg = pipeline.cfg
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="EVRLE1", study_date="20240606")
    block = ds.private_block(0x0009, "GEMS_IDEN_01", create=True)
    block.add_new(0x02, "SH", "SUITE01")  # GE's Suite Id: a private string
    block.add_new(0x04, "SH", "CT99")  # Product Id
    path = tmp_path / "ge.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    # dcmsend proposes Explicit VR Little Endian, Explicit Big Endian and Implicit VR Little Endian in one context.
    result = subprocess.run(
        ["dcmsend", "-v", "-aet", "DCMSEND", "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port), path],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    assert result.returncode == 0 and "with status SUCCESS  : 1" in result.stderr, result.stdout + result.stderr

    wait_until_caught_up(cfg)
    archived = (
        cfg.path(cfg.storage.archive_dir) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    stored = pydicom.dcmread(archived)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored[0x00091002].VR == "SH" and stored[0x00091002].value == "SUITE01"
    assert stored[0x00091004].VR == "SH" and stored[0x00091004].value == "CT99"
    assert stored[0x00090010].value == "GEMS_IDEN_01"
    # Not re-encoded at all: the data set is the sender's, byte for byte.
    assert archived.read_bytes().endswith(dataset_body(path))
