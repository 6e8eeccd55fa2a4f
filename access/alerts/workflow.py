"""An alert's life: open → acknowledged (with a reason code and a note) → closed.

Every step is an ``AlertAction`` on ``dose.alert-actions`` (the record of truth and the delivery
ledger); ``AlertStates`` keeps the view in OpenSearch (index ``<prefix>-dose-alert-state``, one
document per alert: its fields, status, deliveries and history), written only by the delivery
worker, so a replay of the two topics rebuilds it.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

from diana.stream_apps.dose.alerts import withdrawal_note

__all__ = [
    "REASON_CODES",
    "TransitionError",
    "delivery_action_id",
    "correction_key",
    "is_correction",
    "delivery_key",
    "delivery_action",
    "human_action",
    "withdrawal_action",
    "is_withdrawal",
    "check_transition",
    "apply_action",
    "raised_state",
    "STATE_MAPPING",
]

REASON_CODES = ("patient_habitus", "repeat", "protocol", "equipment", "clinical_need", "other")
_NEXT = {"ACKNOWLEDGED": ("open",), "CLOSED": ("acknowledged",)}
STATE_MAPPING = {
    "mappings": {
        "dynamic": False,
        "properties": {
            "alert_id": {"type": "keyword"},
            "status": {"type": "keyword"},
            "rule": {"type": "keyword"},
            "rule_type": {"type": "keyword"},
            "metric": {"type": "keyword"},
            "value": {"type": "double"},
            "threshold": {"type": "double"},
            "study_instance_uid": {"type": "keyword"},
            "accession_number": {"type": "keyword"},
            "station_name": {"type": "keyword"},
            "raised_at": {"type": "date"},
            "updated_at": {"type": "date"},
            "reason_code": {"type": "keyword"},
            "deliveries": {"type": "integer"},
            "corrections": {"type": "integer"},
        },
    }
}


class TransitionError(ValueError):
    """The action does not fit the alert's status; the message says what is possible."""


def delivery_action_id(alert_id: str, recipient: str, channel: str) -> str:
    return hashlib.sha1(f"{alert_id}\x1f{recipient}\x1f{channel}".encode()).hexdigest()


def correction_key(alert_id: str, recipient: str, channel: str) -> str:
    """The key of the correction sent where the alert was delivered, once it was withdrawn."""
    return f"correction:{delivery_action_id(alert_id, recipient, channel)}"


def is_correction(key: str) -> bool:
    return key.startswith("correction:")


def _now() -> datetime:
    return datetime.now(UTC)


def delivery_key(action: dict) -> str:
    """The (alert, recipient, channel) key of a delivery action, failed or not."""
    return action["action_id"].split("/failed/")[0]


def delivery_action(
    alert_id: str,
    recipient: str,
    channel: str,
    ok: bool,
    attempts: int,
    detail: str,
    permanent: bool = False,
    correction: bool = False,
) -> dict:
    """A delivery's outcome; with ``correction``, that of the correction of a withdrawn alert (CORRECTED,
    CORRECTION_FAILED: its own key, correction_key)."""
    key = (correction_key if correction else delivery_action_id)(alert_id, recipient, channel)
    if correction:
        action = "CORRECTED" if ok else "CORRECTION_FAILED"
    else:
        action = "DELIVERED" if ok else "DELIVERY_FAILED"
    return {
        # A delivery is one action per key; each failure is its own step in the history.
        "action_id": key if ok else f"{key}/failed/{uuid.uuid4().hex[:12]}",
        "alert_id": alert_id,
        "action": action,
        "at": _now(),
        "recipient": recipient,
        "channel": channel,
        "attempts": attempts,
        "detail": detail[:500],
        # Refused for good: the ledger tries it no more (None, not False: absent from the history).
        "permanent": True if permanent and not ok else None,
    }


def human_action(
    alert_id: str, action: str, actor: str, reason_code: str | None = None, note: str | None = None
) -> dict:
    if action == "ACKNOWLEDGED" and reason_code not in REASON_CODES:
        raise TransitionError(f"an acknowledgment needs --reason, one of {', '.join(REASON_CODES)}")
    return {
        "action_id": str(uuid.uuid4()),
        "alert_id": alert_id,
        "action": action,
        "at": _now(),
        "actor": actor,
        "reason_code": reason_code,
        "note": note,
    }


def withdrawal_action(alert: dict) -> dict:
    """The CLOSED action of a withdrawn alert (``superseded_by`` set: the image-header event it was raised
    from was superseded, or a per-study value fell under its limit, docs/DOSE.md). The dose worker writes
    the same (stream_apps/dose/alerts.py, same id and note): applied once whichever arrives first."""
    return {
        "action_id": f"withdrawn:{alert['alert_id']}",
        "alert_id": alert["alert_id"],
        "action": "CLOSED",
        "at": alert.get("raised_at") or _now(),
        "actor": "diana-dose",
        "note": withdrawal_note(alert["superseded_by"], alert.get("withdrawn_reason"), alert.get("replaced_value")),
    }


def is_withdrawal(action: dict) -> bool:
    return action.get("action") == "CLOSED" and str(action.get("action_id", "")).startswith("withdrawn:")


def check_transition(status: str | None, action: str) -> None:
    """Raise TransitionError unless ``action`` may follow ``status``."""
    if status is None:
        raise TransitionError("no such alert in the alert state index (diana alerts list shows them)")
    if status not in _NEXT[action]:
        verb = "acknowledge" if action == "ACKNOWLEDGED" else "close"
        allowed = " or ".join(_NEXT[action])
        raise TransitionError(f"cannot {verb} an alert that is {status}: only one that is {allowed}")


def _iso(value) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def raised_state(alert: dict, existing: dict | None) -> dict:
    """The state document after the alert (first raise or a re-evaluation) arrived."""
    fields = {k: (_iso(v) if isinstance(v, datetime) else v) for k, v in alert.items() if k != "patient_id"}
    doc = {**(existing or {}), **fields}
    doc.setdefault("status", "open")
    doc.setdefault("history", [])
    doc.setdefault("deliveries", 0)
    if not any(h["action_id"] == f"raised:{alert['alert_id']}" for h in doc["history"]):
        doc["history"].append(
            {"action_id": f"raised:{alert['alert_id']}", "action": "RAISED", "at": fields.get("raised_at")}
        )
    return doc


def apply_action(doc: dict | None, action: dict) -> dict:
    """The state document after ``action``; applying the same action twice changes nothing."""
    doc = dict(doc or {"alert_id": action["alert_id"], "status": "open", "history": [], "deliveries": 0})
    history = list(doc.get("history", []))
    if any(h["action_id"] == action["action_id"] for h in history):
        return doc
    entry = {k: (_iso(v) if k == "at" else v) for k, v in action.items() if v is not None}
    history.append(entry)
    doc["history"] = history
    doc["updated_at"] = entry["at"]
    if action["action"] == "DELIVERED":
        doc["deliveries"] = doc.get("deliveries", 0) + 1
    elif action["action"] == "CORRECTED":
        doc["corrections"] = doc.get("corrections", 0) + 1
    elif action["action"] == "ACKNOWLEDGED":
        doc["status"], doc["reason_code"], doc["note"] = "acknowledged", action.get("reason_code"), action.get("note")
    elif action["action"] == "CLOSED":
        doc["status"] = "closed"
    return doc
