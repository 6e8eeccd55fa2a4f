"""python -m bench.faults: under crashes and outages, nothing acknowledged is lost, nothing counted twice.

Each scenario sends a fresh corpus (CT studies of 50 instances) over several associations with
pynetdicom, retrying what did not get success as a modality would, and injects one fault once 30 %
of the instances are acknowledged. When the fault is over, it waits until every invariant holds:

- every acknowledged instance is in the archive, byte-identical, and indexed in OpenSearch once;
- every series and study aggregate has exactly the instances sent;
- every study's CT dose report (one per study) gives one dose study record (one report, two events),
  its two dose events and its two alerts, each indexed once; copies of a record or an alert on the
  dose topics (the dose worker re-sends after a crash, stream_apps/README.md) are byte-identical;
- the landing store holds no orphan; every new dead letter carries its reason; consumer lag is zero.

It starts its own Kafka, OpenSearch and pipeline (ports 27092/27200, receiver 27112) in a
temporary folder; with `--cluster`, the local cluster mode instead (brokers 27092/27094/27096,
OpenSearch nodes 27200/27201, docs/SCALING.md) and the cluster's own scenarios; with `--cluster --nodes 2`,
two of every pipeline process as separate hosts with landing and archive on S3Proxy (27090; bench/hosts.py).
The results go to --out (results.json, results.md); docs/RELIABILITY.md holds
the latest full run. `--short` is the form the test suite runs (200 instances, shorter outages).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diana.config import load_config
from tests.support import dosebuilder
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import dataset_body, read_messages, stored_sha256

REPO = Path(__file__).resolve().parent.parent

# Below 32768: a port in the ephemeral range can be taken by some client socket while the broker is
# down, and Kafka then failed to restart ("Address already in use"; seen with 39092).
PORTS = {
    "kafka": 27092,
    "controller": 27093,
    "opensearch": 27200,
    "transport": 27300,
    "diana": 27112,
    "aggregates": 27066,
    "dose": 27067,
    "s3": 27090,
}
PIPELINE = {
    "receiver": ("receive",),
    "aggregates": ("aggregate",),
    "dose": ("dose",),
    "archive-sink": ("sink", "archive"),
    "opensearch-sink": ("sink", "opensearch"),
}
# worker-kill last: if a restarted worker ever stays stalled, the later scenarios' aggregates
# would fail for that reason instead of their own.
SCENARIOS = (
    "receiver-kill",
    "sinks-kill",
    "broker-down",
    "opensearch-down",
    "disk-full",
    "slow-consumer",
    "worker-kill",
)
# On the cluster (--cluster): one broker of three killed with SIGKILL mid-send and started again,
# one OpenSearch node of two stopped and started again.
CLUSTER_SCENARIOS = ("broker-kill-1-of-3", "opensearch-node-down")
# With two of every pipeline process as separate hosts (--cluster --nodes 2, bench/hosts.py), also:
# one receiver host killed with SIGKILL mid-send and its whole folder deleted, and one of the two dose
# workers killed with SIGKILL mid-send (its partitions move to the other one, and back on its restart).
NODES_SCENARIOS = (*CLUSTER_SCENARIOS, "receiver-host-folder-deleted", "dose-worker-kill")
# Each study of the corpus carries one CT dose report (tests/support/dosebuilder.py) with two
# irradiation events, one over the test rules' CTDIvol level (15 mGy) and the study over their DLP
# level (700 mGy.cm): two events and two alerts per study (tests/support/data/dose-rules.yaml).
DOSE_RULES = REPO / "tests" / "support" / "data" / "dose-rules.yaml"
DOSE_EVENTS_PER_STUDY = 2
DOSE_ALERTS_PER_STUDY = 2
# After the fault, the invariants are checked this often until they all hold (2 s before: up to 2 s
# of each scenario's time to recover was the wait for the next check).
CHECK_EVERY_S = 0.5


@dataclass
class Outcome:
    scenario: str
    sent: int = 0
    acknowledged: int = 0
    failed_attempts: int = 0
    archived: int = 0
    indexed: int = 0
    duplicates: int = 0
    lost: int = 0
    series_exact: str = ""
    studies_exact: str = ""
    # Studies whose dose record, events and alerts are each indexed exactly once, of those whose
    # report was acknowledged; and copies of a dose record or alert sent again (all byte-identical).
    dose_exact: str = ""
    dose_resent: int = 0
    orphans: int = 0
    deadletters: int = 0
    unexplained_deadletters: int = 0
    recover_s: float = 0.0
    passed: bool = False
    problems: list[str] = field(default_factory=list)
    # When the invariants still fail at the deadline: every pipeline process's threads (py-spy dump),
    # so a stalled consumer shows where it waits, on a CI machine as here.
    stacks: dict[str, str] = field(default_factory=dict)
    # What the fault found and did (e.g. what a lost receiver host had acknowledged and held).
    notes: list[str] = field(default_factory=list)
    # Where the scenario's time went, in seconds: making the corpus, sending until the fault, the
    # fault itself, sending the rest after it, and checking until every invariant held.
    timings: dict[str, float] = field(default_factory=dict)


class Suite:
    def __init__(
        self,
        work: Path,
        short: bool,
        instances: int,
        associations: int,
        cluster: bool = False,
        s3: bool = False,
        receiver_processes: int = 1,
    ):
        self.work, self.short, self.instances, self.associations = work, short, instances, associations
        self.cluster, self.s3 = cluster, s3
        # [receiver] processes: receiver-kill then kills the parent of N workers sharing the port.
        self.receiver_processes = receiver_processes
        self.config_file = work / "diana-faults.toml"
        self.landing = work / "landing"
        self.mounted = False
        self.dose_reports: dict[Path, str] = {}  # a dose report of the corpus -> its study
        self.runs: dict[str, int] = {}  # scenario -> how many times its corpus was made
        self.lags: dict[str, int] = {}  # "group topic" -> lag, where not zero (the last check)
        self.archived_ok: set[Path] = set()  # acknowledged instances already found byte-identical
        self.left_before: set[str] = set()  # landing objects there when the scenario began
        self.config_file.write_text(self.config_text(work, PORTS["diana"], PORTS["aggregates"]) + self.stack_text())
        self.cfg = load_config(self.config_file, environ=self.s3_keys())
        from diana.compose.local.stack import local_stack

        self.stack = local_stack(self.cfg)
        self.procs: dict[str, subprocess.Popen] = {}
        # Successes per receiver port, and what a fault noted (both reset per scenario).
        self.acked_on: Counter[int] = Counter()
        self.notes: list[str] = []
        self._count_lock = threading.Lock()
        (work / "logs").mkdir(exist_ok=True)

    def config_text(
        self, root: Path, receiver_port: int, web_port: int, worker_id: str = "", dose_port: int = 0
    ) -> str:
        """A pipeline process's configuration, its folders under ``root`` (a "host" of its own with --nodes).

        The dose alert rules are copied into ``root`` as a deployment would: no file is shared."""
        root.mkdir(parents=True, exist_ok=True)
        rules = root / "dose-rules.yaml"
        shutil.copyfile(DOSE_RULES, rules)
        brokers = ",".join(f"127.0.0.1:{PORTS['kafka'] + 2 * i}" for i in range(3 if self.cluster else 1))
        nodes = ",".join(f"http://127.0.0.1:{PORTS['opensearch'] + i}" for i in range(2 if self.cluster else 1))
        # The S3 credentials come from the environment (s3_keys), never from a file two hosts share.
        s3 = (
            f'backend = "s3"\ns3_endpoint = "http://127.0.0.1:{PORTS["s3"]}"\ns3_bucket = "diana-faults"\n'
            if self.s3
            else ""
        )
        return f"""
[kafka]
bootstrap = "{brokers}"
publish_timeout_s = 5
[opensearch]
url = "{nodes}"
number_of_replicas = {1 if self.cluster else 0}
[receiver]
ae_title = "DIANA"
host = "127.0.0.1"
port = {receiver_port}
metrics_port = 0
processes = {self.receiver_processes}
[sinks]
archive_metrics_port = 0
opensearch_metrics_port = 0
[storage]
{s3}landing_dir = "{root}/landing"
archive_dir = "{root}/archive"
quarantine_dir = "{root}/quarantine"
[stream]
web_port = {web_port}
data_dir = "{root}/faust"
quiet_seconds = "*=3"
worker_id = "{worker_id}"
[dose]
web_port = {dose_port or PORTS["dose"]}
alert_rules = "{rules}"
[log]
level = "warning"
"""

    def stack_text(self) -> str:
        return f"""[stack]
home = "{self.work}/stack"
kafka_port = {PORTS["kafka"]}
kafka_controller_port = {PORTS["controller"]}
opensearch_port = {PORTS["opensearch"]}
opensearch_transport_port = {PORTS["transport"]}
opensearch_heap_mb = 768
s3proxy_port = {PORTS["s3"]}
s3proxy_heap_mb = 128
cluster = {"true" if self.cluster else "false"}
"""

    def s3_keys(self) -> dict[str, str]:
        """The S3 identity, for S3Proxy and every process, through the environment (made up, local only)."""
        if not self.s3:
            return {}
        return {"DIANA_STORAGE_S3_ACCESS_KEY_ID": "faults", "DIANA_STORAGE_S3_SECRET_ACCESS_KEY": "faults-local-only"}

    def receiver_ports(self) -> list[int]:
        """Where the senders connect: one receiver here; one per receiver host with --nodes."""
        return [PORTS["diana"]]

    # ------------------------------------------------------------------ processes
    def start(self) -> None:
        self.landing.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the disk-full scenario shrinks this filesystem
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(self.landing)], check=True)
            self.mounted = True
        self.stack.reset()
        # The pipeline starts while OpenSearch boots (the stack's slowest part): only the OpenSearch
        # sink needs it, and it starts once OpenSearch answers. The cluster's stack starts whole.
        later = [] if self.cluster else ["opensearch-sink"]
        if self.cluster:
            self.stack.start()
        else:
            self.stack.install()
            self.stack.start_kafka()
            self.stack.start_opensearch()
            self.stack.wait_kafka()
        subprocess.run(self._cmd("topics"), env=self._env(), check=True, capture_output=True)
        for name in PIPELINE:
            if name not in later:
                self.start_process(name)
        if later:
            self.stack.wait_opensearch()
            for name in later:
                self.start_process(name)
        self.wait_echo()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
        env["DIANA_CONFIG"] = str(self.config_file)
        env.update(self.s3_keys())
        return env

    @staticmethod
    def _cmd(*args: str) -> list[str]:
        return [sys.executable, "-m", "diana.cli", *args]

    def start_process(self, name: str) -> None:
        log = open(self.work / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            self._cmd(*PIPELINE[name]),
            env=self._env(),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        self.stack.stop()
        shutil.rmtree(self.stack._opensearch_dir(), ignore_errors=True)  # outside work/ when we are root
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.landing)], check=False)

    def exited(self) -> list[str]:
        """A pipeline process that ended on its own: nothing restarts it here, so say which and why
        (the last lines of its log), instead of a lag that only grows."""
        found = []
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                lines = (self.work / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
                found.append(f"{name} exited with {proc.returncode}: " + " | ".join(lines[-8:]))
        return found

    def stacks(self) -> dict[str, str]:
        """Each live pipeline process's Python threads, as py-spy sees them (no local variables)."""
        spy = Path(sys.executable).with_name("py-spy")
        found = {}
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            try:
                done = subprocess.run(
                    [str(spy), "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=30
                )
                found[name] = done.stdout or done.stderr
            except (OSError, subprocess.TimeoutExpired) as exc:
                found[name] = f"py-spy dump failed: {exc}"
        return found

    def wait_echo(self, timeout: float = 60) -> None:
        from pynetdicom import AE

        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        deadline = time.monotonic() + timeout
        for port in self.receiver_ports():
            while time.monotonic() < deadline:
                assoc = ae.associate("127.0.0.1", port, ae_title="DIANA")
                if assoc.is_established:
                    assoc.release()
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"the receiver on port {port} does not answer C-ECHO")

    # ------------------------------------------------------------------ sending
    def corpus(self, scenario: str) -> list[Path]:
        """CT studies of 50 instances: 49 images in two series and one CT dose report (a third series)."""
        files: list[Path] = []
        per_study = 50
        # A scenario named again (--scenarios worker-kill,worker-kill: hunting a rare failure) gets
        # patients of its own: the same patients' cumulative dose would change what is expected.
        self.runs[scenario] = run = self.runs.get(scenario, 0) + 1
        again = "" if run == 1 else f"-{run}"
        for index in range((self.instances + per_study - 1) // per_study):
            count = min(per_study, self.instances - index * per_study)
            images = count - 1 if count > 1 else count
            series = [SeriesSpec("CT", "AXIAL", (images + 1) // 2), SeriesSpec("CT", "CORONAL", images // 2)]
            folder = self.work / "corpus" / f"{scenario}{again}" / f"s{index:03d}"
            patient_id = f"FAULT-{scenario[:6]}{again}-{index}"
            study = make_study(folder, [s for s in series if s.count], patient_id=patient_id)
            files += study.files
            if images < count:
                report = dose_report_for(study.study_uid, patient_id, folder / "rdsr.dcm")
                self.dose_reports[report] = study.study_uid
                files.append(report)
        return files

    def send(self, files: list[Path], acked: set, attempts: list[int], deadline: float, abort: threading.Event) -> None:
        """Several associations; each re-sends what did not get success until everything did.

        With several receivers, association i starts on receiver i (round robin, as DNS or a TCP load
        balancer spreads connections) and moves to the next one whenever it cannot associate or its
        association breaks (as a sender retrying through the balancer reaches a live host)."""
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        from tests.support.dosebuilder import XRAY_RDSR

        ports = self.receiver_ports()

        def worker(index: int, part: list[Path]) -> None:
            ae = AE(ae_title="FAULTSCU")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            ae.add_requested_context(XRAY_RDSR, "1.2.840.10008.1.2.1")
            pending = list(part)
            turn = index
            while pending and time.monotonic() < deadline and not abort.is_set():
                assoc = ae.associate("127.0.0.1", ports[turn % len(ports)], ae_title="DIANA")
                if not assoc.is_established:
                    turn += 1
                    time.sleep(1.0 / len(ports))
                    continue
                for path in list(pending):
                    try:
                        status = assoc.send_c_store(path)
                    except Exception:  # the association broke under us
                        status = None
                    attempts[0] += 1
                    if status is not None and getattr(status, "Status", None) == 0x0000:
                        pending.remove(path)
                        acked.add(path)
                        with self._count_lock:
                            self.acked_on[ports[turn % len(ports)]] += 1
                    if not assoc.is_established:
                        turn += 1
                        break
                if assoc.is_established:
                    assoc.release()
                if pending:
                    time.sleep(1.0)

        parts = [files[i :: self.associations] for i in range(self.associations)]
        threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # ------------------------------------------------------------------ checking
    def _lag(self) -> int:
        from diana.schemas.topics import (
            DOSE_ALERTS,
            DOSE_BY_PATIENT,
            DOSE_EVENTS,
            DOSE_STUDIES,
            INSTANCES,
            SERIES,
            STUDIES,
        )

        groups = {
            self.cfg.stream.app_id: [INSTANCES.name],
            self.cfg.dose.app_id: [INSTANCES.name, DOSE_BY_PATIENT.name],
            self.cfg.sinks.archive_group: [INSTANCES.name],
            self.cfg.sinks.opensearch_group: [
                INSTANCES.name,
                SERIES.name,
                STUDIES.name,
                DOSE_EVENTS.name,
                DOSE_STUDIES.name,
                DOSE_ALERTS.name,
            ],
        }
        from diana.operations import status

        # One snapshot of the end offsets and one query per group (one client per topic and group
        # before: 27 clients per check); per group and topic, so a failing scenario says which is behind.
        marks = status.watermarks(self.cfg, sorted({t for topics in groups.values() for t in topics}))
        self.lags = {}
        for group, topics in groups.items():
            behind = status.group_lag(
                self.cfg, group, {t: marks[t] for t in topics if t in marks}, count_uncommitted=True
            )
            self.lags.update({f"{group} {topic}": lag for topic, lag in behind.items() if lag})
        return sum(self.lags.values())

    def _deadletter_end(self) -> dict[int, int]:
        from diana.schemas.topics import DEADLETTER

        return self._topic_end(DEADLETTER.name)

    def _topic_end(self, topic: str) -> dict[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.cfg.kafka.bootstrap, "group.id": "faults-dl", "log_level": 0})
        try:
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(self.cfg.kafka.partitions)
            }
        finally:
            consumer.close()

    def group_shares(self, group: str) -> str:
        """Who holds which partitions of dicom.instances in ``group`` now, e.g. "2 members: 2+1 partitions"
        (a note: with two dose workers, whether both work; Faust's members also hold changelog partitions)."""
        from diana.clients import kafka_admin
        from diana.schemas.topics import INSTANCES

        admin = kafka_admin(self.cfg.kafka)  # held until the answer: a collected client never answers
        try:
            found = admin.describe_consumer_groups([group])[group].result(timeout=10)
            shares = sorted(
                (sum(1 for tp in m.assignment.topic_partitions if tp.topic == INSTANCES.name) for m in found.members),
                reverse=True,
            )
        except Exception as exc:  # a broker away: the note says so
            return f"not described ({type(exc).__name__})"
        return f"{len(shares)} members, {'+'.join(map(str, shares)) or '0'} partitions of {INSTANCES.name}"

    def dose_topic_ends(self) -> dict[str, dict[int, int]]:
        """Where dose.studies and dose.alerts end before a scenario: its copies are read from there."""
        from diana.schemas.topics import DOSE_ALERTS, DOSE_STUDIES

        return {topic: self._topic_end(topic) for topic in (DOSE_STUDIES.name, DOSE_ALERTS.name)}

    def dose_copies(self, since: dict[str, dict[int, int]], studies: set[str]) -> tuple[int, list[str]]:
        """Copies of the scenario's dose records and alerts sent more than once, and the problems: a copy
        that differs from the first one sent (the same study revision or alert id with other bytes)."""
        from diana.schemas.codec import default_codec
        from diana.schemas.topics import DOSE_ALERTS, DOSE_STUDIES

        codec = default_codec()
        resent, problems = 0, []
        for topic, identity in (
            (DOSE_STUDIES.name, ("study_instance_uid", "revision")),
            (DOSE_ALERTS.name, ("alert_id", "superseded_by")),  # a withdrawal is a message of its own
        ):
            first: dict[tuple, bytes] = {}
            for msg in read_messages(self.cfg, topic, since[topic], timeout=60):
                _, record = codec.decode(msg.value())
                if record.get("study_instance_uid") not in studies:
                    continue
                key = tuple(record.get(name) for name in identity)
                if key not in first:
                    first[key] = msg.value()
                else:
                    resent += 1
                    if msg.value() != first[key]:
                        problems.append(f"{topic}: {key} sent again with other content")
        return resent, problems

    def _new_deadletters(self, since: dict[int, int]) -> list[dict]:
        from diana.schemas.topics import DEADLETTER

        return [
            {k: (v or b"").decode(errors="replace") for k, v in (msg.headers() or [])}
            for msg in read_messages(self.cfg, DEADLETTER.name, since, timeout=30)
        ]

    @staticmethod
    def describe(files: list[Path]) -> dict[Path, tuple[str, str, str, str]]:
        """path -> (study, series, SOP instance UID, SHA-256 of the file the archive must hold)."""
        import pydicom

        out = {}
        for path in files:
            ds = pydicom.dcmread(path)
            out[path] = (
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                stored_sha256(ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, dataset_body(path)),
            )
        return out

    def check(
        self, corpus: dict[Path, tuple[str, str, str, str]], acked: set, outcome: Outcome, quick: bool = False
    ) -> list[str]:
        """The invariants that do not hold yet (empty: all hold); fills ``outcome``.

        ``quick``: stop at a consumer lag (the rest cannot all hold yet) instead of reading back the
        archive and the index too; the last check of a scenario is never quick, so its outcome is whole."""
        from diana.clients import opensearch_client

        problems = self.exited()
        try:
            lag = self._lag()
        except Exception as exc:  # the broker is still coming back
            return [f"broker: {exc}"]
        if lag:
            problems.append(f"consumer lag {lag} ({', '.join(f'{k}: {v}' for k, v in self.lags.items())})")
            if quick:
                return problems
        archived = lost = 0
        by_series: dict[str, int] = {}
        by_study: dict[str, int] = {}
        for path, (study, series, sop, sha) in corpus.items():
            by_series[series] = by_series.get(series, 0) + 1
            by_study[study] = by_study.get(study, 0) + 1
            if path in acked:
                # An instance found byte-identical once is not read back again (KEEP_FIRST: the
                # archived copy is never replaced), so a check costs the instances still missing.
                if path in self.archived_ok or self.archived_sha256(study, series, sop) == sha:
                    self.archived_ok.add(path)
                    archived += 1
                else:
                    lost += 1
        outcome.archived, outcome.lost = archived, lost
        if lost:
            problems.append(f"{lost} acknowledged instances not in the archive byte-identical")
        client = opensearch_client(self.cfg.opensearch, timeout=30)
        try:
            client.indices.refresh(index="diana-*")
            studies = sorted(by_study)
            hits = client.search(
                index="diana-instances",
                body={
                    "size": 10000,
                    "_source": ["sop_instance_uid"],
                    "query": {"terms": {"study_instance_uid": studies}},
                },
            )
            sops = [h["_source"]["sop_instance_uid"] for h in hits["hits"]["hits"]]
            outcome.indexed, outcome.duplicates = len(set(sops)), len(sops) - len(set(sops))
            acked_sops = {corpus[p][2] for p in acked}
            missing = acked_sops - set(sops)
            if missing or outcome.duplicates:
                problems.append(f"{len(missing)} acknowledged instances not indexed, {outcome.duplicates} duplicates")
            series_docs = client.search(
                index="diana-series", body={"size": 10000, "query": {"terms": {"study_instance_uid": studies}}}
            )["hits"]["hits"]
            study_docs = client.search(
                index="diana-studies", body={"size": 10000, "query": {"terms": {"study_instance_uid": studies}}}
            )["hits"]["hits"]
            dose_studies = sorted({self.dose_reports[p] for p in acked if p in self.dose_reports})
            problems += self.check_dose(client, dose_studies, outcome)
        except Exception as exc:  # OpenSearch still coming back
            return [*problems, f"OpenSearch: {type(exc).__name__}"]
        series_ok = sum(1 for h in series_docs if h["_source"]["instance_count"] == by_series.get(h["_id"]))
        studies_ok = sum(1 for h in study_docs if h["_source"]["instance_count"] == by_study.get(h["_id"]))
        outcome.series_exact = f"{series_ok}/{len(by_series)}"
        outcome.studies_exact = f"{studies_ok}/{len(by_study)}"
        if series_ok != len(by_series) or studies_ok != len(by_study):
            problems.append(f"aggregates exact: series {outcome.series_exact}, studies {outcome.studies_exact}")
        # Objects an earlier scenario left are its failure, reported there, not this one's.
        orphans = [o for o in self.leftovers() if o not in self.left_before]
        outcome.orphans = len(orphans)
        if orphans:
            shown = ", ".join(o.rsplit("/", 1)[-1][:16] for o in orphans[:5])
            problems.append(f"{len(orphans)} objects left in the landing store ({shown})")
        return problems

    def check_dose(self, client: Any, studies: list[str], outcome: Outcome) -> list[str]:
        """Each study whose dose report was acknowledged: one dose study record of one report and two
        events, two dose event documents and two alert documents, none more."""
        if not studies:
            outcome.dose_exact = "0/0"
            return []
        found: dict[str, dict[str, list[dict]]] = {s: {"studies": [], "events": [], "alerts": []} for s in studies}
        for kind in ("studies", "events", "alerts"):
            index = f"diana-dose-{kind}"
            if not client.indices.exists_alias(name=index):
                continue
            hits = client.search(
                index=index, body={"size": 10000, "query": {"terms": {"study_instance_uid": studies}}}
            )["hits"]["hits"]
            for hit in hits:
                found[hit["_source"]["study_instance_uid"]][kind].append(hit)
        exact = 0
        for docs in found.values():
            records = docs["studies"]
            if (
                len(records) == 1
                and records[0]["_source"].get("report_count") == 1
                and records[0]["_source"].get("events") == DOSE_EVENTS_PER_STUDY
                and len(docs["events"]) == DOSE_EVENTS_PER_STUDY
                and len({h["_id"] for h in docs["alerts"]}) == len(docs["alerts"]) == DOSE_ALERTS_PER_STUDY
            ):
                exact += 1
        outcome.dose_exact = f"{exact}/{len(studies)}"
        return [] if exact == len(studies) else [f"dose exact: {outcome.dose_exact} studies"]

    def archived_sha256(self, study: str, series: str, sop: str) -> str | None:
        """The SHA-256 of the archived copy, read back whole through the archive store; None: not there."""
        from diana.schemas.layout import archive_path
        from diana.storage import ObjectNotFound, open_store

        try:
            return open_store(self.cfg, "archive").sha256(archive_path(study, series, sop))
        except ObjectNotFound:
            return None

    def leftovers(self) -> list[str]:
        """What is left in the landing store (the landing folder, or landing/ in the bucket) and in local folders."""
        from diana.storage import open_store

        found = [str(p) for p in self.landing.rglob("*") if p.is_file()]
        if self.s3:
            found += [f"landing/{key}" for key in open_store(self.cfg, "landing").list()]
        return found


def dose_report_for(study_uid: str, patient_id: str, path: Path) -> Path:
    """A CT dose report of two events for the study: one event over the CTDIvol level, the study over
    the DLP level of the rules, so two alerts (DOSE_ALERTS_PER_STUDY); 810 mGy.cm stays under the
    rules' cumulative threshold (1,500), one study per patient."""
    from pydicom.uid import generate_uid

    b = dosebuilder
    events = [
        b.ct_event(generate_uid(), ctdivol="0.3", dlp="10", kind=b.CONSTANT_ANGLE),
        b.ct_event(generate_uid(), ctdivol="18.5", dlp="800"),
    ]
    return b.save(b.ct_report(events, total_dlp="810", study_uid=study_uid, patient_id=patient_id), path)


def _throttle(proc: subprocess.Popen, seconds: float) -> None:
    """Run the process 5 % of the time: a consumer far slower than ingest."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.475)
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.025)


def faults(suite: Suite) -> dict[str, Callable[[], None]]:
    s = suite
    broker_s, opensearch_s, slow_s = (10, 20, 15) if s.short else (30, 60, 60)

    def restart(*names: str, pause: float = 2.0) -> None:
        for name in names:
            s.kill(name)
        time.sleep(pause)
        for name in names:
            s.start_process(name)

    def broker() -> None:
        s.stack.stop_kafka()
        time.sleep(broker_s)
        s.stack.start_kafka()
        s.stack.wait_kafka()

    def opensearch() -> None:
        s.stack.stop_opensearch()
        time.sleep(opensearch_s)
        s.stack.start_opensearch()
        s.stack.wait_opensearch()

    def disk_full() -> None:
        used = shutil.disk_usage(s.landing).used
        subprocess.run(["mount", "-o", f"remount,size={used + 64 * 1024}", str(s.landing)], check=True)
        time.sleep(10)
        subprocess.run(["mount", "-o", "remount,size=1g", str(s.landing)], check=True)

    def broker_kill_1_of_3() -> None:
        from diana.compose.local.cluster import ClusterStack

        assert isinstance(s.stack, ClusterStack)
        s.stack.kill_broker(2)
        time.sleep(broker_s)
        s.stack.start_brokers([2])
        s.stack.wait_kafka()

    def opensearch_node_down() -> None:
        from diana.compose.local.cluster import ClusterStack

        assert isinstance(s.stack, ClusterStack)
        s.stack.stop_search_node(2)
        time.sleep(opensearch_s)
        s.stack.start_search_nodes([2])
        s.stack.wait_opensearch()

    def dose_worker_kill() -> None:
        assert "dose-2" in s.procs, "needs --nodes 2"
        s.kill("dose-1")
        s.notes.append("dose-1 killed (SIGKILL); dose-2 kept running")
        time.sleep(broker_s)
        s.start_process("dose-1")

    def receiver_host_folder_deleted() -> None:
        lose = getattr(s, "lose_receiver_host", None)
        assert lose is not None, "needs --nodes"
        lose("receiver-1", down_s=broker_s)

    return {
        "receiver-host-folder-deleted": receiver_host_folder_deleted,
        "dose-worker-kill": dose_worker_kill,
        "broker-kill-1-of-3": broker_kill_1_of_3,
        "opensearch-node-down": opensearch_node_down,
        "receiver-kill": lambda: (restart("receiver"), s.wait_echo()),
        "worker-kill": lambda: restart("aggregates", "dose"),
        "sinks-kill": lambda: restart("archive-sink", "opensearch-sink"),
        "broker-down": broker,
        "opensearch-down": opensearch,
        "disk-full": disk_full,
        "slow-consumer": lambda: _throttle(s.procs["opensearch-sink"], slow_s),
    }


def run_scenario(suite: Suite, name: str, inject: Callable[[], None], timeout: float) -> Outcome:
    outcome = Outcome(name)
    if name == "disk-full" and not suite.mounted:
        outcome.problems.append("not run: needs root to mount a small filesystem")
        return outcome
    began = time.monotonic()
    files = suite.corpus(name)
    corpus = suite.describe(files)
    fault_start = [0.0]
    outcome.sent = len(files)
    dl_start = suite._deadletter_end()
    dose_start = suite.dose_topic_ends()
    suite.acked_on.clear()
    suite.archived_ok.clear()
    suite.notes = []
    suite.left_before = set(suite.leftovers())
    if suite.left_before:
        suite.notes.append(f"{len(suite.left_before)} objects in the landing store before the scenario (not counted)")
    acked: set = set()
    attempts = [0]
    abort = threading.Event()
    fault_end = [0.0]
    fault_error: list[str] = []

    def fault() -> None:
        while len(acked) < 0.3 * len(files) and time.monotonic() < deadline:
            time.sleep(0.05)
        suite.notes.append(f"dose group at the fault: {suite.group_shares(suite.cfg.dose.app_id)}")
        fault_start[0] = time.monotonic()
        try:
            inject()
        except Exception as exc:  # the fault could not be injected or undone: no point sending on
            fault_error.append(f"fault injection failed: {type(exc).__name__}: {exc}")
            abort.set()
        finally:
            fault_end[0] = time.monotonic()

    deadline = time.monotonic() + timeout
    sending = time.monotonic()
    injector = threading.Thread(target=fault)
    injector.start()
    suite.send(files, acked, attempts, deadline, abort)
    sent = time.monotonic()
    injector.join()
    if fault_error:
        outcome.problems = fault_error
        return outcome
    outcome.acknowledged = len(acked)
    outcome.failed_attempts = attempts[0] - len(acked)
    while True:
        final = time.monotonic() > deadline
        problems = suite.check(corpus, acked, outcome, quick=not final)
        if not problems or final:
            break
        time.sleep(CHECK_EVERY_S)
    held = time.monotonic()
    outcome.recover_s = round(held - fault_end[0], 1)
    outcome.timings = {
        "corpus": round(sending - began, 1),
        "to_fault": round(fault_start[0] - sending, 1),
        "fault": round(fault_end[0] - fault_start[0], 1),
        "send_after_fault": round(max(0.0, sent - fault_end[0]), 1),
        "check_until_held": round(held - max(sent, fault_end[0]), 1),
    }
    suite.notes.append(f"dose group at the end: {suite.group_shares(suite.cfg.dose.app_id)}")
    try:
        outcome.dose_resent, differ = suite.dose_copies(
            dose_start, {corpus[p][0] for p in suite.dose_reports if p in corpus}
        )
        problems += differ
    except Exception as exc:  # a broker still away at the deadline
        problems.append(f"dose topics not read: {type(exc).__name__}: {exc}")
    letters = suite._new_deadletters(dl_start)
    outcome.deadletters = len(letters)
    outcome.unexplained_deadletters = sum(1 for d in letters if not d.get("reason") or not d.get("origin"))
    # Dead letters with a reason pass, but when another invariant fails their reasons say why.
    reasons = Counter(f"{d.get('sink', '?')}: {d.get('reason', '')[:300]}" for d in letters)
    suite.notes += [f"dead letter x{count}: {reason}" for reason, count in reasons.most_common(5)]
    if outcome.unexplained_deadletters:
        problems.append(f"{outcome.unexplained_deadletters} dead letters without reason or origin")
    if len(acked) < len(files):
        problems.append(f"only {len(acked)} of {len(files)} acknowledged before the deadline")
    outcome.problems = problems
    outcome.notes = [*suite.notes, "acknowledged per receiver port: " + str(dict(sorted(suite.acked_on.items())))]
    outcome.passed = not problems
    if problems:
        outcome.stacks = suite.stacks()
    return outcome


def render(outcomes: list[Outcome], args: argparse.Namespace, start_s: float | None = None) -> str:
    head = (
        "| scenario | sent | acknowledged | failed attempts (retried) | archived | indexed | duplicates | lost "
        "| series exact | studies exact | dose exact | dose copies re-sent | orphans | dead letters "
        "| time to recover (s) | invariants |"
    )
    rows = [head, "|" + "---|" * 16]
    for o in outcomes:
        verdict = "hold" if o.passed else "FAIL: " + "; ".join(o.problems)
        rows.append(
            f"| {o.scenario} | {o.sent} | {o.acknowledged} | {o.failed_attempts} | {o.archived} | {o.indexed} "
            f"| {o.duplicates} | {o.lost} | {o.series_exact} | {o.studies_exact} | {o.dose_exact} | {o.dose_resent} "
            f"| {o.orphans} "
            f"| {o.deadletters} | {o.recover_s} | {verdict} |"
        )
    notes = [f"- {o.scenario}: {note}" for o in outcomes for note in o.notes]
    phases = ("corpus", "to_fault", "fault", "send_after_fault", "check_until_held")
    timing_rows = [
        "| scenario | " + " | ".join(phases) + " | total (s) |",
        "|" + "---|" * (len(phases) + 2),
        *(
            f"| {o.scenario} | "
            + " | ".join(str(o.timings.get(p, "")) for p in phases)
            + f" | {round(sum(o.timings.get(p, 0.0) for p in phases), 1)} |"
            for o in outcomes
            if o.timings
        ),
    ]
    timings = (
        "\nWhere the time went (s): starting the stack and the pipeline "
        f"{'' if start_s is None else round(start_s, 1)}; per scenario:\n\n" + "\n".join(timing_rows) + "\n"
    )
    return (
        f"Run: `python -m bench.faults --instances {args.instances} --associations {args.associations}"
        f"{' --short' if args.short else ''}{' --cluster' if args.cluster else ''}"
        f"{f' --nodes {args.nodes}' if args.nodes > 1 else ''}{f' --port-shift {args.port_shift}' if args.port_shift else ''}"
        f"{f' --receiver-processes {args.receiver_processes}' if args.receiver_processes != 1 else ''}"
        f"` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(notes)
        + "\n"
        + timings
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2000, help="instances per scenario (default 2000)")
    parser.add_argument("--associations", type=int, default=4, help="parallel associations (default 4)")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all); with --cluster of: "
        f"{', '.join(CLUSTER_SCENARIOS)}; with --nodes 2 also receiver-host-folder-deleted",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="on the local cluster mode (3 brokers, 2 OpenSearch nodes), with the cluster's scenarios",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        choices=(1, 2),
        help="with --cluster: 2 runs two of every pipeline process as separate hosts (own folder and "
        "configuration each, landing and archive on S3Proxy; bench/hosts.py), with the scenario "
        "receiver-host-folder-deleted",
    )
    parser.add_argument("--short", action="store_true", help="shorter outages (the CI form)")
    parser.add_argument(
        "--receiver-processes",
        type=int,
        default=1,
        help="[receiver] processes (default 1): with 2, receiver-kill kills the parent of two workers sharing the port",
    )
    parser.add_argument(
        "--port-shift",
        type=int,
        default=0,
        help="add this to every port (Kafka 27092, OpenSearch 27200, receiver 27112...), e.g. when another "
        "run holds them; keep the result below 32768",
    )
    parser.add_argument("--out", default=str(REPO / "var" / "faults"), help="results.json and results.md here")
    parser.add_argument("--timeout", type=float, default=600, help="per scenario, seconds (default 600)")
    args = parser.parse_args(argv)
    for name in PORTS:
        PORTS[name] += args.port_shift
    if args.nodes > 1 and not args.cluster:
        parser.error("--nodes 2 runs on the local cluster: add --cluster")
    if args.nodes > 1 and args.receiver_processes != 1:
        parser.error("--receiver-processes applies to the single-host suite, not to --nodes 2")
    known = NODES_SCENARIOS if args.nodes > 1 else CLUSTER_SCENARIOS if args.cluster else SCENARIOS
    chosen = args.scenarios.split(",") if args.scenarios else list(known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        where = " with --nodes 2" if args.nodes > 1 else " with --cluster" if args.cluster else ""
        parser.error(f"unknown scenario {unknown[0]!r}; scenarios{where}: {', '.join(known)}")
    work = Path(tempfile.mkdtemp(prefix="diana-faults-"))
    if args.nodes > 1:
        from bench.hosts import NodesSuite

        suite: Suite = NodesSuite(work, args.short, args.instances, args.associations, nodes=args.nodes)
    else:
        suite = Suite(
            work,
            args.short,
            args.instances,
            args.associations,
            cluster=args.cluster,
            receiver_processes=args.receiver_processes,
        )
    outcomes = []
    start_s: float | None = None
    try:
        began = time.monotonic()
        suite.start()
        start_s = time.monotonic() - began
        print(f"stack and pipeline started in {start_s:.1f} s", flush=True)
        injectors = faults(suite)
        for name in chosen:
            outcome = run_scenario(suite, name, injectors[name], args.timeout)
            print(
                f"{name}: {'hold' if outcome.passed else 'FAIL ' + '; '.join(outcome.problems)} "
                f"(sent {outcome.sent}, acknowledged {outcome.acknowledged}, recovered in {outcome.recover_s} s)",
                flush=True,
            )
            outcomes.append(outcome)
    finally:
        suite.stop_all()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
        (out / "results.md").write_text(render(outcomes, args, start_s))
        if os.environ.get("DIANA_FAULTS_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    # Through the imported module: bench.hosts subclasses its Suite, and --port-shift must move the PORTS
    # that one reads (run as __main__, this file is a second copy with PORTS of its own).
    from bench import faults

    sys.exit(faults.main())
