"""`diana alerts list|ack|close`: read the alert state index; record acknowledgments and closings on the topic."""

from __future__ import annotations

import getpass

from diana.access.alerts.delivery import AlertStates
from diana.access.alerts.workflow import check_transition, human_action
from diana.clients import kafka_producer, opensearch_client
from diana.config import Config
from diana.schemas.codec import default_codec
from diana.schemas.topics import ALERT_ACTIONS

__all__ = ["list_alerts", "record_action", "render_alerts"]


def _states(cfg: Config) -> AlertStates:
    return AlertStates(opensearch_client(cfg.opensearch, timeout=30), cfg.opensearch.index_prefix)


def list_alerts(cfg: Config, status: str | None) -> list[dict]:
    return _states(cfg).search(status)


def render_alerts(docs: list[dict]) -> str:
    if not docs:
        return "No alerts."
    out = [f"{'alert id':<42}{'status':<14}{'raised':<21}{'station':<14}{'value':>10}{'threshold':>11}  rule"]
    for d in docs:
        out.append(
            f"{d.get('alert_id', ''):<42}{d.get('status', ''):<14}{str(d.get('raised_at', ''))[:19]:<21}"
            f"{d.get('station_name') or '':<14}{d.get('value', 0):>10.4g}{d.get('threshold', 0):>11.4g}  {d.get('rule')}"
        )
    return "\n".join(out)


def record_action(
    cfg: Config, alert_id: str, action: str, reason_code: str | None = None, note: str | None = None
) -> dict:
    """Check the transition against the current state, then put the action on dose.alert-actions.

    The delivery worker applies it to the state index; raises TransitionError when not allowed.
    """
    current = _states(cfg).get(alert_id)
    check_transition(None if current is None else current.get("status"), action)
    record = human_action(alert_id, action, getpass.getuser(), reason_code, note)
    producer = kafka_producer(cfg.kafka, {"enable.idempotence": True})
    producer.produce(
        ALERT_ACTIONS.name, key=alert_id.encode(), value=default_codec().encode(ALERT_ACTIONS.value_schema, record)
    )
    if producer.flush(30) != 0:
        raise RuntimeError(f"the broker at {cfg.kafka.bootstrap} did not acknowledge the action in 30 s")
    return record
