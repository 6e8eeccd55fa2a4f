"""The receiver's default is open (a modality must be able to send), but said: one start-up warning and the
gauge diana_receiver_open_to_any_peer when it listens off loopback with no allow-list and no client
certificates (producers/scp.py)."""

from __future__ import annotations

from dataclasses import replace

import structlog
from prometheus_client import REGISTRY

from diana.config import ReceiverConfig
from diana.producers.scp import announce_exposure, open_to_any_peer


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("diana_receiver_open_to_any_peer")


def test_open_only_off_loopback_without_an_allow_list_or_client_certificates():
    default = ReceiverConfig()
    assert default.host == "0.0.0.0" and open_to_any_peer(default)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert not open_to_any_peer(replace(default, host=host)), host
    assert open_to_any_peer(replace(default, host="10.1.2.3"))
    assert not open_to_any_peer(replace(default, allowed_hosts=("10.1.2.0/24",)))
    assert not open_to_any_peer(replace(default, allowed_calling_aes=("CT1",)))
    client_certificates = replace(default, tls_cert_file="s.pem", tls_key_file="s.key", tls_ca_file="ca.pem")
    assert not open_to_any_peer(client_certificates)
    # TLS without client certificates encrypts, but still lets anyone store.
    assert open_to_any_peer(replace(default, tls_cert_file="s.pem", tls_key_file="s.key"))


def test_one_warning_naming_the_settings_that_close_it_and_the_gauge():
    with structlog.testing.capture_logs() as logs:
        announce_exposure(ReceiverConfig())
    (warning,) = [entry for entry in logs if entry["event"] == "receiver.open_to_any_peer"]
    assert warning["log_level"] == "warning"
    for setting in ("allowed_hosts", "allowed_calling_aes", "tls_ca_file"):
        assert setting in warning["detail"]
    assert set(warning) == {"event", "log_level", "detail"}  # no peer, host or AE title in it
    assert _gauge() == 1.0
    # Every worker sets the gauge; only one says it.
    with structlog.testing.capture_logs() as logs:
        announce_exposure(ReceiverConfig(), warn=False)
    assert logs == []
    with structlog.testing.capture_logs() as logs:
        announce_exposure(ReceiverConfig(allowed_hosts=("10.0.0.0/8",)))
    assert logs == [] and _gauge() == 0.0
