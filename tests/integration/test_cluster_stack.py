"""The pipeline on the local cluster mode: three Kafka brokers (RF 3, min.insync 2) and two OpenSearch nodes.

The module starts its own cluster (`diana stack start --cluster`'s ClusterStack) on the test ports, and
the receiver, aggregates worker and both sinks against it, with every broker and both nodes in their
client settings. Faults are real: `kill -9` of a broker's JVM, a node stopped.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from diana.clients import kafka_admin, kafka_producer, opensearch_client
from diana.compose.local.cluster import ClusterStack
from diana.config import Config, load_config
from diana.schemas.layout import archive_path
from diana.schemas.topics import INSTANCES, SERIES, STUDIES, ensure_topics, topic_settings
from tests.integration.conftest import PIPELINE, TEST_CONFIG, Pipeline
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import dataset_body, group_lag, stored_sha256
from tests.support.paths import TEST_HOME, port

HOME = TEST_HOME / "cluster"
PROBE_TOPIC = "diana-test.cluster-probe"


# Earlier test files leave the session's stack and pipeline running on the test ports: every port
# of the cluster's configuration is moved by this much, clear of every port the tests use
# (its brokers on 19492/19494/19496 and nodes on 19600/19601 at offset 0).
CLUSTER_SHIFT = 400
SESSION_PORTS = (
    11190,
    11191,
    11192,
    11193,
    16066,
    16069,
    18104,
    19000,
    19092,
    19093,
    19200,
    19300,
    19464,
    19465,
    19466,
)


def cluster_config_text() -> str:
    """The session's test configuration, moved to its own folders and ports, with every node in the client settings."""
    text = TEST_CONFIG.replace(f"{TEST_HOME}/", f"{HOME}/")
    for number in SESSION_PORTS:
        text = re.sub(rf"\b{port(number)}\b", str(port(number) + CLUSTER_SHIFT), text)
    kafka, opensearch = port(19092) + CLUSTER_SHIFT, port(19200) + CLUSTER_SHIFT
    brokers = ",".join(f"127.0.0.1:{kafka + 2 * i}" for i in range(3))
    nodes = ",".join(f"http://127.0.0.1:{opensearch + i}" for i in range(2))
    text = text.replace(f'bootstrap = "127.0.0.1:{kafka}"', f'bootstrap = "{brokers}"')
    text = text.replace(f'url = "http://127.0.0.1:{opensearch}"', f'url = "{nodes}"\nnumber_of_replicas = 1')
    text = text.replace("[stack]\n", "[stack]\ncluster = true\n")
    assert brokers in text and nodes in text and "cluster = true" in text
    return text


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Config, Path, ClusterStack]]:
    HOME.mkdir(parents=True, exist_ok=True)
    config_file = HOME / "diana-cluster.toml"
    config_file.write_text(cluster_config_text())
    cfg = load_config(config_file, environ={})
    stack = ClusterStack(cfg)
    stack.reset()
    for sub in ("landing", "archive", "quarantine", "faust", "corpus", "logs"):
        shutil.rmtree(HOME / sub, ignore_errors=True)
    try:
        started = time.monotonic()
        stack.start()
        print(f"cluster started in {time.monotonic() - started:.1f} s")
        ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
        yield cfg, config_file, stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def cluster_pipeline(cluster):
    cfg, config_file, _ = cluster
    logs = HOME / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = {name: PIPELINE[name] for name in ("receiver", "aggregates", "archive-sink", "opensearch-sink")}
    with Pipeline(cfg, config_file, {}, logs).running(processes, echo_timeout=90) as p:
        yield p


def send_until_acknowledged(
    cfg: Config, files: list[Path], acked: set[Path], failures: list[int], deadline: float, associations: int = 2
) -> None:
    """As a modality does: each association re-sends what did not get success until all did (or the deadline)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    def worker(part: list[Path]) -> None:
        ae = AE(ae_title="CLUSTERSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        pending = list(part)
        while pending and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
            if not assoc.is_established:
                time.sleep(1.0)
                continue
            for path in list(pending):
                try:
                    status = assoc.send_c_store(path)
                except Exception:  # the association broke under us
                    status = None
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    pending.remove(path)
                    acked.add(path)
                else:
                    failures.append(getattr(status, "Status", -1) if status is not None else -1)
                if not assoc.is_established:
                    break
            if assoc.is_established:
                assoc.release()
            if pending:
                time.sleep(1.0)

    threads = [threading.Thread(target=worker, args=(files[i::associations],)) for i in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def pipeline_lag(cfg: Config) -> dict[str, int]:
    """Each pipeline group's messages not committed yet (only the groups that have some)."""
    groups = {
        cfg.stream.app_id: [INSTANCES.name],
        cfg.sinks.archive_group: [INSTANCES.name],
        cfg.sinks.opensearch_group: [INSTANCES.name, SERIES.name, STUDIES.name],
    }
    lags = {group: group_lag(cfg, group, topics) for group, topics in groups.items()}
    return {group: lag for group, lag in lags.items() if lag}


def delivery_problems(cfg: Config, corpus: dict[Path, tuple[str, str, str, str]], acked: set[Path]) -> list[str]:
    """What does not hold yet: lag 0; every acknowledged instance archived byte-identical and indexed once."""
    problems = []
    try:
        lag = pipeline_lag(cfg)
    except Exception as exc:  # a coordinator still moving
        return [f"lag: {exc}"]
    if lag:
        problems.append(f"consumer lag {lag}")  # per group
    archive = cfg.path(cfg.storage.archive_dir)
    lost = [
        p
        for p in acked
        if not (stored := archive / archive_path(*corpus[p][:3])).exists()
        or hashlib.sha256(stored.read_bytes()).hexdigest() != corpus[p][3]
    ]
    if lost:
        problems.append(f"{len(lost)} acknowledged instances not archived byte-identical")
    studies = sorted({v[0] for v in corpus.values()})
    try:
        client = opensearch_client(cfg.opensearch)
        client.indices.refresh(index="diana-instances")
        body = {"size": 10000, "_source": ["sop_instance_uid"], "query": {"terms": {"study_instance_uid": studies}}}
        hits = client.search(index="diana-instances", body=body)["hits"]["hits"]
    except Exception as exc:  # the index not there yet
        return [*problems, f"OpenSearch: {type(exc).__name__}: {exc}"]
    sops = [h["_source"]["sop_instance_uid"] for h in hits]
    missing = {corpus[p][2] for p in acked} - set(sops)
    if missing or len(sops) != len(set(sops)):
        problems.append(f"{len(missing)} acknowledged not indexed, {len(sops) - len(set(sops))} indexed twice")
    return problems


def aggregate_problems(cfg: Config, corpus: dict[Path, tuple[str, str, str, str]]) -> list[str]:
    """Every series and study aggregate counts exactly the instances sent (each once)."""
    by_series: dict[str, int] = {}
    by_study: dict[str, int] = {}
    for study, series, _, _ in corpus.values():
        by_series[series] = by_series.get(series, 0) + 1
        by_study[study] = by_study.get(study, 0) + 1
    client = opensearch_client(cfg.opensearch)
    client.indices.refresh(index="diana-series,diana-studies")
    query = {"size": 1000, "query": {"terms": {"study_instance_uid": sorted(by_study)}}}
    series_docs = client.search(index="diana-series", body=query)["hits"]["hits"]
    study_docs = client.search(index="diana-studies", body=query)["hits"]["hits"]
    wrong = [
        f"{kind} ...{h['_id'][-12:]}: {h['_source']['instance_count']} counted of {expected[h['_id']]} sent "
        f"(revision {h['_source'].get('revision')})"
        for kind, docs, expected in (("series", series_docs, by_series), ("study", study_docs, by_study))
        for h in docs
        if h["_source"]["instance_count"] != expected.get(h["_id"])
    ]
    if len(series_docs) != len(by_series) or len(study_docs) != len(by_study):
        wrong.append(
            f"{len(series_docs)}/{len(by_series)} series and {len(study_docs)}/{len(by_study)} studies indexed"
        )
    return wrong


def wait_for(check: Callable[[], list[str]], timeout: float) -> float:
    """Seconds until ``check`` finds nothing wrong; fails with what is still wrong after ``timeout``."""
    started = time.monotonic()
    problems: list[str] = ["not checked"]
    while time.monotonic() - started < timeout:
        problems = check()
        if not problems:
            return time.monotonic() - started
        time.sleep(2)
    raise AssertionError(f"after {timeout:.0f} s: {problems}")


def make_corpus(name: str, studies: int, per_series: int) -> dict[Path, tuple[str, str, str, str]]:
    """path -> (study, series, SOP Instance UID, SHA-256 of the file the archive must hold)."""
    files: list[Path] = []
    for i in range(studies):
        spec = [SeriesSpec("CT", "AXIAL", per_series), SeriesSpec("CT", "CORONAL", per_series)]
        files += make_study(HOME / "corpus" / name / f"s{i}", spec, patient_id=f"CLUSTER-{name}-{i}", rows=32).files
    out = {}
    for path in files:
        ds = pydicom.dcmread(path)
        sha = stored_sha256(ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, dataset_body(path))
        out[path] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, sha)
    return out


def test_topics_have_three_replicas_and_two_in_sync(cluster) -> None:
    from diana.stream_apps.state_topics import ensure_state_topics

    cfg, _, _ = cluster
    # A stream worker's changelog, made as the workers make theirs (the dose worker hands the factor on to Faust).
    changelog = "diana-cluster-test-state-changelog"
    assert ensure_state_topics(cfg, [changelog]) == 3
    admin = kafka_admin(cfg.kafka)
    names = (INSTANCES.name, SERIES.name, STUDIES.name, changelog)
    # A topic just created reaches every broker's metadata a moment later: the broker that answers may
    # not know the changelog yet (seen on a clean clone: KeyError right after its creation).
    deadline = time.monotonic() + 30
    metadata = admin.list_topics(timeout=10)
    while not all(name in metadata.topics for name in names) and time.monotonic() < deadline:
        time.sleep(0.5)
        metadata = admin.list_topics(timeout=10)
    assert len(metadata.brokers) == 3
    for name in names:
        partitions = metadata.topics[name].partitions
        assert len(partitions) == cfg.kafka.partitions
        assert all(len(p.replicas) == 3 for p in partitions.values()), name
        leaders = {p.leader for p in partitions.values()}
        assert len(leaders) == 3, f"{name}: every broker leads a partition ({leaders})"
        assert topic_config(admin, name, deadline)["min.insync.replicas"].value == "2"


def topic_config(admin, name: str, deadline: float) -> dict:
    """A topic's configuration, asked again while the broker that answers does not know the topic yet.

    describe_configs goes to any broker; one whose metadata lags the creation answers
    UNKNOWN_TOPIC_OR_PART (seen on a clean clone, after list_topics on another broker knew it)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import ConfigResource

    while True:
        (future,) = admin.describe_configs([ConfigResource("topic", name)]).values()
        try:
            return future.result()
        except KafkaException as error:
            if error.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def test_broker_killed_mid_send_loses_nothing_and_counts_nothing_twice(cluster, cluster_pipeline) -> None:
    cfg, _, stack = cluster
    corpus = make_corpus("broker-kill", studies=3, per_series=50)  # 300 instances
    files = sorted(corpus)
    acked: set[Path] = set()
    failures: list[int] = []
    started = time.monotonic()
    sender = threading.Thread(
        target=send_until_acknowledged, args=(cfg, files, acked, failures, time.monotonic() + 240)
    )
    sender.start()
    while len(acked) < len(files) * 0.3 and sender.is_alive():
        time.sleep(0.1)
    killed_at = len(acked)
    stack.kill_broker(2)  # kill -9 of the JVM, mid-send
    sender.join()
    send_s = time.monotonic() - started
    assert len(acked) == len(files), f"{len(files) - len(acked)} never acknowledged within 240 s"
    assert killed_at < len(files), "the broker died after the send had ended: no fault mid-send"
    try:
        settle_s = wait_for(lambda: delivery_problems(cfg, corpus, acked), timeout=180)
        print(
            f"broker-kill-1-of-3: {len(files)} sent, killed at {killed_at} acknowledged, {len(failures)} failed "
            f"attempts (retried), send {send_s:.1f} s, archived and indexed once, lag 0, {settle_s:.1f} s after the send"
        )
        for name, proc in cluster_pipeline.procs.items():
            assert proc.poll() is None, f"{name} exited; see {HOME}/logs/{name}.log"
        wait_for(lambda: aggregate_problems(cfg, corpus), timeout=30)
    finally:
        # The next test starts from a whole cluster again.
        stack.start_brokers([2])
        stack.wait_kafka()


def test_two_brokers_down_refuse_writes_and_nothing_acknowledged_is_lost(cluster, cluster_pipeline) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    cfg, _, stack = cluster
    from confluent_kafka.admin import NewTopic

    admin = kafka_admin(cfg.kafka)
    (future,) = admin.create_topics(
        [NewTopic(PROBE_TOPIC, 1, 3, config={"min.insync.replicas": "2"})], request_timeout=30
    ).values()
    future.result()
    corpus = make_corpus("two-down", studies=1, per_series=3)  # 6 instances
    files = sorted(corpus)
    acked: set[Path] = set()
    failures: list[int] = []
    send_until_acknowledged(cfg, files[:2], acked, failures, time.monotonic() + 60, associations=1)
    assert len(acked) == 2

    stack.kill_broker(2)
    stack.kill_broker(3)
    # A producer with acks=all cannot complete a write on one broker of three.
    producer = kafka_producer(cfg.kafka, {"acks": "all", "enable.idempotence": True, "message.timeout.ms": 10000})
    reports: list = []
    producer.produce(PROBE_TOPIC, b"probe", on_delivery=lambda err, msg: reports.append(err))
    producer.flush(30)
    assert len(reports) == 1 and reports[0] is not None, f"acks=all write succeeded with two brokers down: {reports}"
    # The receiver answers a failure status, not success, for what it could not make durable.
    ae = AE(ae_title="CLUSTERSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(path).Status) for path in files[2:4]]
    assoc.release()
    assert all(s != 0x0000 and (s & 0xF000) in (0xA000, 0xC000) for s in statuses), [hex(s) for s in statuses]
    print(f"two brokers down: producer error {reports[0]}; C-STORE statuses {[hex(s) for s in statuses]}")

    stack.start_brokers([2, 3])
    stack.wait_kafka()
    # The modality sends again what was refused, and the rest: everything acknowledged, counted once.
    send_until_acknowledged(cfg, files, acked, failures, time.monotonic() + 120, associations=1)
    assert len(acked) == len(files)
    wait_for(lambda: delivery_problems(cfg, corpus, acked), timeout=180)
    wait_for(lambda: aggregate_problems(cfg, corpus), timeout=30)


def test_one_opensearch_node_stopped_searches_still_answer(cluster, cluster_pipeline) -> None:
    cfg, _, stack = cluster
    corpus = make_corpus("node-down", studies=1, per_series=10)  # its own instances: runs alone too
    acked: set[Path] = set()
    send_until_acknowledged(cfg, sorted(corpus), acked, [], time.monotonic() + 120, associations=1)
    assert len(acked) == len(corpus)
    wait_for(lambda: delivery_problems(cfg, corpus, acked), timeout=120)
    client = opensearch_client(cfg.opensearch)
    client.indices.refresh(index="diana-instances")
    before = client.count(index="diana-instances")["count"]
    assert before >= len(corpus)
    settings = client.indices.get_settings(index="diana-instances")
    assert all(s["settings"]["index"]["number_of_replicas"] == "1" for s in settings.values())
    # (the query string in the path: opensearch-py takes a `timeout` parameter for its own)
    health = client.transport.perform_request(
        "GET", "/_cluster/health/diana-instances?wait_for_status=green&timeout=60s"
    )
    assert health["status"] == "green", health  # a copy of every shard on each node
    stack.stop_search_node(1)
    started = time.monotonic()
    # Through the configured client (both urls): node 1's refusals move it to node 2.
    client = opensearch_client(cfg.opensearch)
    for _ in range(5):
        assert client.count(index="diana-instances")["count"] == before
        hits = client.search(index="diana-series", body={"size": 100, "query": {"match_all": {}}})["hits"]["hits"]
        assert hits and all(h["_source"]["instance_count"] > 0 for h in hits)
    print(f"one OpenSearch node stopped: 10 searches answered in {time.monotonic() - started:.2f} s")
