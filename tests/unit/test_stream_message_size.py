"""[kafka] max_message_bytes reaches the Faust worker and its changelogs: a table's record is one key's
whole state (a QA phantom's patient with ~1,400 studies is several MB), over Faust's 1 MB defaults."""

from __future__ import annotations

from types import SimpleNamespace

from diana.config import Config, KafkaConfig
from diana.stream_apps import state_topics
from diana.stream_apps.app import create_app

_LIMIT = 12 * 1024 * 1024


def _config(tmp_path) -> Config:
    return Config(kafka=KafkaConfig(max_message_bytes=_LIMIT), base_dir=tmp_path)


def test_the_worker_produces_and_fetches_records_up_to_max_message_bytes(tmp_path):
    app = create_app(_config(tmp_path), app_id="diana-dose-test", web_port=6099)
    assert app.conf.producer_max_request_size == _LIMIT
    assert app.conf.consumer_max_fetch_size == _LIMIT


class _Done:
    def result(self):
        return None


class _Admin:
    """Just enough of confluent-kafka's AdminClient: one broker, the given topics present."""

    def __init__(self, present: list[str], partitions: int):
        self.topics = {n: SimpleNamespace(partitions=dict.fromkeys(range(partitions))) for n in present}
        self.created: list = []
        self.altered: list = []

    def list_topics(self, timeout=None):
        return SimpleNamespace(topics=self.topics, brokers={1: None})

    def create_topics(self, topics, request_timeout=None):
        self.created += topics
        for t in topics:
            self.topics[t.topic] = SimpleNamespace(partitions=dict.fromkeys(range(t.num_partitions)))
        return {t.topic: _Done() for t in topics}

    def incremental_alter_configs(self, resources, request_timeout=None):
        self.altered += resources
        return {r.name: _Done() for r in resources}


def test_changelogs_are_created_and_updated_with_max_message_bytes(tmp_path, monkeypatch):
    config = _config(tmp_path)
    admin = _Admin(["old-changelog"], config.kafka.partitions)
    monkeypatch.setattr(state_topics, "kafka_admin", lambda _kafka: admin)
    state_topics.ensure_state_topics(config, ["old-changelog", "new-changelog"], timeout=1.0)
    assert [t.topic for t in admin.created] == ["new-changelog"]
    assert admin.created[0].config["max.message.bytes"] == str(_LIMIT)
    (altered,) = admin.altered
    assert {e.name: e.value for e in altered.incremental_configs}["max.message.bytes"] == str(_LIMIT)
