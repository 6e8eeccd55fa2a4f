"""The local stack's data folders hold patient data (Kafka's segments carry the instances' headers) and
are 700. Before, Kafka created its log folder with the umask's mode (0755 with the usual 022) and its
segments 0644: every local user could read the headers. Kafka runs as the process that starts the stack
(``_spawn(..., user=None)``), the owner of the folder. No server is started here."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

import diana.compose.local.stack as stack_module
from diana.compose.local.cluster import ClusterStack
from diana.compose.local.stack import LocalStack
from diana.config import load_config
from tests.support.umask import umask


@pytest.fixture(autouse=True)
def usual_umask():
    with umask(0o022):
        yield


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kafka_data_is_private_before_the_format_writes_into_it(tmp_path: Path, monkeypatch) -> None:
    stack = LocalStack(load_config(None, environ={"DIANA_STACK_HOME": str(tmp_path / "stack")}))
    data = stack._kafka_dir() / "data"
    modes_at_format: list[int] = []

    def run(command, **kwargs):
        if "format" in command:
            data.mkdir(exist_ok=True)  # what StorageTool does with a missing log folder (umask's mode)
            modes_at_format.append(_mode(data))
        return subprocess.CompletedProcess(command, 0, stdout="cluster-id\n", stderr="")

    monkeypatch.setattr(stack_module, "_refuse_foreign", lambda *a: None)
    monkeypatch.setattr(stack_module.subprocess, "run", run)
    monkeypatch.setattr(LocalStack, "_running", lambda self, svc: False)
    monkeypatch.setattr(LocalStack, "_spawn", lambda self, svc, cmd, env, user: None)
    stack.start_kafka()
    assert modes_at_format == [0o700]
    data.chmod(0o755)  # a stack home made before this rule
    stack.start_kafka()
    assert _mode(data) == 0o700


def test_each_cluster_broker_data_folder_is_private(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"DIANA_STACK_HOME": str(tmp_path), "DIANA_STACK_CLUSTER": "true"})
    cluster = ClusterStack(cfg)
    cluster._write_broker_config(2)
    assert _mode(cluster._broker_dir(2) / "data") == 0o700
