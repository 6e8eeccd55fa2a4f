"""On the real stack, with raw sockets and dcmtk: hostile or slow peers cannot stop the receiver
serving others, and a data set must be of the SOP Class negotiated for it."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from pydicom.uid import generate_uid

from diana.producers.landing import LandingStore
from diana.producers.scp import STATUS
from tests.support.dicomgen import make_instance
from tests.support.helpers import DCMTK_ENV, RawStoreSender, dataset_body, storescu, wait_until_caught_up
from tests.support.pki import make_certificates

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _good_file(tmp_path: Path, patient_id: str) -> Path:
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id=patient_id, study_date="20240610")
    path = tmp_path / f"{patient_id}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _logged(pipeline, name: str, text: str, within_s: float = 15) -> bool:
    """The process' log (written through a buffer) shows ``text`` within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if text in pipeline.log_text(name):
            return True
        time.sleep(0.5)
    return False


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True if the receiver closed (or reset) the connection within ``within_s``."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_connection_that_never_starts_tls_leaves_others_served(pipeline, extra_receiver, tmp_path):
    pki = make_certificates(tmp_path)
    cfg = extra_receiver(
        11196, tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]), tls_handshake_timeout_s="5"
    )
    tls = ["+tla", "+cf", str(pki["ca.pem"])]
    echo = ["echoscu", *tls, "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port)]
    for _ in range(60):
        if subprocess.run(echo, capture_output=True, env=DCMTK_ENV).returncode == 0:
            break
        time.sleep(0.5)

    idle = socket.create_connection(("127.0.0.1", cfg.receiver.port))  # connects, never says ClientHello
    try:
        time.sleep(0.5)
        started = time.monotonic()
        sent = storescu(cfg, [_good_file(tmp_path, "TLSIDLE1")], extra=tls)
        took = time.monotonic() - started
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert took < 4, f"storescu waited {took:.1f} s behind the idle connection"
        assert _closed_by_peer(idle, within_s=15), "the idle connection was never given up on"
    finally:
        idle.close()
    assert _logged(pipeline, "receiver-11196", "connection.failed")


def test_a_pdu_announcing_4_gb_is_refused_before_anything_is_read(pipeline, extra_receiver, tmp_path):
    cfg = extra_receiver(11197)
    receiver = pipeline.procs["receiver-11197"]
    before = _peak_rss_mb(receiver.pid)
    hostile = socket.create_connection(("127.0.0.1", cfg.receiver.port))
    try:
        hostile.sendall(b"\x01\x00" + (0xFFFFFFFF).to_bytes(4, "big"))  # A-ASSOCIATE-RQ of 4 GB
        junk = bytes(1 << 20)
        pushed = 0
        try:
            for _ in range(64):  # what the receiver would have buffered
                hostile.sendall(junk)
                pushed += len(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _closed_by_peer(hostile, within_s=10)
    finally:
        hostile.close()
    print(
        f"pushed {pushed >> 20} MiB before the receiver closed; peak RSS {before:.0f} -> {_peak_rss_mb(receiver.pid):.0f} MB"
    )
    assert _peak_rss_mb(receiver.pid) < before + 20
    assert _logged(pipeline, "receiver-11197", "PDU longer than the maximum")
    sent = storescu(cfg, [_good_file(tmp_path, "AFTERPDU1")])
    assert sent.returncode == 0, sent.stdout + sent.stderr


def test_fifty_connections_from_one_address_leave_another_address_served(pipeline, extra_receiver, tmp_path):
    cfg = extra_receiver(11198, max_associations_per_host="8")
    flood = []
    try:
        for _ in range(50):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.2", 0))  # another loopback address: another peer
            sock.connect(("127.0.0.1", cfg.receiver.port))
            flood.append(sock)
        time.sleep(1)
        sent = storescu(cfg, [_good_file(tmp_path, "OTHERHOST1")])  # from 127.0.0.1
        assert sent.returncode == 0 and "Association Rejected" not in sent.stdout + sent.stderr, (
            sent.stdout + sent.stderr
        )
        refused = sum(_closed_by_peer(sock, within_s=0.2) for sock in flood)
        assert refused == 42  # 8 held, the rest closed at once
    finally:
        for sock in flood:
            sock.close()
    assert _logged(pipeline, "receiver-11198", "max_associations_per_host reached")


def test_a_peer_that_stops_mid_pdu_is_cut_off(pipeline, extra_receiver, tmp_path):
    cfg = extra_receiver(11199, pdu_read_timeout_s="3")
    slow = socket.create_connection(("127.0.0.1", cfg.receiver.port))
    try:
        slow.sendall(b"\x01\x00" + (200).to_bytes(4, "big") + b"\x00\x01\x00\x00")  # 4 of 200 bytes, then nothing
        started = time.monotonic()
        assert _closed_by_peer(slow, within_s=20)
        print(f"cut off after {time.monotonic() - started:.1f} s")
    finally:
        slow.close()
    assert _logged(pipeline, "receiver-11199", "PDU not received in time")
    sent = storescu(cfg, [_good_file(tmp_path, "AFTERSLOW1")])
    assert sent.returncode == 0, sent.stdout + sent.stderr


def test_a_data_set_of_another_sop_class_than_negotiated_is_refused(pipeline, tmp_path):
    cfg = pipeline.cfg
    path = _good_file(tmp_path, "WRONGCLASS1")  # a CT image...
    sender = RawStoreSender(cfg, sop_class=MR_IMAGE, aet="WRONGCLASS")  # ...offered as MR Image Storage
    try:
        from pydicom import dcmread

        status = sender.send(dcmread(path).SOPInstanceUID, dataset_body(path))
    finally:
        sender.close()
    assert status == STATUS.INVALID_DATASET


def test_landed_objects_left_behind_are_republished_while_running(pipeline, extra_receiver, tmp_path):
    cfg = extra_receiver(11200, reconcile_interval_s="2", reconcile_after_s="1")
    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="LEFTBEHIND1", study_date="20240611")
    path = tmp_path / "left.dcm"
    ds.save_as(path, enforce_file_format=True)
    # As after a crash between landing and publishing: bytes in the landing store, no event.
    LandingStore(cfg.path(cfg.storage.landing_dir)).put(path.read_bytes())
    archived = (
        cfg.path(cfg.storage.archive_dir) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not archived.exists():
        time.sleep(0.5)
    assert archived.exists(), "a landed object without an event was never republished"
    assert _logged(pipeline, "receiver-11200", "reconcile.republished")
    wait_until_caught_up(cfg)


def test_an_association_that_trickles_whole_pdus_is_ended_by_its_average_rate(pipeline, extra_receiver):
    """Each PDU complete and quick, but one a second: only the association's average rate shows it."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg = extra_receiver(11201, min_bytes_per_s="1000", min_rate_after_s="3")
    ae = AE(ae_title="TRICKLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    # P-DATA-TF: one PDV of one byte, a command fragment that is not the last (the message never ends).
    pdv = bytes([context_id, 0x01]) + b"\x00"
    pdu = b"\x04\x00" + (4 + len(pdv)).to_bytes(4, "big") + len(pdv).to_bytes(4, "big") + pdv
    deadline = time.monotonic() + 30
    while assoc.is_established and time.monotonic() < deadline:
        try:
            assoc.dul.socket.send(pdu)
        except (OSError, AttributeError):
            break
        time.sleep(1)
    took = 30 - (deadline - time.monotonic())
    assert not assoc.is_established, "the trickling association was never ended"
    print(f"ended after {took:.1f} s")
    assert took < 15
    assert _logged(pipeline, "receiver-11201", "association slower than min_bytes_per_s")
