"""The cluster mode's settings: several OpenSearch urls, index replicas, node addresses and configs (no services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.compose.local.cluster import ClusterStack
from diana.compose.local.stack import LocalStack, StackError, local_stack
from diana.config import ConfigError, load_config, opensearch_urls


def test_opensearch_url_may_list_every_node_and_replicas_default_to_single_node() -> None:
    cfg = load_config(
        None, environ={"DIANA_OPENSEARCH_URL": "http://127.0.0.1:9200, http://127.0.0.1:9201/", "DIANA_STACK_HOME": "x"}
    )
    assert opensearch_urls(cfg.opensearch) == ["http://127.0.0.1:9200", "http://127.0.0.1:9201"]
    assert cfg.opensearch.number_of_replicas == 0
    assert cfg.stack.cluster is False


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:9200,http://u:p@127.0.0.1:9201", "must not carry credentials"),
        ("https://a:9200,http://b:9200", "all https:// or all http://"),
        (" , ", "url is empty"),
    ],
)
def test_bad_node_lists_are_refused_with_the_fix(url: str, said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        load_config(None, environ={"DIANA_OPENSEARCH_URL": url})


def test_negative_replicas_are_refused() -> None:
    with pytest.raises(ConfigError, match="number_of_replicas"):
        load_config(None, environ={"DIANA_OPENSEARCH_NUMBER_OF_REPLICAS": "-1"})


def test_cluster_nodes_take_ports_derived_from_the_stack_ports(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        environ={
            "DIANA_STACK_HOME": str(tmp_path),
            "DIANA_STACK_CLUSTER": "true",
            "DIANA_STACK_KAFKA_PORT": "21092",
            "DIANA_STACK_KAFKA_CONTROLLER_PORT": "21093",
            "DIANA_STACK_OPENSEARCH_PORT": "21200",
            "DIANA_STACK_OPENSEARCH_TRANSPORT_PORT": "21300",
        },
    )
    stack = local_stack(cfg)
    assert isinstance(stack, ClusterStack)
    assert stack.bootstrap() == "127.0.0.1:21092,127.0.0.1:21094,127.0.0.1:21096"
    assert stack.opensearch_urls() == "http://127.0.0.1:21200,http://127.0.0.1:21201"
    ports = {stack.broker_port(n) for n in (1, 2, 3)} | {stack.controller_port(n) for n in (1, 2, 3)}
    assert len(ports) == 6  # no two listeners on one port
    props = stack._write_broker_config(2).read_text()
    assert "node.id=2\n" in props
    assert "controller.quorum.voters=1@127.0.0.1:21093,2@127.0.0.1:21095,3@127.0.0.1:21097\n" in props
    assert "listeners=PLAINTEXT://127.0.0.1:21094,CONTROLLER://127.0.0.1:21095\n" in props
    assert "min.insync.replicas=2\n" in props and "default.replication.factor=3\n" in props
    assert "transaction.state.log.min.isr=2\n" in props
    assert isinstance(local_stack(load_config(None, environ={"DIANA_STACK_HOME": str(tmp_path)})), LocalStack)


def test_cluster_and_secured_together_are_refused(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        environ={"DIANA_STACK_HOME": str(tmp_path), "DIANA_STACK_CLUSTER": "1", "DIANA_STACK_SECURED": "1"},
    )
    with pytest.raises(StackError, match="cannot run together"):
        local_stack(cfg)
