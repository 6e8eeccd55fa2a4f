"""compose/docker-compose.cluster.yml (not run: no Docker engine here): it parses, and every setting it passes exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from diana.config import load_config

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.cluster.yml"


def _services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _pipeline() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if "build" in s}


def test_the_file_parses_and_has_the_cluster_layout() -> None:
    services = _services()
    for name in ("kafka-1", "kafka-2", "kafka-3", "opensearch-1", "opensearch-2", "minio", "bucket", "topics"):
        assert name in services
    for role in ("receiver", "aggregates", "archive-sink", "opensearch-sink", "dose"):
        assert f"{role}-1" in services and f"{role}-2" in services


def test_every_diana_variable_is_a_setting_and_takes_effect() -> None:
    for name, service in _pipeline().items():
        env = {k: str(v) for k, v in service["environment"].items()}
        assert all(k.startswith("DIANA_") for k in env), name
        cfg = load_config(None, environ=env)  # an unknown DIANA_* variable is a ConfigError
        assert cfg.storage.backend == "s3"
        assert len(cfg.kafka.bootstrap.split(",")) == 3
        assert len(cfg.opensearch.url.split(",")) == 2 and cfg.opensearch.number_of_replicas == 1
    workers = [
        load_config(None, environ={k: str(v) for k, v in s["environment"].items()})
        for n, s in _pipeline().items()
        if n.startswith("aggregates-")
    ]
    assert sorted(c.stream.worker_id for c in workers) == ["aggregates-1", "aggregates-2"]


def test_no_two_pipeline_services_share_a_volume() -> None:
    seen: dict[str, str] = {}
    for name, service in _pipeline().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source not in seen, f"{name} and {seen.get(source)} share {source}"
            seen[source] = name
    assert len([n for n in _pipeline() if n != "topics"]) == len(seen)
