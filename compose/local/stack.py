"""The no-Docker local stack: Apache Kafka (KRaft) and OpenSearch from Maven Central, on 127.0.0.1,
and S3Proxy (an S3-compatible server on its filesystem backend) when [storage] backend = "s3".

``install`` downloads once into the cache (Maven's local repository does the caching),
``start`` writes configs, starts the servers detached and waits until they answer,
``stop`` ends them, ``status`` says what runs. Each service keeps a pid file and a log
under ``stack.home`` so a second command (or a test session) can find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from diana.config import Config, StorageConfig
from diana.credentials import redact

if TYPE_CHECKING:
    from diana.compose.local.secured import SecuredStack

log = structlog.get_logger("diana.stack")


# Kafka's own logging: its INFO lines, not the per-request chatter (each node of the cluster mode too).
KAFKA_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="stdout"/></Root>
  </Loggers>
</Configuration>
"""


# As root, OpenSearch runs as a system user and its files live here, one folder per stack home,
# each marked with the home it belongs to (STACK_HOME_MARK).
SYSTEM_OPENSEARCH_ROOT = Path("/var/lib/diana-star")
STACK_HOME_MARK = "stack-home"


def private_folder(path: Path) -> None:
    """Create ``path`` (and its parents) and make it 700: a server's data folder, which holds patient data
    (Kafka's segments carry the headers, OpenSearch's the index, S3Proxy's the objects). The servers create
    their files with the umask's mode (0644 with the usual 022); the folder keeps other local users out.
    Also made 700 when it was there before. Each server runs as the folder's owner (OpenSearch's folder is
    chowned to its user when the stack runs as root)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _in_use(folder: Path) -> bool:
    """Whether a running process names ``folder`` on its command line (OpenSearch's java names its
    home there)."""
    needle = str(folder).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                return True
        except OSError:  # the process ended meanwhile
            continue
    return False


def prune_orphaned_opensearch_dirs(root: Path) -> list[Path]:
    """Remove the OpenSearch folders under ``root`` whose stack home no longer exists (a test clone
    or a bench's work folder deleted, a run killed before its clean-up) and that no process uses:
    each held an unpacked OpenSearch of about 110 MB and its data. A folder without the mark (made
    before it existed) is left alone."""
    removed = []
    for folder in sorted(root.glob("opensearch-*")):
        try:
            home = Path((folder / STACK_HOME_MARK).read_text().strip())
            if home.exists() or _in_use(folder):
                continue
        except OSError:  # unreadable mark, or a home that cannot be looked at (a stale mount): kept
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


class StackError(RuntimeError):
    """The local stack cannot be installed or started; the message says why and what to do."""


@dataclass(frozen=True)
class Service:
    name: str
    pid_file: Path
    log_file: Path


def _java_home() -> Path:
    java = shutil.which("java")
    if not java:
        raise StackError("no `java` on PATH: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)")
    return Path(os.path.realpath(java)).parent.parent


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _refuse_foreign(service: str, port: int, setting: str) -> None:
    """Our server is not running but something answers on its port: it would be used by mistake."""
    if _port_in_use(port):
        raise StackError(
            f"port {port} is already in use by another process, so {service} cannot start there; "
            f"stop that process or set [stack] {setting} to a free port"
        )


def _mvn(args: list[str], cwd: Path) -> None:
    if not shutil.which("mvn"):
        raise StackError("no `mvn` on PATH: install Maven (apt-get install maven)")
    proc = subprocess.run(["mvn", "-q", "-B", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"mvn {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


class LocalStack:
    def __init__(self, config: Config):
        self.cfg = config.stack
        self.storage: StorageConfig = config.storage
        # S3Proxy runs with the stack only for the s3 storage backend (the tests start it on demand).
        self.with_s3 = config.storage.backend == "s3"
        self.max_message_bytes = config.kafka.max_message_bytes
        self.home = config.path(self.cfg.home)
        self.cache = config.path(self.cfg.cache_dir)
        self.kafka_libs = self.cache / f"kafka-{self.cfg.kafka_version}" / "libs"
        self.os_zip = self.cache / f"opensearch-{self.cfg.opensearch_version}.zip"
        self.kafka = Service("kafka", self.home / "kafka" / "kafka.pid", self.home / "kafka" / "kafka.log")
        self.opensearch = Service(
            "opensearch", self.home / "opensearch.pid", self._opensearch_dir() / "logs" / "console.log"
        )
        self.s3proxy_jar = self.cache / f"s3proxy-{self.cfg.s3proxy_version}-jar-with-dependencies.jar"
        self.s3proxy = Service("s3proxy", self.home / "s3proxy" / "s3proxy.pid", self.home / "s3proxy" / "s3proxy.log")
        self.kafka_config = config.kafka
        # [stack] secured: SASL_SSL Kafka and OpenSearch with its security plugin (compose/local/secured.py)
        self.secured: SecuredStack | None = None
        if self.cfg.secured:
            from diana.compose.local.secured import SecuredStack

            self.secured = SecuredStack(config, self.home, self.cache)

    # ---------------------------------------------------------------- install
    def install(self) -> None:
        """Download Kafka's runtime jars and the OpenSearch zip into the cache, once."""
        if not (self.kafka_libs / f"kafka_2.13-{self.cfg.kafka_version}.jar").exists():
            log.info("stack.install", component="kafka", version=self.cfg.kafka_version)
            tmp = self.kafka_libs.with_name("libs.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            # The pom is package data; Maven runs on a copy in the cache, never inside the package.
            self.cache.mkdir(parents=True, exist_ok=True)
            pom = self.cache / "kafka-pom.xml"
            pom.write_bytes((resources.files("diana.compose.local") / "kafka-pom.xml").read_bytes())
            _mvn(
                [
                    "-f",
                    str(pom),
                    f"-Dkafka.version={self.cfg.kafka_version}",
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={tmp}",
                ],
                cwd=self.cache,
            )
            shutil.rmtree(self.kafka_libs, ignore_errors=True)
            tmp.rename(self.kafka_libs)
        if not self.os_zip.exists():
            log.info("stack.install", component="opensearch", version=self.cfg.opensearch_version)
            self.cache.mkdir(parents=True, exist_ok=True)
            artifact = f"org.opensearch.distribution.integ-test-zip:opensearch:{self.cfg.opensearch_version}:zip"
            _mvn(["dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={self.cache}"], cwd=self.cache)
        if self.with_s3:
            self.install_s3proxy()
        if self.secured:
            self.secured.install(lambda args, cwd: _mvn(args, cwd=cwd))
        log.info("stack.installed", cache=str(self.cache))

    def install_s3proxy(self) -> None:
        """S3Proxy's single jar (about 41 MB, all dependencies inside) from Maven Central, once."""
        if self.s3proxy_jar.exists():
            return
        log.info("stack.install", component="s3proxy", version=self.cfg.s3proxy_version)
        self.cache.mkdir(parents=True, exist_ok=True)
        artifact = f"org.gaul:s3proxy:{self.cfg.s3proxy_version}:jar:jar-with-dependencies"
        _mvn(["dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={self.cache}"], cwd=self.cache)

    # ---------------------------------------------------------------- kafka
    def _kafka_dir(self) -> Path:
        return self.home / "kafka"

    def _write_kafka_config(self) -> Path:
        d = self._kafka_dir()
        d.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        listeners = f"""\
listeners=PLAINTEXT://127.0.0.1:{c.kafka_port},CONTROLLER://127.0.0.1:{c.kafka_controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{c.kafka_port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
"""
        if self.secured:
            listeners = self.secured.kafka_listener_properties(c.kafka_port, c.kafka_controller_port)
        props = f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{c.kafka_controller_port}
{listeners}log.dirs={d / "data"}
num.partitions=3
# single node: internal topics cannot have more replicas than brokers
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# the same event size limit as the producers and topics ([kafka] max_message_bytes)
message.max.bytes={self.max_message_bytes}
replica.fetch.max.bytes={self.max_message_bytes}
# keep the log: topics set their own retention (docs/ARCHITECTURE.md)
log.retention.hours=-1
"""
        # The secured variant's file holds the broker's SCRAM password: readable by us alone.
        (d / "server.properties").touch(mode=0o600)
        (d / "server.properties").chmod(0o600)
        (d / "server.properties").write_text(props)
        (d / "log4j2.xml").write_text(KAFKA_LOG4J2)
        return d / "server.properties"

    def _kafka_java(self, main: str, *args: str) -> list[str]:
        d = self._kafka_dir()
        return [
            str(_java_home() / "bin" / "java"),
            f"-Xms{self.cfg.kafka_heap_mb}m",
            f"-Xmx{self.cfg.kafka_heap_mb}m",
            f"-Dlog4j2.configurationFile={d / 'log4j2.xml'}",
            "-cp",
            f"{self.kafka_libs}/*",
            main,
            *args,
        ]

    def start_kafka(self) -> None:
        if self._running(self.kafka):
            log.info("stack.already_running", service="kafka", port=self.cfg.kafka_port)
            return
        _refuse_foreign("Kafka", self.cfg.kafka_port, "kafka_port")
        props = self._write_kafka_config()
        private_folder(self._kafka_dir() / "data")  # before the format: Kafka runs as this process's user
        if self.secured:
            self.secured.check_kafka_data(self._kafka_dir() / "data")
        if not (self._kafka_dir() / "data" / "meta.properties").exists():
            uuid_out = subprocess.run(
                self._kafka_java("kafka.tools.StorageTool", "random-uuid"), capture_output=True, text=True, check=True
            ).stdout
            cluster_id = uuid_out.strip().splitlines()[-1].strip()  # after any log line log4j printed first
            command = self._kafka_java(
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(props),
                *(self.secured.kafka_format_args() if self.secured else []),
            )
            with tempfile.TemporaryDirectory(prefix="diana-kafka-format-") as private:
                if self.secured:
                    command = self.secured.private_java_command(command, "kafka.tools.StorageTool", Path(private))
                proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                # Redacted: the format's own usage error repeats its arguments, the SCRAM password among them.
                raise StackError(redact(f"formatting Kafka storage failed: {proc.stdout}{proc.stderr}"))
            if self.secured:
                self.secured.mark_kafka_data(self._kafka_dir() / "data")
        self._spawn(self.kafka, self._kafka_java("kafka.Kafka", str(props)), env=None, user=None)

    # ---------------------------------------------------------------- opensearch
    def _opensearch_dir(self) -> Path:
        if os.geteuid() == 0:
            # Run as a system user, which cannot traverse root's home (often where the clone is):
            # keep its files under /var/lib, one folder per stack home.
            digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:10]
            return SYSTEM_OPENSEARCH_ROOT / f"opensearch-{digest}"
        return self.home / "opensearch"

    def _make_opensearch_dir(self) -> None:
        """Create the OpenSearch folder; outside the stack home (as root), mark it with the home it
        belongs to, and first remove the folders of stack homes that are gone."""
        folder = self._opensearch_dir()
        if folder.is_relative_to(self.home):
            folder.mkdir(parents=True, exist_ok=True)
            return
        for removed in prune_orphaned_opensearch_dirs(folder.parent):
            log.info("stack.pruned", folder=str(removed), reason="its stack home is gone")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STACK_HOME_MARK).write_text(str(self.home))

    def _opensearch_user(self) -> str | None:
        """OpenSearch will not run as root: as root, run it as a dedicated system user."""
        if os.geteuid() != 0:
            return None
        user = self.cfg.opensearch_user
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True
            )
        return user

    def _opensearch_home(self) -> Path:
        return self._opensearch_dir() / f"opensearch-{self.cfg.opensearch_version}"

    def _unpack_opensearch(self, user: str | None) -> Path:
        home = self._opensearch_home()
        if not (home / "bin" / "opensearch").exists():
            with zipfile.ZipFile(self.os_zip) as zf:
                zf.extractall(self._opensearch_dir())
            # zipfile drops the executable bits
            for script in (home / "bin").iterdir():
                script.chmod(0o755)
        c = self.cfg
        (home / "config" / "opensearch.yml").write_text(
            f"""cluster.name: diana-star-local
node.name: diana-local-1
path.data: {self._opensearch_dir() / "data"}
path.logs: {self._opensearch_dir() / "logs"}
network.host: 127.0.0.1
http.port: {c.opensearch_port}
transport.port: {c.opensearch_transport_port}
discovery.type: single-node
# a single node never has replicas: keep indices green-able and the disk watermark lenient
cluster.routing.allocation.disk.threshold_enabled: false
action.auto_create_index: true
"""
            + (self.secured.opensearch_yml() if self.secured else "")
        )
        if self.secured:
            self.secured.prepare_opensearch(home, _java_home())
        private_folder(self._opensearch_dir() / "data")
        (self._opensearch_dir() / "logs").mkdir(parents=True, exist_ok=True)
        if user:
            pw = pwd.getpwnam(user)
            subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(self._opensearch_dir())], check=True)
        return home

    def start_opensearch(self) -> None:
        if self._running(self.opensearch):
            log.info("stack.already_running", service="opensearch", port=self.cfg.opensearch_port)
            return
        _refuse_foreign("OpenSearch", self.cfg.opensearch_port, "opensearch_port")
        user = self._opensearch_user()
        self._make_opensearch_dir()
        home = self._unpack_opensearch(user)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "OPENSEARCH_JAVA_HOME": str(_java_home()),
            "OPENSEARCH_JAVA_OPTS": f"-Xms{self.cfg.opensearch_heap_mb}m -Xmx{self.cfg.opensearch_heap_mb}m",
            "OPENSEARCH_PATH_CONF": str(home / "config"),
        }
        self._spawn(self.opensearch, [str(home / "bin" / "opensearch")], env=env, user=user)

    # ---------------------------------------------------------------- s3proxy
    def _s3proxy_dir(self) -> Path:
        return self.home / "s3proxy"

    def s3_endpoint(self) -> str:
        """S3Proxy's address: https with the secured variant (its certificate from the stack's CA)."""
        return f"{'https' if self.secured else 'http'}://127.0.0.1:{self.cfg.s3proxy_port}"

    def _s3_keys(self) -> tuple[str, str]:
        from diana.clients import s3_credentials

        keys = s3_credentials(self.storage)
        if keys is None:
            raise StackError(
                "S3Proxy needs an identity: set [storage] s3_credentials_file (AWS credentials format) or "
                "DIANA_STORAGE_S3_ACCESS_KEY_ID and DIANA_STORAGE_S3_SECRET_ACCESS_KEY; the stack serves them"
            )
        return keys

    def start_s3proxy(self) -> None:
        if self._running(self.s3proxy):
            log.info("stack.already_running", service="s3proxy", port=self.cfg.s3proxy_port)
            return
        _refuse_foreign("S3Proxy", self.cfg.s3proxy_port, "s3proxy_port")
        self.install_s3proxy()
        identity, credential = self._s3_keys()
        d = self._s3proxy_dir()
        private_folder(d / "data")  # the landing store's and the archive's objects
        props = d / "s3proxy.properties"
        # The file holds the secret: readable by us alone, and never logged.
        props.touch(mode=0o600)
        props.chmod(0o600)
        # The secured variant serves HTTPS alone (secure-endpoint, a PKCS#12 keystore): no plain port.
        listen = (
            self.secured.s3proxy_tls_properties(self.s3_endpoint())
            if self.secured
            else f"s3proxy.endpoint={self.s3_endpoint()}\n"
        )
        props.write_text(
            f"""{listen}s3proxy.authorization=aws-v2-or-v4
s3proxy.identity={identity}
s3proxy.credential={credential}
jclouds.provider=filesystem
jclouds.filesystem.basedir={d / "data"}
"""
        )
        heap = self.cfg.s3proxy_heap_mb
        cmd = [str(_java_home() / "bin" / "java"), f"-Xms{heap}m", f"-Xmx{heap}m", "-jar", str(self.s3proxy_jar)]
        self._spawn(self.s3proxy, [*cmd, "--properties", str(props)], env=None, user=None)

    def wait_s3proxy(self, timeout: float = 60.0) -> None:
        """Ready when the bucket of [storage] exists (created on first start) and answers."""
        from diana.clients import s3_client

        client = s3_client(self.storage, endpoint=self.s3_endpoint())
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._running(self.s3proxy):
                raise StackError(f"S3Proxy exited during start-up; see {self.s3proxy.log_file}")
            try:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.storage.s3_bucket not in existing:
                    client.create_bucket(Bucket=self.storage.s3_bucket)
                log.info("stack.ready", service="s3proxy", endpoint=self.s3_endpoint(), bucket=self.storage.s3_bucket)
                return
            except Exception as exc:  # connection refused while the JVM starts
                last = exc
                time.sleep(0.5)
        raise StackError(f"S3Proxy did not answer within {timeout:.0f}s ({last}); see {self.s3proxy.log_file}")

    def stop_s3proxy(self) -> None:
        self._stop(self.s3proxy)

    def reset_s3proxy(self) -> None:
        """Stop S3Proxy and delete its objects: the next start is an empty store."""
        self._stop(self.s3proxy)
        shutil.rmtree(self._s3proxy_dir() / "data", ignore_errors=True)

    # ---------------------------------------------------------------- process control
    def _spawn(self, svc: Service, cmd: list[str], env: dict | None, user: str | None) -> None:
        svc.log_file.parent.mkdir(parents=True, exist_ok=True)
        if user:
            cmd = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in (env or {}).items()), *cmd]
            env = None
        with open(svc.log_file, "ab") as out:
            # A session of its own: Ctrl-C in the foreground `diana run` must not reach the servers
            # before the pipeline has stopped cleanly; `stop` ends them in order.
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        svc.pid_file.write_text(str(proc.pid))
        log.info("stack.started", service=svc.name, pid=proc.pid, log=str(svc.log_file))

    def pid_of(self, name: str) -> int | None:
        """The pid of a service this stack started ("kafka", "opensearch", "s3proxy"), if it runs."""
        svc = {"kafka": self.kafka, "opensearch": self.opensearch, "s3proxy": self.s3proxy}[name]
        return self._pid(svc) if self._running(svc) else None

    @staticmethod
    def _pid(svc: Service) -> int | None:
        try:
            return int(svc.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _running(self, svc: Service) -> bool:
        pid = self._pid(svc)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie of ours counts as ended
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            return state != "Z"
        except OSError:
            return True

    def _stop(self, svc: Service, timeout: float = 60.0) -> None:
        pid = self._pid(svc)
        if pid is None or not self._running(svc):
            svc.pid_file.unlink(missing_ok=True)
            return
        # The process group: runuser's child (the JVM) must end too.
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._running(svc):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        if self._running(svc):
            log.warning("stack.kill", service=svc.name, pid=pid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        svc.pid_file.unlink(missing_ok=True)
        log.info("stack.stopped", service=svc.name)

    # ---------------------------------------------------------------- readiness
    def wait_kafka(self, timeout: float = 120.0) -> None:
        from diana.clients import kafka_admin
        from diana.config import KafkaConfig

        # log_level 0: the refused connections while the broker boots are expected, not news
        kafka = replace(self.kafka_config, bootstrap=f"127.0.0.1:{self.cfg.kafka_port}")
        if not self.secured:  # the stack's own listener is plain whatever [kafka] says
            kafka = KafkaConfig(bootstrap=kafka.bootstrap)
        admin = kafka_admin(kafka, {"log_level": 0})
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._running(self.kafka):
                raise StackError(f"Kafka exited during start-up; see {self.kafka.log_file}")
            try:
                admin.list_topics(timeout=2)
                log.info("stack.ready", service="kafka", bootstrap=f"127.0.0.1:{self.cfg.kafka_port}")
                return
            except Exception as exc:  # KafkaException while the broker is coming up
                last = exc
                time.sleep(0.5)
        raise StackError(f"Kafka did not answer within {timeout:.0f}s ({last}); see {self.kafka.log_file}")

    def opensearch_url(self) -> str:
        scheme = "https" if self.secured else "http"
        return f"{scheme}://127.0.0.1:{self.cfg.opensearch_port}"

    def wait_opensearch(self, timeout: float = 180.0) -> None:
        url = f"{self.opensearch_url()}/_cluster/health?wait_for_status=yellow&timeout=5s"
        deadline = time.monotonic() + timeout
        last: Exception | str | None = None
        while time.monotonic() < deadline:
            if not self._running(self.opensearch):
                raise StackError(f"OpenSearch exited during start-up; see {self.opensearch.log_file}")
            try:
                if self.secured:
                    body = self.secured.health(url, timeout=10)
                else:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        body = json.load(resp)
                if body.get("status") in ("yellow", "green"):
                    log.info("stack.ready", service="opensearch", url=self.opensearch_url())
                    return
                last = body.get("status")
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as exc:
                last = exc
            time.sleep(1)
        raise StackError(f"OpenSearch not healthy within {timeout:.0f}s ({last}); see {self.opensearch.log_file}")

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        if self.secured:
            self.secured.check()  # the users, passwords and CA settings: said before anything starts
        if self.with_s3:
            self._s3_keys()  # no identity for S3Proxy: say so before anything starts
        self.install()
        self.start_kafka()
        self.start_opensearch()
        if self.with_s3:
            self.start_s3proxy()
            self.wait_s3proxy()
        self.wait_kafka()
        self.wait_opensearch()

    def stop(self) -> None:
        if self.with_s3:
            self._stop(self.s3proxy)
        self._stop(self.opensearch)
        self._stop(self.kafka)

    def stop_kafka(self) -> None:
        """Stop the broker alone (the fault-injection suite's broker outage)."""
        self._stop(self.kafka)

    def stop_opensearch(self) -> None:
        self._stop(self.opensearch)

    def reset(self) -> None:
        """Stop both servers and delete their data: the next start is a fresh cluster."""
        self.stop()
        shutil.rmtree(self._kafka_dir() / "data", ignore_errors=True)
        shutil.rmtree(self._opensearch_dir() / "data", ignore_errors=True)
        if self.with_s3:
            shutil.rmtree(self._s3proxy_dir() / "data", ignore_errors=True)
        log.info("stack.reset", home=str(self.home))

    def status(self) -> dict[str, dict]:
        out = {}
        services = [(self.kafka, f"127.0.0.1:{self.cfg.kafka_port}"), (self.opensearch, self.opensearch_url())]
        if self.with_s3 or self._running(self.s3proxy):
            services.append((self.s3proxy, self.s3_endpoint()))
        for svc, where in services:
            out[svc.name] = {
                "running": self._running(svc),
                "pid": self._pid(svc),
                "address": where,
                "log": str(svc.log_file),
            }
        return out


def local_stack(config: Config) -> LocalStack:
    """The stack [stack] asks for: the cluster mode (compose/local/cluster.py) or the single-node one."""
    if config.stack.cluster:
        from diana.compose.local.cluster import ClusterStack

        return ClusterStack(config)
    return LocalStack(config)
