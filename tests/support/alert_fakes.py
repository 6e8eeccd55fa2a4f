"""Stand-ins for the alert workflow's Kafka producer and state index in unit tests: what a
delivery or dose test checks is what was recorded, not Kafka or OpenSearch."""

from __future__ import annotations

from diana.schemas.codec import default_codec


class RecordingBroker:
    """A producer that keeps every AlertAction it is given, decoded."""

    def __init__(self) -> None:
        self.actions: list[dict] = []

    def produce(self, topic, key, value, on_delivery=None) -> None:
        self.actions.append(default_codec().decode(value, expect="AlertAction")[1])

    def flush(self, timeout: float) -> int:
        return 0


class AlertStates:
    """The alert state index: each alert as raised, changed as the workflow changes it."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}

    def update(self, alert_id, change):
        self.docs[alert_id] = change(self.docs.get(alert_id))
        return self.docs[alert_id]

    def get(self, alert_id):
        return self.docs.get(alert_id)
