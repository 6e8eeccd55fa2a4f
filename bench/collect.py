"""Collect benchmark: how many studies an hour `diana collect` pulls from a real PACS (Orthanc).

    python -m bench.collect [--studies 40] [--instances 10] [--concurrency 2] [--out var/bench-collect]

Starts its own Kafka, OpenSearch, the receiver, the aggregates worker and both sinks, and Orthanc
from Debian as the PACS, all on ports 25xxx, in a temporary folder removed afterwards; loads
``--studies`` studies of ``--instances`` CT images (64x64) into Orthanc through its REST API; then
times ``diana collect run`` over their accession numbers, from start until every study is verified
in the index (the job's own end). Prints studies/hour, instances/s, and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from bench.pipeline_steps import stop_processes, stop_stack
from tests.support.pacscorpus import load_into_orthanc, make_pacs_study

REPO = Path(__file__).resolve().parent.parent
PORTS = {
    "kafka": 25592,
    "controller": 25593,
    "opensearch": 25520,
    "transport": 25530,
    "receiver": 25512,
    "orthanc": 25504,
    "orthanc_http": 25505,
    "faust": 25566,
    "dose_web": 25569,
}


def diana_config(work: Path) -> Path:
    p = PORTS
    path = work / "diana-bench-collect.toml"
    path.write_text(f"""
[kafka]
bootstrap = "127.0.0.1:{p["kafka"]}"
[opensearch]
url = "http://127.0.0.1:{p["opensearch"]}"
[receiver]
ae_title = "DIANA"
host = "127.0.0.1"
port = {p["receiver"]}
metrics_port = 0
[sinks]
archive_metrics_port = 0
opensearch_metrics_port = 0
[storage]
landing_dir = "{work}/landing"
archive_dir = "{work}/archive"
quarantine_dir = "{work}/quarantine"
[stream]
web_port = {p["faust"]}
data_dir = "{work}/faust"
quiet_seconds = "CT=5,*=5"
[collect]
pacs_ae_title = "PACS"
pacs_host = "127.0.0.1"
pacs_port = {p["orthanc"]}
ae_title = "DIANA-COLLECT"
verify_timeout_s = 300
[stack]
home = "{work}/stack"
kafka_port = {p["kafka"]}
kafka_controller_port = {p["controller"]}
opensearch_port = {p["opensearch"]}
opensearch_transport_port = {p["transport"]}
[log]
level = "warning"
""")
    return path


def start_orthanc(work: Path) -> subprocess.Popen:
    binary = shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise SystemExit("Orthanc is needed: apt-get install orthanc")
    config = work / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench-pacs",
                "StorageDirectory": str(work / "orthanc"),
                "IndexDirectory": str(work / "orthanc"),
                "DicomAet": "PACS",
                "DicomPort": PORTS["orthanc"],
                "HttpPort": PORTS["orthanc_http"],
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomModalities": {
                    "DIANA": ["DIANA", "127.0.0.1", PORTS["receiver"]],
                    "COLLECT": ["DIANA-COLLECT", "127.0.0.1", 1],
                },
            }
        )
    )
    proc = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{PORTS['orthanc_http']}"
    for _ in range(200):
        try:
            if requests.get(url + "/system", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("Orthanc did not start")


def diana(config: Path, *args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(config)
    return subprocess.Popen([sys.executable, "-m", "diana.cli", *args], env=env, cwd=REPO, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.collect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--instances", type=int, default=10, help="CT images per study")
    ap.add_argument("--concurrency", type=int, default=2, help="[collect] concurrency")
    ap.add_argument("--out", default="var/bench-collect", help="folder for results.json")
    args = ap.parse_args(argv)

    from diana.clients import kafka_admin
    from diana.compose.local.stack import LocalStack
    from diana.config import load_config
    from diana.schemas.topics import ensure_topics, topic_settings

    work = Path(tempfile.mkdtemp(prefix="diana-bench-collect-"))
    config = diana_config(work)
    cfg = load_config(config, environ={})
    stack = LocalStack(cfg)
    procs: list[subprocess.Popen] = []
    try:
        stack.reset()
        stack.start()
        ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
        for name in ("receive", "aggregate", "sink archive", "sink opensearch"):
            procs.append(diana(config, *name.split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(start_orthanc(work))
        studies = [
            make_pacs_study(work / "corpus", f"BENCH{n:05d}", instances=args.instances, rows=64)
            for n in range(args.studies)
        ]
        load_into_orthanc(f"http://127.0.0.1:{PORTS['orthanc_http']}", studies)
        source = work / "accessions.csv"
        source.write_text("AccessionNumber\n" + "".join(f"{s.accession}\n" for s in studies))
        report = work / "report.csv"
        time.sleep(5)  # the receiver and sinks are up
        started = time.monotonic()
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diana.cli",
                "collect",
                "run",
                "--no-progress",
                str(source),
                "--report",
                str(report),
            ],
            env={k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
            | {"DIANA_CONFIG": str(config), "DIANA_COLLECT_CONCURRENCY": str(args.concurrency)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output, _ = job.communicate()
        wall = time.monotonic() - started
        if job.returncode != 0:
            raise SystemExit(f"diana collect failed:\n{output[-3000:]}")
        outcomes = [line.split(",")[2] for line in report.read_text().splitlines()[1:]]
        retrieved = outcomes.count("retrieved")
        result = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": f"{platform.node()} ({os.cpu_count()} cores)",
            "studies": args.studies,
            "instances_per_study": args.instances,
            "concurrency": args.concurrency,
            "retrieved": retrieved,
            "wall_s": round(wall, 1),
            "studies_per_hour": round(retrieved / wall * 3600),
            "instances_per_s": round(retrieved * args.instances / wall, 1),
            "summary": output.strip().splitlines()[-1],
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0 if retrieved == args.studies else 1
    finally:
        stop_processes(procs)
        stop_stack(stack, work)


if __name__ == "__main__":
    sys.exit(main())
