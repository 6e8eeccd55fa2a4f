"""Dose alerts reach people once, on the real stack with a real SMTP server and a real HTTP receiver.

A CT study over its local DRL (tests/support/data/dose-*.yaml) raises a `drl` alert. The dose
worker is killed (-9) and restarted between the raise and any delivery, and the alert record is
published twice more (redelivery); only then does `diana alerts deliver` start. The SMTP server
(aiosmtpd) must receive exactly one e-mail and the webhook receiver exactly one accepted POST (its
first answer is a 503, so the retry is exercised). The delivery worker is then killed and started
again under a new consumer group, which replays every alert from the beginning: still one of each.
Finally the alert is acknowledged and closed through the command line and its state and history
are read back from OpenSearch.

Withdrawals (the second test): a running worker given an alert with its withdrawal published right
behind it on `dose.alerts` sends nothing (before: it sent the alert it held and read the withdrawal
only after); an alert delivered and then withdrawn gets one correction per channel it went to (e-mail
and webhook), recorded as CORRECTED; a worker under a new group replays everything and sends nothing
more. Those alerts are written to `dose.alerts` directly, as the dose worker writes them.

A lost alert state (the third test): an alert delivered, its state document deleted, then withdrawn
under its limit: no correction (its only source would be the withdrawal record, naming the object that
withdrew it, with no address hash to check the address by), counted by the worker's metric.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from confluent_kafka import Producer
from opensearchpy import OpenSearch
from pydicom.uid import generate_uid

from diana.schemas.codec import default_codec
from diana.schemas.topics import ALERT_ACTIONS, DOSE_ALERTS
from diana.stream_apps.dose.agent import _fit
from tests.integration.test_dose_stack import wait_for_docs
from tests.support import dosebuilder as b
from tests.support.helpers import group_lag, read_messages, storescu
from tests.support.paths import REPO, port


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode("utf-8", "replace")))
        return "250 OK"


class Hooks:
    """POSTs received. Per alert, /hook answers its first POST with 503 (a receiver briefly down),
    /down its first three (longer than a delivery's attempts: the delivery fails, and is retried later)."""

    FAILING = {"/hook": 1, "/down": 3}

    def __init__(self) -> None:
        self.posts: list[tuple[str, int, dict, dict]] = []
        self.lock = threading.Lock()

    def answer(self, path: str, body: dict) -> int:
        alert_id = body["alert"]["alert_id"]
        earlier = sum(1 for p, _, _, b in self.posts if p == path and b["alert"]["alert_id"] == alert_id)
        return 503 if earlier < self.FAILING.get(path, 0) else 200


@pytest.fixture()
def receivers():
    mailbox, hooks = Mailbox(), Hooks()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=port(12525))
    smtp.start()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with hooks.lock:
                status = hooks.answer(self.path, body)
                hooks.posts.append((self.path, status, dict(self.headers), body))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", port(18088)), Handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield mailbox, hooks
    http.shutdown()
    smtp.stop()


def _cli(pipeline, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(pipeline.config_file)
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


def _wait(condition, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _mails_for(mailbox: Mailbox, alert_id: str) -> list[str]:
    return [text for _, text in mailbox.messages if "Message-ID: <" in text and alert_id in text]


def _posts(hooks: Hooks, alert_id: str, path: str) -> list[tuple[int, dict, dict]]:
    return [(st, h, b) for p, st, h, b in hooks.posts if p == path and b["alert"]["alert_id"] == alert_id]


def _accepted_posts(hooks: Hooks, alert_id: str, path: str = "/hook") -> list[dict]:
    return [body for status, _, body in _posts(hooks, alert_id, path) if status == 200]


def test_a_study_over_its_drl_reaches_each_recipient_once(pipeline, receivers, tmp_path: Path):
    mailbox, hooks = receivers
    cfg = pipeline.cfg
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "recipients:\n"
        f"  - {{name: CT physicist, email: ct-physics@hospital.example, webhook: 'http://127.0.0.1:{port(18088)}/hook',"
        " stations: [CTSTATION], rule_types: [drl]}\n"
        f"  - {{name: On-call hook, webhook: 'http://127.0.0.1:{port(18088)}/down', stations: [ctstation], rule_types: [drl]}}\n"
        "  - {name: DX room lead, email: dx@hospital.example, stations: [DXROOM9]}\n"
    )
    settings = {
        "DIANA_ALERTS_ROUTING": str(routing),
        "DIANA_ALERTS_SMTP_PORT": str(port(12525)),
        "DIANA_ALERTS_METRICS_PORT": str(port(19467)),
        "DIANA_ALERTS_ATTEMPTS": "3",
        "DIANA_ALERTS_RETRY_INTERVAL_S": "3",
    }
    study_uid = generate_uid()
    rdsr = b.ct_report(
        [b.ct_event(generate_uid(), ctdivol="45", dlp="905", protocol="DRL Head")],
        total_dlp="905",
        study_uid=study_uid,
        patient_id="ALERTPAT1",
    )
    assert storescu(cfg, [b.save(rdsr, tmp_path / "rdsr.dcm")]).returncode == 0
    query = {"bool": {"filter": [{"term": {"study_instance_uid": study_uid}}, {"term": {"rule_type": "drl"}}]}}
    [alert], _ = wait_for_docs(cfg, "diana-dose-alerts", query, 1)
    alert_id = alert["alert_id"]

    # Between raise and delivery: the dose worker dies hard and comes back; the alert is redelivered twice.
    pipeline.stop("dose", kill=True)
    pipeline.start("dose", "dose")
    raw = [m.value() for m in read_messages(cfg, DOSE_ALERTS.name) if m.key() == study_uid.encode()]
    assert raw, "the alert is on dose.alerts"
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap})
    for _ in range(2):
        for value in raw:
            producer.produce(DOSE_ALERTS.name, key=study_uid.encode(), value=value)
    assert producer.flush(30) == 0

    pipeline.start("alerts", "alerts", "deliver", settings={**settings, "DIANA_ALERTS_CONSUMER_GROUP": "alert-test-1"})
    try:
        _wait(
            lambda: _mails_for(mailbox, alert_id) and _accepted_posts(hooks, alert_id),
            "one e-mail and one webhook",
        )
        _wait(lambda: _accepted_posts(hooks, alert_id, "/down"), "the failed delivery to be retried")
        _wait(
            lambda: group_lag(cfg, "alert-test-1", [DOSE_ALERTS.name, ALERT_ACTIONS.name]) == 0,
            "the worker to catch up",
        )
        [mail] = _mails_for(mailbox, alert_id)
        [post] = _accepted_posts(hooks, alert_id)
        assert "ALERTPAT1" not in mail and "patient_id" not in post["alert"]  # no patient identifier leaves
        assert "905" in mail and post["alert"]["threshold"] == 850.0
        attempts = _posts(hooks, alert_id, "/hook")
        assert [st for st, _, _ in attempts] == [503, 200]  # retried within the delivery's attempts
        assert attempts[0][1]["Idempotency-Key"] == attempts[1][1]["Idempotency-Key"]
        # /down failed all 3 attempts (DELIVERY_FAILED), then the retry 3 s later went through.
        assert [st for st, _, _ in _posts(hooks, alert_id, "/down")] == [503, 503, 503, 200]
        assert all("dx@hospital.example" not in rcpt for rcpt, _ in mailbox.messages)

        # The delivery worker dies hard and restarts under a new group: every alert replays, none is resent.
        pipeline.stop("alerts", kill=True)
        pipeline.start(
            "alerts", "alerts", "deliver", settings={**settings, "DIANA_ALERTS_CONSUMER_GROUP": "alert-test-2"}
        )
        _wait(
            lambda: group_lag(cfg, "alert-test-2", [DOSE_ALERTS.name, ALERT_ACTIONS.name]) == 0,
            "the replaying worker to catch up",
        )
        assert len(_mails_for(mailbox, alert_id)) == 1 and len(_accepted_posts(hooks, alert_id)) == 1
        assert len(_posts(hooks, alert_id, "/down")) == 4

        listed = _cli(pipeline, "alerts", "list")
        assert listed.returncode == 0 and alert_id in listed.stdout
        closed_early = _cli(pipeline, "alerts", "close", alert_id)
        assert closed_early.returncode == 1 and "only one that is acknowledged" in closed_early.stderr
        bad = _cli(pipeline, "alerts", "ack", alert_id, "--reason", "because")
        assert bad.returncode == 2 and "patient_habitus" in bad.stderr
        ack = _cli(pipeline, "alerts", "ack", alert_id, "--reason", "patient_habitus", "--note", "BMI 41")
        assert ack.returncode == 0, ack.stderr
        client = OpenSearch(hosts=[cfg.opensearch.url])

        def state() -> dict:
            return client.get(index="diana-dose-alert-state", id=alert_id)["_source"]

        _wait(lambda: state()["status"] == "acknowledged", "the acknowledgment in OpenSearch")
        close = _cli(pipeline, "alerts", "close", alert_id, "--note", "protocol reviewed")
        assert close.returncode == 0, close.stderr
        _wait(lambda: state()["status"] == "closed", "the closing in OpenSearch")
        doc = state()
        assert (doc["reason_code"], doc["note"], doc["deliveries"]) == ("patient_habitus", "BMI 41", 3)
        history = [(h["action"], h.get("recipient"), h.get("channel")) for h in doc["history"]]
        assert history[0][0] == "RAISED" and [h[0] for h in history[-2:]] == ["ACKNOWLEDGED", "CLOSED"]
        assert sorted(history[1:-2]) == [
            ("DELIVERED", "CT physicist", "email"),
            ("DELIVERED", "CT physicist", "webhook"),
            ("DELIVERED", "On-call hook", "webhook"),
            ("DELIVERY_FAILED", "On-call hook", "webhook"),
        ]
        assert "patient_id" not in doc
    finally:
        if "alerts" in pipeline.procs:
            pipeline.stop("alerts")


def _alert(study_uid: str, alert_id: str, **withdrawal) -> dict:
    return {
        "alert_id": alert_id,
        "revision": 2 if withdrawal else 1,
        "raised_at": datetime.now(UTC),
        "rule": "CT head level",
        "rule_type": "reference_level",
        "metric": "ctdivol_mGy",
        "value": 95.0,
        "threshold": 60.0,
        "study_instance_uid": study_uid,
        "message": "CT head level: ctdivol_mGy 95 exceeds 60",
        "station_name": "CTW1",
        "accession_number": "ACCW1",
        "patient_id": "WITHDRAWPAT1",
        **withdrawal,
    }


def _publish(cfg, *alerts: dict) -> None:
    codec, producer = default_codec(), Producer({"bootstrap.servers": cfg.kafka.bootstrap, "enable.idempotence": True})
    for alert in alerts:
        value = codec.encode(DOSE_ALERTS.value_schema, _fit(codec, DOSE_ALERTS.value_schema, alert))
        producer.produce(DOSE_ALERTS.name, key=alert["study_instance_uid"].encode(), value=value)
    assert producer.flush(30) == 0


def _mails(mailbox: Mailbox, alert_id: str, withdrawn: bool) -> list[str]:
    """The subject and text of each e-mail about ``alert_id``, corrections or not (decoded: a long line
    is sent quoted-printable)."""
    out = []
    for _, raw in mailbox.messages:
        msg = email.message_from_string(raw, policy=email.policy.default)
        text = f"{msg['Subject']}\n{msg.get_body().get_content()}"  # type: ignore[union-attr]
        if alert_id in text and ("dose alert WITHDRAWN]" in text) is withdrawn:
            out.append(text)
    return out


def test_a_withdrawal_already_published_stops_the_send_and_a_delivered_alert_is_corrected(
    pipeline, receivers, tmp_path: Path
):
    mailbox, hooks = receivers
    cfg = pipeline.cfg
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "recipients:\n"
        f"  - {{name: CT physicist, email: ct-physics@hospital.example, webhook: 'http://127.0.0.1:{port(18088)}/ok',"
        " stations: [CTW1]}\n"
    )
    settings = {
        "DIANA_ALERTS_ROUTING": str(routing),
        "DIANA_ALERTS_SMTP_PORT": str(port(12525)),
        "DIANA_ALERTS_METRICS_PORT": str(port(19468)),
        "DIANA_ALERTS_ATTEMPTS": "2",
        "DIANA_ALERTS_CONSUMER_GROUP": "alert-withdraw-1",
    }
    topics = [DOSE_ALERTS.name, ALERT_ACTIONS.name]
    pipeline.start("alerts", "alerts", "deliver", settings=settings)
    try:
        # The worker running and caught up: a first alert delivered.
        warm = _alert(generate_uid(), generate_uid())
        _publish(cfg, warm)
        _wait(lambda: _mails(mailbox, warm["alert_id"], False), "the first alert's e-mail")

        # 1. The alert and its withdrawal published together: the worker reads the alert with the
        # withdrawal behind it on the partition, unread.
        study1, held = generate_uid(), generate_uid()
        _publish(
            cfg,
            _alert(study1, held),
            _alert(study1, held, superseded_by=generate_uid(), withdrawn_reason="superseded", replaced_value=62.5),
        )
        _wait(lambda: group_lag(cfg, "alert-withdraw-1", topics) == 0, "the worker to catch up")
        assert _mails(mailbox, held, False) == [] and _accepted_posts(hooks, held, "/ok") == []
        client = OpenSearch(hosts=[cfg.opensearch.url])

        def state(alert_id: str) -> dict:
            return client.get(index="diana-dose-alert-state", id=alert_id)["_source"]

        assert state(held)["status"] == "closed" and state(held)["deliveries"] == 0

        # 2. Delivered, then withdrawn: one correction per channel, once.
        study2, sent = generate_uid(), generate_uid()
        _publish(cfg, _alert(study2, sent))
        _wait(lambda: _mails(mailbox, sent, False) and _accepted_posts(hooks, sent, "/ok"), "the alert delivered")
        _publish(
            cfg, _alert(study2, sent, superseded_by=generate_uid(), withdrawn_reason="superseded", replaced_value=62.5)
        )
        _wait(lambda: _mails(mailbox, sent, True) and len(_accepted_posts(hooks, sent, "/ok")) == 2, "the corrections")
        [correction] = _mails(mailbox, sent, True)
        assert "superseded by the RDSR's value 62.5" in correction and "WITHDRAWPAT1" not in correction
        [_, post] = _accepted_posts(hooks, sent, "/ok")
        assert post["withdrawn"]["replaced_value"] == 62.5 and "patient_id" not in post["alert"]
        _wait(lambda: state(sent).get("corrections") == 2, "the corrections in the alert's history")
        history = [h["action"] for h in state(sent)["history"]]
        assert history.count("DELIVERED") == 2 and history.count("CORRECTED") == 2 and "CLOSED" in history

        # A worker under a new group replays everything: nothing more is sent.
        pipeline.stop("alerts", kill=True)
        pipeline.start(
            "alerts", "alerts", "deliver", settings={**settings, "DIANA_ALERTS_CONSUMER_GROUP": "alert-withdraw-2"}
        )
        _wait(lambda: group_lag(cfg, "alert-withdraw-2", topics) == 0, "the replaying worker to catch up")
        assert len(_mails(mailbox, sent, True)) == 1 and len(_mails(mailbox, sent, False)) == 1
        assert _mails(mailbox, held, False) == [] and len(_accepted_posts(hooks, sent, "/ok")) == 2
    finally:
        if "alerts" in pipeline.procs:
            pipeline.stop("alerts")


def _corrections_not_sent(metrics_port: int) -> dict[tuple[str, str], float]:
    """diana_alert_corrections_not_sent_total by (channel, reason), scraped from the worker."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        found = re.fullmatch(r'diana_alert_corrections_not_sent_total\{channel="(\w+)",reason="(\w+)"\} (\S+)', line)
        if found:
            out[(found[1], found[2])] = float(found[3])
    return out


def test_a_lost_alert_state_sends_no_correction_naming_the_withdrawing_object(pipeline, receivers, tmp_path: Path):
    """The alert's state document deleted after its delivery; then its under_limit withdrawal, whose
    message names the SOP Instance UID that brought the value under its limit. Before: a correction built
    from that record (the UID in its text) went to the recipient's address as it was then, unchecked.
    Now: none, and diana_alert_corrections_not_sent_total{reason="state_lost"} counts one per channel."""
    mailbox, hooks = receivers
    cfg = pipeline.cfg
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "recipients:\n"
        f"  - {{name: CT physicist, email: ct-physics@hospital.example, webhook: 'http://127.0.0.1:{port(18088)}/ok',"
        " stations: [CTW1]}\n"
    )
    metrics_port = port(19478)
    settings = {
        "DIANA_ALERTS_ROUTING": str(routing),
        "DIANA_ALERTS_SMTP_PORT": str(port(12525)),
        "DIANA_ALERTS_METRICS_PORT": str(metrics_port),
        "DIANA_ALERTS_ATTEMPTS": "2",
        "DIANA_ALERTS_CONSUMER_GROUP": "alert-lost-state-1",
    }
    topics = [DOSE_ALERTS.name, ALERT_ACTIONS.name]
    pipeline.start("alerts", "alerts", "deliver", settings=settings)
    try:
        client = OpenSearch(hosts=[cfg.opensearch.url])

        def state(alert_id: str) -> dict:
            found = client.get(index="diana-dose-alert-state", id=alert_id, ignore=[404])
            return found.get("_source") or {}

        study, alert_id = generate_uid(), generate_uid()
        _publish(cfg, _alert(study, alert_id))
        _wait(lambda: state(alert_id).get("deliveries") == 2, "the alert delivered on both channels")
        assert len(_mails(mailbox, alert_id, False)) == 1 and len(_accepted_posts(hooks, alert_id, "/ok")) == 1
        before = _corrections_not_sent(metrics_port)  # every (channel, reason) reported from the start

        client.delete(index="diana-dose-alert-state", id=alert_id, refresh=True)
        withdrawing = generate_uid()
        note = f"withdrawn: the study's value (now 50) is no longer over the limit since {withdrawing}"
        _publish(
            cfg,
            _alert(
                study,
                alert_id,
                superseded_by=withdrawing,
                withdrawn_reason="under_limit",
                replaced_value=50.0,
                message=note,
            ),
        )
        _wait(lambda: state(alert_id).get("status") == "closed", "the withdrawal applied")
        _wait(lambda: group_lag(cfg, "alert-lost-state-1", topics) == 0, "the worker to catch up")
        after = _corrections_not_sent(metrics_port)
        assert {c: after[(c, "state_lost")] - before[(c, "state_lost")] for c in ("email", "webhook")} == {
            "email": 1,
            "webhook": 1,
        }
        assert _mails(mailbox, alert_id, True) == [] and len(_accepted_posts(hooks, alert_id, "/ok")) == 1
        assert all(withdrawing not in raw for _, raw in mailbox.messages)
        assert all(withdrawing not in json.dumps(body) for _, _, _, body in hooks.posts)
        assert "CORRECTED" not in [h["action"] for h in state(alert_id)["history"]]
    finally:
        if "alerts" in pipeline.procs:
            pipeline.stop("alerts")
