"""Security with dcmtk as the peer: the calling-AE allow-list and DICOM over TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.dicomgen import make_study
from tests.support.helpers import DCMTK_ENV, storescu, wait_until_caught_up
from tests.support.pki import make_certificates


def test_only_allowed_calling_aes_may_associate(pipeline, extra_receiver, tmp_path):
    cfg = extra_receiver(11192, allowed_calling_aes="CT_ROOM_1,ECHOSCU")
    study = make_study(tmp_path / "s", patient_id="ALLOW1")
    files = study.files[:3]

    refused = storescu(cfg, files, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    log = pipeline.log_text("receiver-11192")
    assert "association.rejected" in log and "INTRUDER" in log and "allowed_calling_aes" in log

    accepted = storescu(cfg, files, aet="CT_ROOM_1")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    wait_until_caught_up(cfg)
    assert len(list((cfg.path(cfg.storage.archive_dir) / study.study_uid).rglob("*.dcm"))) == 3


def test_only_allowed_hosts_may_associate_by_address_or_network(pipeline, extra_receiver, tmp_path):
    """``allowed_hosts`` with a network (127.0.0.0/31: .0 and .1): dcmtk's storescu from 127.0.0.1 is
    admitted; a pynetdicom SCU bound to 127.0.0.2 (another loopback address) is rejected and logged."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg = extra_receiver(11193, allowed_hosts="127.0.0.0/31")
    study = make_study(tmp_path / "s", patient_id="ALLOWHOST1")
    accepted = storescu(cfg, study.files[:2])
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr

    ae = AE(ae_title="OUTSIDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title, bind_address=("127.0.0.2", 0))
    try:
        assert assoc.is_rejected, "a peer outside allowed_hosts was not rejected"
    finally:
        if assoc.is_established:
            assoc.release()
    log = pipeline.log_text("receiver-11193")
    assert "association.rejected" in log and "host not in allowed_hosts" in log and "127.0.0.2" in log
    wait_until_caught_up(cfg)
    assert len(list((cfg.path(cfg.storage.archive_dir) / study.study_uid).rglob("*.dcm"))) == 2


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("pki"))


def test_tls_with_dcmtk_storescu(pipeline, extra_receiver, certificates, tmp_path):
    c = certificates
    cfg = extra_receiver(
        11193, tls_cert_file=str(c["server.pem"]), tls_key_file=str(c["server.key"]), tls_ca_file=str(c["ca.pem"])
    )
    study = make_study(tmp_path / "s", patient_id="TLS1")
    files = study.files[:4]
    tls = ["+tls", str(c["client.key"]), str(c["client.pem"]), "+cf", str(c["ca.pem"])]

    # Wait until the TLS listener answers (echoscu over TLS).
    for _ in range(60):
        echo = subprocess.run(
            ["echoscu", *tls, "-aec", cfg.receiver.ae_title, "127.0.0.1", str(cfg.receiver.port)],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
        )
        if echo.returncode == 0:
            break
        subprocess.run(["sleep", "0.5"])
    assert echo.returncode == 0, echo.stdout + echo.stderr

    sent = storescu(cfg, files, extra=tls)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    plain = storescu(cfg, files[:1])  # no TLS: no association
    assert plain.returncode != 0
    no_client_cert = storescu(cfg, files[:1], extra=["+tla", "+cf", str(c["ca.pem"])])
    assert no_client_cert.returncode != 0  # tls_ca_file set: a client certificate is required

    wait_until_caught_up(cfg)
    assert len(list((cfg.path(cfg.storage.archive_dir) / study.study_uid).rglob("*.dcm"))) == 4
