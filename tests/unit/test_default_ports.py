"""Every port diana-star listens on by default is its own: two services on one host (`diana run` starts them
all) must not clash. [alerts] and [dicomweb] metrics_port were both 9467."""

from __future__ import annotations

import dataclasses
from collections import Counter

from diana.config import Config

# Ports of other machines diana-star connects to, not ports it listens on.
_REMOTE = {("alerts", "smtp_port"), ("collect", "pacs_port")}


def _listening_defaults() -> dict[tuple[str, str], int]:
    ports = {}
    config = Config()
    for section in dataclasses.fields(config):
        if section.name == "base_dir":
            continue
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.name.endswith("port") and isinstance(value, int) and value and (section.name, f.name) not in _REMOTE:
                ports[(section.name, f.name)] = value
    return ports


def test_no_two_services_share_a_default_port():
    ports = _listening_defaults()
    stack = Config().stack
    # The local cluster mode's other brokers, controllers and OpenSearch nodes (compose/local/cluster.py).
    for n in (2, 3):
        ports[("stack", f"kafka_port broker {n}")] = stack.kafka_port + 2 * (n - 1)
        ports[("stack", f"kafka_controller_port broker {n}")] = stack.kafka_controller_port + 2 * (n - 1)
    ports[("stack", "opensearch_port node 2")] = stack.opensearch_port + 1
    ports[("stack", "opensearch_transport_port node 2")] = stack.opensearch_transport_port + 1
    shared = {port for port, count in Counter(ports.values()).items() if count > 1}
    assert not shared, sorted(key for key, port in ports.items() if port in shared)
    assert ports[("alerts", "metrics_port")] == 9470 and ports[("dicomweb", "metrics_port")] == 9467
