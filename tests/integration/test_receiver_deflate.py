"""On the real stack: Deflated Explicit VR Little Endian objects are stored and read, a deflate
bomb is refused while the receiver's memory stays bounded."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from diana.producers.scp import STATUS
from tests.support import dosebuilder as b
from tests.support.dicomgen import make_instance, write_deflate_bomb, write_deflated
from tests.support.helpers import (
    RawStoreSender,
    dataset_body,
    os_search,
    stored_sha256,
    storescu,
    wait_until_caught_up,
)


def _archived(cfg, ds) -> Path:
    return cfg.path(cfg.storage.archive_dir) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_deflated_dose_report_and_small_data_set_are_stored_and_the_dose_read(pipeline, tmp_path):
    cfg = pipeline.cfg
    study = generate_uid()
    report = b.ct_report(
        [b.ct_event(generate_uid(), ctdivol="12.5", dlp="400"), b.ct_event(generate_uid(), ctdivol="3.5", dlp="60")],
        total_dlp="460",
        study_uid=study,
        patient_id="DEFLATE1",
    )
    report_path = b.save(report, tmp_path / "report.dcm")
    # storescu -xd proposes Deflated first: accepted, storescu deflates the report on the wire.
    result = storescu(cfg, [report_path], extra=["-xd", "-v"], aet="DEFLATER")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Received Store Response (Success)" in output, output
    assert "Deflated Explicit VR Little Endian" in output

    # A small data set without pixel data, deflated by pydicom, sent byte for byte.
    small = make_instance(generate_uid(), generate_uid(), 1, patient_id="DEFLATE2", study_date="20240608")
    del small.PixelData
    small_path = write_deflated(small, tmp_path / "small.dcm")
    body = dataset_body(small_path)
    sender = RawStoreSender(cfg, aet="DEFLATER", transfer_syntax=DeflatedExplicitVRLittleEndian)
    try:
        status = sender.send(small.SOPInstanceUID, body)
    finally:
        sender.close()
    assert status == STATUS.SUCCESS

    # A deflated dose report offered with Deflated alone (as pynetdicom senders do): before, its
    # header was refused here, lengths in the inflated data compared with the deflated size
    # ("element (0040,A730) claims 3128 bytes, only 816 follow: truncated").
    second = b.ct_report(
        [b.ct_event(generate_uid(), ctdivol="7.5", dlp="300")], total_dlp="300", study_uid=generate_uid()
    )
    second_path = write_deflated(second, tmp_path / "second.dcm")
    sender = RawStoreSender(cfg, sop_class=b.XRAY_RDSR, aet="DEFLATER", transfer_syntax=DeflatedExplicitVRLittleEndian)
    try:
        assert sender.send(second.SOPInstanceUID, dataset_body(second_path)) == STATUS.SUCCESS
    finally:
        sender.close()

    wait_until_caught_up(cfg)
    stored_report = _archived(cfg, report)
    assert pydicom.dcmread(stored_report).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    stored_small = _archived(cfg, small)
    expected = stored_sha256(small.SOPClassUID, small.SOPInstanceUID, DeflatedExplicitVRLittleEndian, body)
    assert hashlib.sha256(stored_small.read_bytes()).hexdigest() == expected
    [doc] = os_search(cfg, "diana-instances", {"term": {"sop_instance_uid": small.SOPInstanceUID}})
    assert doc["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian and doc["patient_id"] == "DEFLATE2"
    assert not doc.get("header_omitted")

    by_study = {"term": {"study_instance_uid": study}}
    deadline = time.monotonic() + 90
    events: list[dict] = []
    while time.monotonic() < deadline and len(events) < 2:
        events = os_search(cfg, "diana-dose-events", by_study)
        time.sleep(1)
    assert sorted(e["ctdivol_mGy"] for e in events) == [3.5, 12.5]
    assert _archived(cfg, second).exists()
    second_events: list[dict] = []
    while time.monotonic() < deadline and not second_events:
        second_events = os_search(cfg, "diana-dose-events", {"term": {"study_instance_uid": second.StudyInstanceUID}})
        time.sleep(1)
    assert [e["ctdivol_mGy"] for e in second_events] == [7.5]


def test_deflate_bomb_is_refused_while_the_receivers_memory_stays_bounded(pipeline, extra_receiver, tmp_path):
    cap = 256 * 1024 * 1024
    cfg = extra_receiver(11195, max_inflated_bytes=str(cap))
    receiver = pipeline.procs["receiver-11195"]
    bomb = tmp_path / "bomb.dcm"
    sop, size = write_deflate_bomb(bomb, inflated_bytes=4 << 30)
    print(f"bomb: {size} bytes on the wire, 4 GiB inflated")
    assert size < 8 << 20
    incoming = cfg.path(cfg.storage.landing_dir) / ".incoming"

    sender = RawStoreSender(cfg, aet="BOMBER", transfer_syntax=DeflatedExplicitVRLittleEndian)
    try:
        status = sender.send(sop, dataset_body(bomb))
    finally:
        sender.close()

    assert status == STATUS.CANNOT_UNDERSTAND
    peak = _peak_rss_mb(receiver.pid)
    print(f"receiver peak RSS {peak:.0f} MB")
    assert peak < 300, f"receiver peak RSS {peak:.0f} MB"
    assert "inflates past 268435456 bytes" in pipeline.log_text("receiver-11195")
    assert not list(incoming.glob(".inflate-*"))  # the partial inflation is gone
    # Still serving
    good = make_instance(generate_uid(), generate_uid(), 1, patient_id="AFTERBOMB", study_date="20240608")
    good_path = tmp_path / "good.dcm"
    good.save_as(good_path, enforce_file_format=True)
    result = storescu(cfg, [good_path])
    assert result.returncode == 0, result.stdout + result.stderr
    assert receiver.poll() is None
