"""Scale and shape of input: concurrent associations, the association limit, a 1 GiB object,
every common transfer syntax stored byte for byte, and non-DICOM traffic on the port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.dicomgen import SeriesSpec, make_instance, make_study
from tests.support.helpers import DCMTK_ENV, dataset_body, storescu, wait_until_caught_up
from tests.support.stack import wait_for_echo


def test_sixteen_simultaneous_associations(pipeline, tmp_path):
    cfg = pipeline.cfg
    studies = [make_study(tmp_path / f"s{i}", [SeriesSpec("CT", "PARALLEL", 15)]) for i in range(16)]
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port), *map(str, s.files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        for s in studies
    ]
    outputs = [p.communicate(timeout=180)[0].decode() for p in senders]
    assert [p.returncode for p in senders] == [0] * 16, "\n".join(outputs)
    wait_until_caught_up(cfg)
    archive = cfg.path(cfg.storage.archive_dir)
    assert [len(list((archive / s.study_uid).rglob("*.dcm"))) for s in studies] == [15] * 16


def test_associations_above_the_maximum_get_a_proper_reject(pipeline):
    cfg = pipeline.cfg
    assert cfg.receiver.max_associations == 16
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title) for _ in range(16)]
    try:
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
        assert extra.is_rejected, "the 17th association was not rejected"
        assert (
            extra.acceptor.primitive.result,
            extra.acceptor.primitive.result_source,
            extra.acceptor.primitive.diagnostic,
        ) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    finally:
        for a in held:
            a.release()
    time.sleep(1)
    again = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
    assert again.is_established  # capacity comes back
    again.release()


def _write_large_multiframe(path: Path, frames: int, rows: int = 512) -> None:
    """A multi-frame CT of frames×rows×rows×2 bytes, streamed to disk (never built in memory)."""
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="BIG1", study_date="20240701", rows=rows)
    del ds.PixelData
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (rows * rows * 2 // 256)
    with open(path, "ab") as fh:
        length = frames * len(frame)
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        for _ in range(frames):
            fh.write(frame)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_one_gib_object_is_received_without_holding_it_in_memory(pipeline, extra_receiver, tmp_path):
    cfg = extra_receiver(11194)
    big = tmp_path / "big.dcm"
    _write_large_multiframe(big, frames=2048)  # 2048 × 512 × 512 × 2 bytes = 1 GiB of pixel data
    assert big.stat().st_size > 1024**3
    receiver = pipeline.procs["receiver-11194"]

    sent = storescu(cfg, [big])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    peak = _peak_rss_mb(receiver.pid)
    assert peak < 300, f"receiver peak RSS {peak:.0f} MB"

    wait_until_caught_up(cfg, timeout=300)
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    archived = (
        cfg.path(cfg.storage.archive_dir) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    assert archived.stat().st_size - len(dataset_body(archived)) + len(dataset_body(big)) == archived.stat().st_size
    with open(big, "rb") as a, open(archived, "rb") as b:
        a.seek(a.seek(0, 2) - 4096)
        b.seek(b.seek(0, 2) - 4096)
        assert a.read() == b.read()  # the tail of the pixel data arrived intact
    archived.unlink()  # 1 GiB: do not keep it around for the rest of the session


# name: (transfer syntax, the storescu option that proposes it)
TRANSFER_SYNTAXES = {
    "implicit little endian": ("1.2.840.10008.1.2", "-xi"),
    "explicit little endian": ("1.2.840.10008.1.2.1", "-xe"),
    "deflated explicit little endian": ("1.2.840.10008.1.2.1.99", "-xd"),
    "JPEG baseline": ("1.2.840.10008.1.2.4.50", "-xy"),
    "JPEG lossless SV1": ("1.2.840.10008.1.2.4.70", "-xs"),
    "JPEG-LS lossless": ("1.2.840.10008.1.2.4.80", "-xt"),
    "JPEG 2000 lossless": ("1.2.840.10008.1.2.4.90", "-xv"),
    "RLE lossless": ("1.2.840.10008.1.2.5", "-xr"),
}


def _instance_in(ts: str, study: str, series: str, number: int) -> Dataset:
    ds = make_instance(study, series, number, patient_id="TSX", study_date="20240801")
    ds.file_meta.TransferSyntaxUID = ts
    if pydicom.uid.UID(ts).is_compressed:
        # The receiver stores what it is sent; a stand-in codestream is enough to prove it.
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
    return ds


def test_common_transfer_syntaxes_are_stored_byte_for_byte(pipeline, tmp_path):
    cfg = pipeline.cfg
    study, series = generate_uid(), generate_uid()
    files = {}
    for number, (name, (ts, _)) in enumerate(TRANSFER_SYNTAXES.items(), start=1):
        ds = _instance_in(ts, study, series, number)
        path = tmp_path / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=ts == "1.2.840.10008.1.2", little_endian=True)
        files[name] = path
    # One association per file: storescu proposes each file's own transfer syntax.
    for name, path in files.items():
        sent = storescu(cfg, [path], extra=["-R", TRANSFER_SYNTAXES[name][1]])
        assert sent.returncode == 0, f"{name}: {sent.stdout}{sent.stderr}"
    wait_until_caught_up(cfg)
    archive = cfg.path(cfg.storage.archive_dir) / study / series
    for name, path in files.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = archive / f"{ds.SOPInstanceUID}.dcm"
        assert dataset_body(stored) == dataset_body(path), name
        assert (
            pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name][0]
        )


def test_non_dicom_bytes_and_aborted_transfers_leave_the_receiver_serving(pipeline, tmp_path):
    cfg = pipeline.cfg
    # An HTTP request and random bytes on the DICOM port.
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 64):
        with socket.create_connection(("127.0.0.1", cfg.receiver.port), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # A sender killed mid-transfer of a large object.
    big = tmp_path / "big.dcm"
    _write_large_multiframe(big, frames=400)
    sender = subprocess.Popen(
        ["storescu", "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port), str(big)], env=DCMTK_ENV
    )
    incoming = cfg.path(cfg.storage.landing_dir) / ".incoming"
    deadline = time.monotonic() + 30
    while not any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.kill()
    sender.wait()
    deadline = time.monotonic() + 30
    while any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(incoming.iterdir()), "half-received data set left behind"
    assert pipeline.procs["receiver"].poll() is None
    wait_for_echo(cfg, timeout=10)
    small = make_study(tmp_path / "after", [SeriesSpec("CT", "AFTER", 2)])
    assert storescu(cfg, small.files).returncode == 0
