"""A receiver "host" lost after it acknowledged: kill -9 mid-send, then its whole folder deleted.

Two receivers land on S3 (S3Proxy), each with its own folder (landing_dir, so its scratch
``.incoming/``) and its own port, the same AE title; the session's archive sink is swapped for one
on S3. Senders spread their associations over both and move to the other receiver when one fails,
as behind a load balancer. Once a third is acknowledged, receiver A is killed with SIGKILL and its
folder deleted. Every instance either receiver acknowledged must be archived byte-identical and
indexed once, nothing left in ``landing/``, every consumer caught up. The bench form, on the
cluster with two of every process: ``python -m bench.faults --cluster --nodes 2``.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest

from diana.clients import opensearch_client
from diana.config import Config, load_config
from diana.schemas.layout import archive_path
from diana.storage import ObjectNotFound, open_store
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import dataset_body, stored_sha256, wait_until_caught_up
from tests.support.paths import TEST_HOME, port
from tests.support.stack import wait_for_echo

HOSTS = TEST_HOME / "receiver-hosts"
S3 = {"DIANA_STORAGE_BACKEND": "s3"}


def _host(pipeline, name: str, number: int) -> tuple[Config, Path]:
    folder = HOSTS / name
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **S3,
        "DIANA_RECEIVER_PORT": str(port(number)),
        "DIANA_RECEIVER_METRICS_PORT": "0",
        "DIANA_STORAGE_LANDING_DIR": str(folder / "landing"),
    }
    pipeline.start(name, "receive", settings=env)
    cfg = load_config(pipeline.config_file, environ=env)
    wait_for_echo(cfg, timeout=60, procs={name: pipeline.procs[name]})
    return cfg, folder


@pytest.fixture
def two_receiver_hosts(pipeline, s3proxy: Config):
    shutil.rmtree(HOSTS, ignore_errors=True)
    pipeline.stop("receiver")
    pipeline.stop("archive-sink")
    pipeline.start("archive-sink-s3", "sink", "archive", settings=S3)
    started = ["archive-sink-s3"]
    try:
        hosts = {}
        for name, number in (("receiver-a", 11184), ("receiver-b", 11185)):
            started.append(name)
            hosts[name] = _host(pipeline, name, number)
        yield hosts
    finally:
        for name in started:
            if name in pipeline.procs:
                pipeline.stop(name)
        pipeline.start("receiver", "receive")
        pipeline.start("archive-sink", "sink", "archive")
        wait_for_echo(pipeline.cfg, timeout=60, procs=pipeline.procs)


def _send(ports: list[int], files: list[Path], acked: dict[Path, int], deadline: float, associations: int = 4) -> None:
    """Association i starts on receiver i % 2 and moves to the other on any failure; re-sends until success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    lock = threading.Lock()

    def worker(index: int, part: list[Path]) -> None:
        ae = AE(ae_title="HOSTLOSTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        pending, turn = list(part), index
        while pending and time.monotonic() < deadline:
            target = ports[turn % len(ports)]
            assoc = ae.associate("127.0.0.1", target, ae_title="DIANA")
            if not assoc.is_established:
                turn += 1
                time.sleep(0.5)
                continue
            for path in list(pending):
                try:
                    status = assoc.send_c_store(path)
                except Exception:  # the association broke under us
                    status = None
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    pending.remove(path)
                    with lock:
                        acked[path] = target
                if not assoc.is_established:
                    turn += 1
                    break
            if assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=worker, args=(i, files[i::associations])) for i in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_receiver_host_killed_and_its_folder_deleted_loses_nothing_it_acknowledged(
    pipeline, two_receiver_hosts, tmp_path
):
    (cfg_a, folder_a), (cfg_b, folder_b) = two_receiver_hosts["receiver-a"], two_receiver_hosts["receiver-b"]
    study = make_study(
        tmp_path, [SeriesSpec("CT", "AXIAL", 60), SeriesSpec("CT", "CORONAL", 60)], patient_id="HOSTLOST"
    )
    acked: dict[Path, int] = {}
    ports = [cfg_a.receiver.port, cfg_b.receiver.port]
    deadline = time.monotonic() + 150
    sender = threading.Thread(target=_send, args=(ports, study.files, acked, deadline))
    sender.start()
    while sum(1 for p in acked.values() if p == ports[0]) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    pipeline.procs["receiver-a"].kill()
    pipeline.procs.pop("receiver-a").wait()
    acked_by_a = sum(1 for p in acked.values() if p == ports[0])
    shutil.rmtree(folder_a)
    sender.join()

    by_b = sum(1 for p in acked.values() if p == ports[1])
    print(
        f"receiver-a acknowledged {acked_by_a} before its kill, receiver-b {by_b}; {len(acked)} of {len(study.files)}"
    )
    assert acked_by_a >= 20
    assert len(acked) == len(study.files), f"only {len(acked)} of {len(study.files)} acknowledged by the deadline"
    assert by_b > 0
    wait_until_caught_up(cfg_b, timeout=180)

    archive = open_store(cfg_b, "archive")
    sops = []
    for path in acked:
        ds = pydicom.dcmread(path)
        sops.append(ds.SOPInstanceUID)
        expected = stored_sha256(ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, dataset_body(path))
        key = archive_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        try:
            with archive.open(key) as stream:
                assert hashlib.sha256(stream.read()).hexdigest() == expected, key
        except ObjectNotFound:
            pytest.fail(f"acknowledged instance {key} (by port {acked[path]}) is not in the archive")

    client = opensearch_client(cfg_b.opensearch)
    client.indices.refresh(index="diana-instances")
    hits = client.search(
        index="diana-instances",
        body={
            "size": 1000,
            "_source": ["sop_instance_uid"],
            "query": {"term": {"study_instance_uid": study.study_uid}},
        },
    )["hits"]["hits"]
    indexed = [h["_source"]["sop_instance_uid"] for h in hits]
    assert sorted(indexed) == sorted(sops), "every acknowledged instance indexed exactly once"
    assert not list(open_store(cfg_b, "landing").list()), "nothing left in landing/"
    assert not [p for p in (folder_b / "landing").rglob("*") if p.is_file()]
    assert not folder_a.exists()
