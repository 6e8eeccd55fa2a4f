"""The local cluster mode of the no-Docker stack: three Kafka brokers and two OpenSearch nodes on 127.0.0.1.

Kafka runs in KRaft combined mode: each of the three nodes is broker and controller, the three
controllers form the voter quorum, so one node can die and the cluster keeps a leader and every
partition a leader. Topics get 3 replicas and ``min.insync.replicas`` 2 (schemas/topics.py picks
them from the broker count): an ``acks=all`` write is on two brokers' logs before it is
acknowledged, and with two brokers down a producer is refused rather than left with one copy.
OpenSearch runs two nodes of one cluster; indices get one replica ([opensearch] number_of_replicas),
so either node holds a copy of every shard.

Each node has its own folder (``<home>/kafka-N``, ``<opensearch dir>/node-N``), pid file and log;
ports follow from [stack] (docs/SCALING.md). The nodes start in parallel, then the wait is for the
whole quorum (three registered brokers) and the whole cluster (two nodes, yellow or better).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import structlog

from diana.compose.local.stack import (
    KAFKA_LOG4J2,
    LocalStack,
    Service,
    StackError,
    _java_home,
    _port_in_use,
    _refuse_foreign,
    private_folder,
)
from diana.config import Config

log = structlog.get_logger("diana.stack")

KAFKA_NODES = 3
OPENSEARCH_NODES = 2


class ClusterStack(LocalStack):
    """Three Kafka nodes and two OpenSearch nodes; the same start/stop/reset/status as LocalStack."""

    def __init__(self, config: Config):
        super().__init__(config)
        if self.secured:
            raise StackError(
                "the cluster mode and the secured variant cannot run together yet: "
                "start `diana stack start --cluster` or `diana stack start --secured`"
            )
        self.brokers = [
            Service(f"kafka-{n}", self._broker_dir(n) / "kafka.pid", self._broker_dir(n) / "kafka.log")
            for n in range(1, KAFKA_NODES + 1)
        ]
        self.search_nodes = [
            Service(f"opensearch-{n}", self.home / f"opensearch-{n}.pid", self._node_dir(n) / "logs" / "console.log")
            for n in range(1, OPENSEARCH_NODES + 1)
        ]

    # ---------------------------------------------------------------- addresses
    def broker_port(self, n: int) -> int:
        return self.cfg.kafka_port + 2 * (n - 1)

    def controller_port(self, n: int) -> int:
        return self.cfg.kafka_controller_port + 2 * (n - 1)

    def search_port(self, n: int) -> int:
        return self.cfg.opensearch_port + n - 1

    def transport_port(self, n: int) -> int:
        return self.cfg.opensearch_transport_port + n - 1

    def bootstrap(self) -> str:
        """Every broker: what [kafka] bootstrap should list, so a client starts while any one is down."""
        return ",".join(f"127.0.0.1:{self.broker_port(n)}" for n in range(1, KAFKA_NODES + 1))

    def opensearch_urls(self) -> str:
        """Both nodes: what [opensearch] url should list."""
        return ",".join(f"http://127.0.0.1:{self.search_port(n)}" for n in range(1, OPENSEARCH_NODES + 1))

    # ---------------------------------------------------------------- kafka
    def _broker_dir(self, n: int) -> Path:
        return self.home / f"kafka-{n}"

    def _write_broker_config(self, n: int) -> Path:
        d = self._broker_dir(n)
        private_folder(d / "data")  # Kafka runs as this process's user; its segments carry the headers
        voters = ",".join(f"{i}@127.0.0.1:{self.controller_port(i)}" for i in range(1, KAFKA_NODES + 1))
        port, controller = self.broker_port(n), self.controller_port(n)
        (d / "server.properties").write_text(
            f"""\
process.roles=broker,controller
node.id={n}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={d / "data"}
num.partitions=3
# three replicas of everything, two in sync before a write counts: one broker may be lost
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
default.replication.factor=3
min.insync.replicas=2
# a replica that is not in sync never becomes leader: an acknowledged write is never dropped
unclean.leader.election.enable=false
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes={self.max_message_bytes}
replica.fetch.max.bytes={self.max_message_bytes}
log.retention.hours=-1
"""
        )
        (d / "log4j2.xml").write_text(KAFKA_LOG4J2)
        return d / "server.properties"

    def _broker_java(self, n: int, main: str, *args: str) -> list[str]:
        heap = self.cfg.cluster_kafka_heap_mb
        return [
            str(_java_home() / "bin" / "java"),
            f"-Xms{heap}m",
            f"-Xmx{heap}m",
            f"-Dlog4j2.configurationFile={self._broker_dir(n) / 'log4j2.xml'}",
            "-cp",
            f"{self.kafka_libs}/*",
            main,
            *args,
        ]

    def _cluster_id(self) -> str:
        """One id for all three nodes' storage, made once (a node formatted with another would not join).

        Kafka's own form (StorageTool random-uuid): 16 random bytes, base64url without padding, not
        starting with "-"; made here, which spares one JVM start.
        """
        path = self.home / "kafka-cluster-id"
        if path.exists():
            return path.read_text().strip()
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cluster_id)
        return cluster_id

    def _format_brokers(self, nodes: list[int]) -> None:
        """Format the storage of the nodes that have none yet, in parallel."""
        todo = [n for n in nodes if not (self._broker_dir(n) / "data" / "meta.properties").exists()]
        if not todo:
            return
        cluster_id = self._cluster_id()
        procs = {
            n: subprocess.Popen(
                self._broker_java(
                    n, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self._write_broker_config(n))
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n in todo
        }
        for n, proc in procs.items():
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise StackError(f"formatting the storage of Kafka node {n} failed: {output[-2000:]}")

    def start_brokers(self, nodes: list[int] | None = None) -> None:
        """Start the given nodes (default: all) at once; `wait_kafka` waits for them."""
        nodes = nodes or list(range(1, KAFKA_NODES + 1))
        todo = []
        for n in nodes:
            if self._running(self.brokers[n - 1]):
                log.info("stack.already_running", service=f"kafka-{n}", port=self.broker_port(n))
                continue
            _refuse_foreign(f"Kafka node {n}", self.broker_port(n), "kafka_port")
            _refuse_foreign(f"Kafka node {n}'s controller", self.controller_port(n), "kafka_controller_port")
            self._write_broker_config(n)
            todo.append(n)
        self._format_brokers(todo)
        for n in todo:
            props = self._broker_dir(n) / "server.properties"
            self._spawn(self.brokers[n - 1], self._broker_java(n, "kafka.Kafka", str(props)), env=None, user=None)

    def kill_broker(self, n: int) -> None:
        """SIGKILL of one node (the fault of a broker lost mid-write: no clean shutdown, no leader hand-over)."""
        svc = self.brokers[n - 1]
        pid = self._pid(svc)
        if pid is not None and self._running(svc):
            try:
                os.killpg(pid, signal.SIGKILL)  # the JVM leads its own session
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while self._running(svc) and time.monotonic() < deadline:
                time.sleep(0.1)
        svc.pid_file.unlink(missing_ok=True)
        log.info("stack.killed", service=svc.name)

    def stop_broker(self, n: int) -> None:
        self._stop(self.brokers[n - 1])

    def wait_kafka(self, timeout: float = 180.0, brokers: int = KAFKA_NODES) -> None:
        """Ready when every node listens, ``brokers`` brokers are registered (only an elected controller
        quorum registers them) and every partition has a leader and at least two replicas in sync.

        The listeners and the partitions matter after a restart: with two nodes dead, the last one has
        no quorum to fence them, so its metadata still lists all three brokers before they are back.
        """
        from diana.clients import kafka_admin
        from diana.config import KafkaConfig

        admin = kafka_admin(KafkaConfig(bootstrap=self.bootstrap()), {"log_level": 0})
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            dead = [svc for svc in self.brokers if svc.pid_file.exists() and not self._running(svc)]
            if dead:
                raise StackError(f"{dead[0].name} exited during start-up; see {dead[0].log_file}")
            try:
                silent = [n for n in range(1, KAFKA_NODES + 1) if not _port_in_use(self.broker_port(n))]
                metadata = admin.list_topics(timeout=2)
                registered = len(metadata.brokers)
                lagging = [
                    f"{name}/{number}"
                    for name, topic in metadata.topics.items()
                    for number, partition in topic.partitions.items()
                    if partition.leader < 0 or len(partition.isrs) < min(2, len(partition.replicas))
                ]
                if registered >= brokers and not silent and not lagging:
                    log.info("stack.ready", service="kafka", brokers=registered, bootstrap=self.bootstrap())
                    return
                last = f"{registered} of {brokers} brokers registered, not listening: {silent}, " + (
                    f"{len(lagging)} partitions without a leader or with one replica in sync (e.g. {lagging[0]})"
                    if lagging
                    else "every partition led"
                )
            except Exception as exc:  # KafkaException while the quorum elects its leader
                last = exc
            time.sleep(0.5)
        raise StackError(f"the Kafka cluster was not ready within {timeout:.0f}s ({last}); see {self.home}/kafka-*/")

    # ---------------------------------------------------------------- opensearch
    def _node_dir(self, n: int) -> Path:
        return self._opensearch_dir() / f"node-{n}"

    def _write_node_config(self, n: int, install: Path) -> Path:
        """Each node its own config folder (a copy of the distribution's, with its own opensearch.yml)."""
        conf = self._node_dir(n) / "config"
        if not conf.exists():
            shutil.copytree(install / "config", conf)
        seeds = ", ".join(f'"127.0.0.1:{self.transport_port(i)}"' for i in range(1, OPENSEARCH_NODES + 1))
        names = ", ".join(f'"diana-node-{i}"' for i in range(1, OPENSEARCH_NODES + 1))
        (conf / "opensearch.yml").write_text(
            f"""cluster.name: diana-star-cluster
node.name: diana-node-{n}
path.data: {self._node_dir(n) / "data"}
path.logs: {self._node_dir(n) / "logs"}
network.host: 127.0.0.1
http.port: {self.search_port(n)}
transport.port: {self.transport_port(n)}
discovery.seed_hosts: [{seeds}]
cluster.initial_cluster_manager_nodes: [{names}]
cluster.routing.allocation.disk.threshold_enabled: false
action.auto_create_index: true
"""
        )
        private_folder(self._node_dir(n) / "data")  # chowned with the node's folder when run as root
        (self._node_dir(n) / "logs").mkdir(parents=True, exist_ok=True)
        return conf

    def start_search_nodes(self, nodes: list[int] | None = None) -> None:
        nodes = nodes or list(range(1, OPENSEARCH_NODES + 1))
        user = self._opensearch_user()
        self._make_opensearch_dir()
        install = self._unpack_opensearch(user)
        for n in nodes:
            svc = self.search_nodes[n - 1]
            if self._running(svc):
                log.info("stack.already_running", service=svc.name, port=self.search_port(n))
                continue
            _refuse_foreign(f"OpenSearch node {n}", self.search_port(n), "opensearch_port")
            _refuse_foreign(f"OpenSearch node {n}'s transport", self.transport_port(n), "opensearch_transport_port")
            conf = self._write_node_config(n, install)
            if user:
                import pwd

                pw = pwd.getpwnam(user)
                subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(self._node_dir(n))], check=True)
            heap = self.cfg.cluster_opensearch_heap_mb
            env = {
                "PATH": "/usr/bin:/bin",
                "OPENSEARCH_JAVA_HOME": str(_java_home()),
                "OPENSEARCH_JAVA_OPTS": f"-Xms{heap}m -Xmx{heap}m",
                "OPENSEARCH_PATH_CONF": str(conf),
            }
            self._spawn(svc, [str(install / "bin" / "opensearch")], env=env, user=user)

    def stop_search_node(self, n: int) -> None:
        self._stop(self.search_nodes[n - 1])

    def search_health(self, n: int, query: str = "", timeout: float = 10) -> dict:
        """GET _cluster/health on node ``n``."""
        url = f"http://127.0.0.1:{self.search_port(n)}/_cluster/health{query}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: dict = json.load(resp)
            return body

    def wait_opensearch(self, timeout: float = 240.0, nodes: int = OPENSEARCH_NODES) -> None:
        """Ready when one node sees ``nodes`` nodes in its cluster and the status is yellow or green."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            running = [n for n in range(1, OPENSEARCH_NODES + 1) if self._running(self.search_nodes[n - 1])]
            if not running:
                raise StackError(f"no OpenSearch node runs; see {self._opensearch_dir()}/node-*/logs/console.log")
            for n in running:
                try:
                    body = self.search_health(n, f"?wait_for_nodes={nodes}&wait_for_status=yellow&timeout=5s")
                    if body.get("number_of_nodes", 0) >= nodes and body.get("status") in ("yellow", "green"):
                        log.info("stack.ready", service="opensearch", nodes=body["number_of_nodes"])
                        return
                    last = f"{body.get('number_of_nodes')} nodes, {body.get('status')}"
                except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as exc:
                    last = exc
            time.sleep(1)
        raise StackError(
            f"the OpenSearch cluster was not ready within {timeout:.0f}s ({last}); "
            f"see {self._opensearch_dir()}/node-*/logs/console.log"
        )

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        if self.with_s3:
            self._s3_keys()
        self.install()
        # All JVMs at once: the brokers wait for each other's votes anyway.
        self.start_brokers()
        self.start_search_nodes()
        if self.with_s3:
            self.start_s3proxy()
            self.wait_s3proxy()
        self.wait_kafka()
        self.wait_opensearch()

    def stop(self) -> None:
        if self.with_s3:
            self._stop(self.s3proxy)
        # All at once: a broker stopped last, alone, waits for a controller quorum that is gone.
        self._stop_together(self.search_nodes)
        self._stop_together(self.brokers)

    def _stop_together(self, services: list[Service]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(services)) as pool:
            list(pool.map(self._stop, services))

    def reset(self) -> None:
        self.stop()
        for n in range(1, KAFKA_NODES + 1):
            shutil.rmtree(self._broker_dir(n) / "data", ignore_errors=True)
        (self.home / "kafka-cluster-id").unlink(missing_ok=True)
        for n in range(1, OPENSEARCH_NODES + 1):
            shutil.rmtree(self._node_dir(n) / "data", ignore_errors=True)
        if self.with_s3:
            shutil.rmtree(self._s3proxy_dir() / "data", ignore_errors=True)
        log.info("stack.reset", home=str(self.home), cluster=True)

    def stop_kafka(self) -> None:
        self._stop_together(self.brokers)

    def stop_opensearch(self) -> None:
        self._stop_together(self.search_nodes)

    def status(self) -> dict[str, dict]:
        services = [(svc, f"127.0.0.1:{self.broker_port(i + 1)}") for i, svc in enumerate(self.brokers)]
        services += [(svc, f"http://127.0.0.1:{self.search_port(i + 1)}") for i, svc in enumerate(self.search_nodes)]
        if self.with_s3 or self._running(self.s3proxy):
            services.append((self.s3proxy, self.s3_endpoint()))
        return {
            svc.name: {"running": self._running(svc), "pid": self._pid(svc), "address": where, "log": str(svc.log_file)}
            for svc, where in services
        }
