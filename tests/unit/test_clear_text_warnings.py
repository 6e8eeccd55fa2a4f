"""Traffic that leaves this machine in clear is accepted (a trusted network may carry it) but said once at a
service's start, per setting: config.clear_text (diana/config.py warn_clear_text), naming the setting and the
hosts, never a password, a path or a query."""

from __future__ import annotations

import os

import pytest
import structlog

from diana import config as config_module
from diana.access.alerts.delivery import webhooks_in_clear
from diana.access.alerts.routing import Recipient, Routing
from diana.access.routing.rules import Destination, RoutingRules
from diana.access.routing.service import stow_in_clear
from diana.cli import build_parser, is_service
from diana.config import clear_text_endpoints, load_config, warn_clear_text


@pytest.fixture(autouse=True)
def _fresh_process():
    config_module._clear_text_said.clear()
    yield
    config_module._clear_text_said.clear()


def test_the_loopback_defaults_send_nothing_in_clear_off_this_machine():
    assert clear_text_endpoints(load_config(environ={})) == {}


def test_each_clear_text_setting_to_another_host_is_found_with_its_hosts():
    cfg = load_config(
        environ={
            "DIANA_KAFKA_BOOTSTRAP": "kafka1.example.org:9092,127.0.0.1:9092,[fd00::5]:9092",
            "DIANA_OPENSEARCH_URL": "http://search.example.org:9200",
            "DIANA_STORAGE_BACKEND": "s3",
            "DIANA_STORAGE_S3_ENDPOINT": "http://10.0.0.7:9000",
            "DIANA_ALERTS_SMTP_HOST": "relay.example.org",
        }
    )
    assert clear_text_endpoints(cfg) == {
        "[kafka] bootstrap (security_protocol PLAINTEXT)": ["kafka1.example.org", "fd00::5"],
        "[opensearch] url": ["search.example.org"],
        "[storage] s3_endpoint": ["10.0.0.7"],
        '[alerts] smtp_host (smtp_security "none")': ["relay.example.org"],
    }


def test_encrypted_or_local_endpoints_are_not_said():
    cfg = load_config(
        environ={
            "DIANA_KAFKA_BOOTSTRAP": "kafka1.example.org:9093",
            "DIANA_KAFKA_SECURITY_PROTOCOL": "SSL",
            "DIANA_OPENSEARCH_URL": "https://search.example.org:9200",
            "DIANA_STORAGE_BACKEND": "s3",
            "DIANA_STORAGE_S3_ENDPOINT": "https://s3.example.org",
            "DIANA_ALERTS_SMTP_HOST": "relay.example.org",
            "DIANA_ALERTS_SMTP_SECURITY": "starttls",
        }
    )
    assert clear_text_endpoints(cfg) == {}
    # An http:// S3 endpoint unused (the filesystem backend) sends nothing.
    unused = load_config(environ={"DIANA_STORAGE_S3_ENDPOINT": "http://10.0.0.7:9000"})
    assert clear_text_endpoints(unused) == {}
    local = load_config(
        environ={"DIANA_KAFKA_BOOTSTRAP": "localhost:9092", "DIANA_OPENSEARCH_URL": "http://[::1]:9200"}
    )
    assert clear_text_endpoints(local) == {}


def test_one_warning_per_setting_and_process_with_hosts_only():
    routing = Routing(
        (
            Recipient("on-call", webhook="http://user:hunter22@hooks.example.org/T000/B000/s3cr3tpath?token=abc"),
            Recipient("local", webhook="http://127.0.0.1:8080/hook"),
            Recipient("safe", webhook="https://chat.example.org/hook"),
        )
    )
    stow = RoutingRules(
        {
            "research": Destination("research", stow_url="http://10.9.8.7:8042/dicom-web/studies"),
            "pacs": Destination("pacs", "PACS", "10.0.0.1", 104),
        },
        (),
    )
    with structlog.testing.capture_logs() as logs:
        warn_clear_text(webhooks_in_clear(routing))
        warn_clear_text(stow_in_clear(stow))
        warn_clear_text(webhooks_in_clear(routing))  # a second time in the process: not said again
    assert [(e["event"], e["log_level"], e["setting"], e["hosts"]) for e in logs] == [
        ("config.clear_text", "warning", "[alerts] routing: webhook", ["hooks.example.org"]),
        ("config.clear_text", "warning", "[routing] rules: stow_url", ["10.9.8.7"]),
    ]
    said = repr(logs)
    for secret in ("hunter22", "s3cr3tpath", "token=abc", "user"):
        assert secret not in said


def test_only_long_running_services_say_it():
    parser = build_parser()
    services = [["receive"], ["aggregate"], ["sink", "archive"], ["serve"], ["route"], ["dose"]]
    services += [["alerts", "deliver"], ["collect", "run", "--from", "2024-01-01"]]
    for argv in services:
        args, _ = parser.parse_known_args(argv)
        assert is_service(args), argv
    for argv in (["status"], ["route", "--check"], ["alerts", "list"], ["run"], ["topics"], ["dose", "names"]):
        args, _ = parser.parse_known_args(argv)
        assert not is_service(args), argv


def test_the_cli_says_it_before_a_service_runs_and_not_for_a_short_command(monkeypatch):
    from diana import cli
    from diana.cli import pipeline

    said = []
    monkeypatch.setattr(cli, "warn_clear_text", said.append)
    monkeypatch.setattr(pipeline, "cmd_receive", lambda cfg, args: 0)
    monkeypatch.setattr(pipeline, "cmd_topics", lambda cfg, args: 0)
    for key in [k for k in os.environ if k.startswith("DIANA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DIANA_OPENSEARCH_URL", "http://search.example.org:9200")
    assert cli.main(["receive"]) == 0
    assert said == [{"[opensearch] url": ["search.example.org"]}]
    assert cli.main(["topics"]) == 0
    assert len(said) == 1


def test_a_service_is_not_warned_of_settings_it_never_uses():
    """The mail relay is the alert delivery's alone; the object store neither the aggregates' nor the dose
    worker's (each service warned of both)."""
    from diana.cli import clear_text_used_by

    cfg = load_config(
        environ={
            "DIANA_ALERTS_SMTP_HOST": "mail.example.org",
            "DIANA_ALERTS_SMTP_SECURITY": "none",
            "DIANA_STORAGE_BACKEND": "s3",
            "DIANA_STORAGE_S3_ENDPOINT": "http://objects.example.org:9000",
            "DIANA_STORAGE_S3_BUCKET": "diana",
        }
    )
    parser = build_parser()

    def settings(*argv: str) -> set[str]:
        return set(clear_text_used_by(parser.parse_known_args(list(argv))[0], cfg))

    smtp, s3 = '[alerts] smtp_host (smtp_security "none")', "[storage] s3_endpoint"
    assert smtp in settings("alerts", "deliver") and s3 not in settings("alerts", "deliver")
    assert smtp not in settings("receive") and s3 in settings("receive")
    assert settings("dose") == set() == settings("aggregate")
