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


class AlertsLog:
    """``dose.alerts`` as the withdrawal look-ahead sees it (access/alerts/lookahead.py): each partition's
    records in order, the high watermark their count; ``polls`` counts the records handed out."""

    def __init__(self) -> None:
        self.partitions: dict[int, list[bytes]] = {}
        self.polls = 0
        self._at: tuple[int, int] | None = None

    def append(self, partition: int, alert: dict) -> int:
        from diana.stream_apps.dose.agent import _fit

        codec = default_codec()
        self.partitions.setdefault(partition, []).append(codec.encode("DoseAlert", _fit(codec, "DoseAlert", alert)))
        return len(self.partitions[partition]) - 1

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return 0, len(self.partitions.get(tp.partition, []))

    def assign(self, tps) -> None:
        (tp,) = tps
        self._at = (tp.partition, tp.offset)

    def unassign(self) -> None:
        self._at = None

    @property
    def assigned(self) -> bool:
        """Whether the reader still holds a partition (and a real consumer would go on prefetching it)."""
        return self._at is not None

    def poll(self, timeout=None):
        from confluent_kafka import Message

        assert self._at is not None
        partition, offset = self._at
        records = self.partitions.get(partition, [])
        if offset >= len(records):
            return None
        self._at, self.polls = (partition, offset + 1), self.polls + 1
        return Message(topic="dose.alerts", partition=partition, offset=offset, value=records[offset])
