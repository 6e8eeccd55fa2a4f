"""Alert routing, retries and the acknowledgment workflow (pure parts; delivery on real servers is in
tests/integration/test_alert_delivery_stack.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from diana.access.alerts.channels import PUBLIC_FIELDS, alert_text, with_retries
from diana.access.alerts.routing import RoutingError, load_routing
from diana.access.alerts.workflow import (
    TransitionError,
    apply_action,
    check_transition,
    delivery_action,
    delivery_action_id,
    human_action,
    raised_state,
)
from diana.schemas.codec import default_codec

ROUTING = """
recipients:
  - {name: CT physicist, email: ct@h.example, webhook: "http://127.0.0.1:1/hook", stations: [CT1], rule_types: [drl]}
  - {name: Physics on call, email: oncall@h.example}
"""
ALERT = {
    "alert_id": "a1",
    "rule": "DRL CT Head",
    "rule_type": "drl",
    "metric": "total_dlp_mGycm",
    "value": 905.0,
    "threshold": 850.0,
    "station_name": "ct1",
    "patient_id": "SECRET-ID",
    "raised_at": datetime(2024, 3, 15, tzinfo=UTC),
}


def test_routing_by_station_and_rule_type(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(ROUTING)
    routing = load_routing(tmp_path / "r.yaml")
    assert [r.name for r in routing.route(ALERT)] == ["CT physicist", "Physics on call"]  # station case ignored
    assert [r.name for r in routing.route({**ALERT, "station_name": "CT2"})] == ["Physics on call"]
    assert [r.name for r in routing.route({**ALERT, "rule_type": "cumulative"})] == ["Physics on call"]
    assert routing.recipients[0].channels() == [("email", "ct@h.example"), ("webhook", "http://127.0.0.1:1/hook")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("recipients: [{name: A}]", "neither email nor webhook"),
        ("recipients: [{name: A, email: nobody}]", "not an address"),
        ("recipients: [{name: A, webhook: ftp://x}]", "http:// or https://"),
        ("recipients: [{name: A, email: a@b, rule_types: [loud]}]", "rule_types are"),
        ("recipients: [{name: A, email: a@b}, {name: A, webhook: 'http://x'}]", "unique"),
        ("people: []", "unknown section .people.; sections: recipients"),
    ],
)
def test_bad_routing_says_what_to_fix(tmp_path: Path, text: str, message: str):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RoutingError, match=message):
        load_routing(tmp_path / "r.yaml")


def test_retries_wait_doubling_then_give_up():
    waits, calls = [], []

    def failing() -> str:
        calls.append(1)
        raise ConnectionRefusedError("refused")

    result = with_retries(failing, 4, sleep=waits.append)
    assert (result.ok, result.attempts, waits) == (False, 4, [1.0, 2.0, 4.0])
    assert "ConnectionRefusedError" in result.detail
    flaky = iter([OSError("down"), "HTTP 200"])

    def second_time() -> str:
        value = next(flaky)
        if isinstance(value, Exception):
            raise value
        return value

    ok = with_retries(second_time, 4, sleep=waits.append)
    assert (ok.ok, ok.attempts, ok.detail) == (True, 2, "HTTP 200")


def test_messages_carry_no_patient_identifier():
    assert "patient_id" not in PUBLIC_FIELDS and "SECRET-ID" not in alert_text(ALERT)
    assert "diana alerts ack a1" in alert_text(ALERT)


def test_a_failure_and_the_later_delivery_are_two_steps_of_the_history():
    doc = raised_state(ALERT, None)
    doc = apply_action(doc, delivery_action("a1", "On call", "webhook", False, 3, "HTTPError: 503"))
    doc = apply_action(doc, delivery_action("a1", "On call", "webhook", True, 1, "HTTP 200"))
    assert [h["action"] for h in doc["history"]] == ["RAISED", "DELIVERY_FAILED", "DELIVERED"]
    assert doc["deliveries"] == 1


def test_open_acknowledged_closed_with_history():
    doc = raised_state(ALERT, None)
    assert doc["status"] == "open" and "patient_id" not in doc
    assert raised_state({**ALERT, "value": 910.0}, doc)["history"] == doc["history"]  # raised once
    delivered = delivery_action("a1", "CT physicist", "email", True, 1, "accepted")
    assert delivered["action_id"] == delivery_action_id("a1", "CT physicist", "email")
    doc = apply_action(doc, delivered)
    assert apply_action(doc, delivered) == doc and doc["deliveries"] == 1  # the same action twice: no change
    with pytest.raises(TransitionError, match="only one that is acknowledged"):
        check_transition(doc["status"], "CLOSED")
    with pytest.raises(TransitionError, match="needs --reason"):
        human_action("a1", "ACKNOWLEDGED", "physicist", "because")
    check_transition(doc["status"], "ACKNOWLEDGED")
    doc = apply_action(doc, human_action("a1", "ACKNOWLEDGED", "physicist", "patient_habitus", "BMI 41"))
    assert (doc["status"], doc["reason_code"], doc["note"]) == ("acknowledged", "patient_habitus", "BMI 41")
    with pytest.raises(TransitionError, match="cannot acknowledge an alert that is acknowledged"):
        check_transition(doc["status"], "ACKNOWLEDGED")
    doc = apply_action(doc, human_action("a1", "CLOSED", "physicist"))
    assert doc["status"] == "closed"
    assert [h["action"] for h in doc["history"]] == ["RAISED", "DELIVERED", "ACKNOWLEDGED", "CLOSED"]
    with pytest.raises(TransitionError, match="no such alert"):
        check_transition(None, "ACKNOWLEDGED")


def test_actions_fit_their_schema():
    codec = default_codec()
    for action in (
        delivery_action("a1", "r", "webhook", False, 5, "HTTPError: 500"),
        human_action("a1", "ACKNOWLEDGED", "me", "repeat", "re-scan after motion"),
    ):
        _, back = codec.decode(codec.encode("AlertAction", action), expect="AlertAction")
        assert back["action_id"] == action["action_id"] and back["action"] == action["action"]


def test_ledger_keeps_failures_until_a_delivery_follows():
    from diana.access.alerts.delivery import Ledger

    ledger = Ledger()
    failed = delivery_action("a1", "On call", "webhook", False, 3, "HTTPError: 503")
    key = delivery_action_id("a1", "On call", "webhook")
    ledger.add(failed)
    assert list(ledger.failed) == [key] and not ledger.delivered
    assert failed["action_id"] != delivery_action("a1", "On call", "webhook", False, 3, "")["action_id"]
    ledger.add(delivery_action("a1", "On call", "webhook", True, 1, "HTTP 200"))
    assert ledger.delivered == {key} and not ledger.failed
    ledger.add(failed)  # an old failure read after the delivery: stays delivered
    assert not ledger.failed


def test_a_message_says_what_docs_dose_says_and_a_site_may_add_date_description_institution():
    """Before, the study date, the free-text study description and the institution were sent, which
    docs/DOSE.md did not list."""
    from diana.access.alerts.channels import public

    alert = {
        **ALERT,
        "study_instance_uid": "1.2.3",
        "accession_number": "A1",
        "protocol": "Head",
        "study_date": "2024-03-15",
        "study_description": "CT HEAD after fall",
        "institution_name": "Hospital",
    }
    text = alert_text(alert)
    assert "1.2.3" in text and "A1" in text and "Head" in text and "ct1" in text
    assert not {"study_date", "study_description", "institution_name"} & set(public(alert))
    assert "2024-03-15" not in text and "after fall" not in text and "Hospital" not in text
    added = public(alert, ("study_date", "institution_name", "patient_id"))
    assert added["study_date"] == "2024-03-15" and added["institution_name"] == "Hospital"
    assert "patient_id" not in added and "study_description" not in added  # only the three may be added


def test_a_field_outside_the_three_cannot_be_added(tmp_path: Path, monkeypatch):
    from diana.access.alerts import delivery
    from diana.access.alerts.routing import Routing
    from diana.config import ConfigError, load_config

    path = tmp_path / "d.toml"
    path.write_text('[kafka]\nbootstrap = "127.0.0.1:1"\n[alerts]\nmessage_extra_fields = "study_date,patient_name"\n')
    monkeypatch.setattr(delivery, "kafka_producer", lambda kafka, extra: None)
    with pytest.raises(ConfigError, match="'patient_name' is not one of study_date, study_description"):
        delivery.DeliveryWorker(load_config(path), Routing(()), None)  # type: ignore[arg-type]
