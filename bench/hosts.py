"""Several pipeline "hosts" on one machine, for bench.faults --nodes and bench.nodes.

Each pipeline process runs as if on a host of its own: its own folder ``hosts/<name>/`` holding its
configuration file, its landing folder (only the receiver's scratch ``.incoming/`` with S3), its
stream state and its stable worker id; no local path is shared between two of them. What they share
is what hosts share in production: the Kafka cluster, the OpenSearch cluster and the S3 bucket
(landing/ and archive/), and the S3 identity, given to each through the environment.

Per node n (1, 2): ``receiver-n`` (receiver port + n-1, the same AE title: senders reach them
round robin, docs/SCALING.md), ``aggregates-n`` (worker id ``aggregates-n``), ``archive-sink-n`` and
``opensearch-sink-n`` (one consumer group per sink kind: the partitions are shared out), and
``dose-n`` (the Faust dose worker; both in its one group, Faust's assignor shares out the
partitions and their table changelogs, docs/SCALING.md).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.faults import PORTS, Suite

# What one node runs: two of every pipeline process with --nodes 2.
NODE_ROLES = {
    "receiver": ("receive",),
    "aggregates": ("aggregate",),
    "archive-sink": ("sink", "archive"),
    "opensearch-sink": ("sink", "opensearch"),
    "dose": ("dose",),
}


def host_names(nodes: int) -> list[str]:
    """Every process of the layout, node by node: receiver-1, aggregates-1, ..., dose-1, receiver-2, ..."""
    return [f"{role}-{n}" for n in range(1, nodes + 1) for role in NODE_ROLES]


def role_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def node_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


class NodesSuite(Suite):
    """The fault suite's pipeline as ``nodes`` separate hosts on the cluster, landing and archive on S3."""

    def __init__(self, work: Path, short: bool, instances: int, associations: int, nodes: int = 2):
        super().__init__(work, short, instances, associations, cluster=True, s3=True)
        self.nodes = nodes
        self.hosts = work / "hosts"

    def host_dir(self, name: str) -> Path:
        return self.hosts / name

    def receiver_port(self, node: int) -> int:
        return PORTS["diana"] + node - 1

    def provision(self, name: str) -> Path:
        """A fresh host: its folder and its own configuration file (as a new machine gets on deployment)."""
        root = self.host_dir(name)
        root.mkdir(parents=True, exist_ok=True)
        node = node_of(name)
        # The aggregates worker's metrics port also names its kept id file: one per node.
        web_port = PORTS["aggregates"] + 100 * (node - 1)
        worker_id = f"aggregates-{node}" if role_of(name) == "aggregates" else ""
        config = root / "diana.toml"
        # The dose worker's Faust web port: one per node, as the metrics ports (one machine here).
        dose_port = PORTS["dose"] + 100 * (node - 1)
        config.write_text(self.config_text(root, self.receiver_port(node), web_port, worker_id, dose_port))
        return config

    def receiver_ports(self) -> list[int]:
        return [self.receiver_port(n) for n in range(1, self.nodes + 1) if f"receiver-{n}" in self.procs]

    def start(self, names: list[str] | None = None) -> None:
        self.stack.reset()
        self.stack.start()
        subprocess.run(self._cmd("topics"), env=self._env(), check=True, capture_output=True)
        for name in names if names is not None else host_names(self.nodes):
            self.start_process(name)
        self.wait_echo()

    def start_process(self, name: str) -> None:
        config = self.host_dir(name) / "diana.toml"
        if not config.exists():
            config = self.provision(name)
        env = self._env()
        env["DIANA_CONFIG"] = str(config)
        log = open(self.work / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            self._cmd(*NODE_ROLES[role_of(name)]),
            env=env,
            cwd=self.host_dir(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def leftovers(self) -> list[str]:
        found = super().leftovers()
        for root in sorted(self.hosts.glob("*/landing")):
            found += [str(p) for p in root.rglob("*") if p.is_file()]
        return found

    def lose_receiver_host(self, name: str = "receiver-1", down_s: float = 10.0) -> None:
        """kill -9 of a receiver, then its whole folder deleted (landing_dir, .incoming, its configuration):
        the host is gone. After ``down_s`` a replacement host with an empty folder takes its place."""
        port = self.receiver_port(node_of(name))
        self.kill(name)
        held = [p for p in self.host_dir(name).rglob("*") if p.is_file()]
        self.notes.append(
            f"{name} killed after it had acknowledged {self.acked_on[port]}; its folder deleted with "
            f"{len(held)} files in it ({sum(1 for p in held if '.incoming' in p.parts)} in .incoming)"
        )
        shutil.rmtree(self.host_dir(name))
        time.sleep(down_s)
        self.provision(name)
        self.start_process(name)
        self.wait_echo()
