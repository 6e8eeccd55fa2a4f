"""Ingest benchmark: diana-star beside dcmtk's storescp and Orthanc, in one run, on one corpus.

    python -m bench.ingest [--ct 1000] [--dx 300] [--out docs/bench]     (see bench/README.md)

Every receiver gets the same files from dcmtk's storescu (TCP_NODELAY=1 on both ends), over one
association and over 4 parallel ones. For diana-star the whole stack runs (Kafka, OpenSearch,
aggregates worker, both sinks; the receiver with one process per core); it also measures time
until every instance is archived and searchable, per-instance latency from receipt to searchable,
and re-index throughput, samples the receiver with py-spy during its one-association run (top
frames), and says of each target of issue 19 whether this run met it.
Results: JSON plus a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.pipeline_steps import (
    compile_bytecode,
    reindex_instances,
    stop_processes,
    stop_stack,
    warm_up_opensearch_bulk,
)
from bench.profile import Profiler
from bench.receiver_floor import STEPS as FLOOR_STEPS
from bench.receiver_floor import STRICT as STRICT_FLOOR
from bench.receiver_floor import start_floor
from tests.support.dicomgen import SeriesSpec, make_study

REPO = Path(__file__).resolve().parent.parent

DCMTK = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
# CT slices of the profiled run (after the measured ones; the profile reads proportions, not totals).
PROFILE_CT = 200
# diana-star's receiver, and the floors beside it: one process per core.
RECEIVER_PROCESSES = os.cpu_count() or 1
# diana-star's receiver over one association with the rest of the pipeline paused, as the floors run.
PAUSED = "diana-star, pipeline paused"
# Timed reindex runs; the median is the target's figure.
REINDEX_RUNS = 3

# A kind whose topic the bench leaves empty: `diana reindex` of it times the command's fixed cost.
EMPTY_KIND = "dose-alerts"
# Instances sent before the measured runs, to time the pipeline's start-up apart from them.
WARMUP_CT = 4
BENCH_PORTS = {
    "kafka": 29092,
    "controller": 29093,
    "opensearch": 29200,
    "transport": 29300,
    "diana": 21112,
    "storescp": 21113,
    "orthanc": 21114,
    "orthanc_http": 28042,
    "floor": 21115,
}


@dataclass
class Run:
    receiver: str
    associations: int
    instances: int
    megabytes: float
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    # CPU seconds of each process of a receiver that has several (its parent first): how evenly the
    # associations were spread over its workers.
    process_cpu_s: list[float] | None = None
    # CPU seconds of the senders (dcmtk's storescu processes): they share the two cores too.
    sender_cpu_s: float | None = None
    # When the send began (UTC): lines the run up with samples taken beside the bench (bench.jvm_threads).
    started_utc: str | None = None

    @property
    def per_s(self) -> float:
        return self.instances / self.wall_s

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.wall_s


def _children(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (the receiver's worker processes)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _proc_stats(pid: int) -> tuple[float, float]:
    """(cpu seconds, peak RSS MB) of a process and its descendants so far; the RSS is the largest
    single process's peak (each receiver process is bounded on its own)."""
    cpu, peak_rss_mb = _process_tree_stats(pid)
    return sum(cpu.values()), peak_rss_mb


def _cpu_seconds(processes: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process (its descendants included)."""
    return {name: _proc_stats(pid)[0] for name, pid in processes.items()}


def _timed_reindex(
    config: Path, around: dict[str, int], kind: str = "instances"
) -> tuple[float, dict[str, float], dict[str, float]]:
    """`diana reindex --kinds KIND` once: its seconds, the CPU seconds of it and of each process of
    ``around`` meanwhile, and the machine's (busy, stolen)."""
    cpu_before, machine_before = _cpu_seconds(around), _machine_cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    rx = reindex_instances(config, bench_env(config), kind)
    if rx.returncode != 0:
        raise RuntimeError(rx.stderr[-2000:])
    seconds = time.monotonic() - t0
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {n: round(cpu - cpu_before[n], 2) for n, cpu in _cpu_seconds(around).items()}
    cpu["diana reindex"] = round(
        children_after.ru_utime + children_after.ru_stime - children_before.ru_utime - children_before.ru_stime, 2
    )
    machine = {k: round(v - machine_before[k], 2) for k, v in _machine_cpu_seconds().items()}
    return seconds, cpu, machine


def _machine_cpu_seconds() -> dict[str, float]:
    """The machine's CPU seconds so far from /proc/stat: busy (every process, the kernel's work
    included) and steal (time the hypervisor gave this VM's CPUs to others)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / ticks, "steal": steal / ticks}


def _process_tree_stats(pid: int) -> tuple[dict[int, float], float]:
    """(cpu seconds of the process and of each descendant, the largest peak RSS MB) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, float] = {}
    hwm = 0
    for each in [pid, *_children(pid)]:
        try:
            stat = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{each}/status").read_text().splitlines()
        except OSError:
            continue  # ended meanwhile
        cpu[each] = (int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])) / ticks
        hwm = max(hwm, next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0))
    return cpu, hwm / 1024


def corpus(root: Path, ct: int, dx: int) -> list[Path]:
    files: list[Path] = []
    per_series = max(ct // 4, 1)
    for i in range(0, ct, per_series):
        count = min(per_series, ct - i)
        files += make_study(
            root / f"ct{i}", [SeriesSpec("CT", f"BENCH CT {i}", count)], rows=512, patient_id=f"BENCHCT{i}"
        ).files
    if dx:
        files += make_study(
            root / "dx", [SeriesSpec("DX", "BENCH DX", dx, body_part="CHEST")], rows=256, patient_id="BENCHDX"
        ).files
    return files


def send(files: list[Path], port: int, aec: str, associations: int) -> float:
    groups = [files[i::associations] for i in range(associations)]
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            # -ta: storescp serves one association at a time, so the others wait for its A-ASSOCIATE-AC
            # longer than dcmtk's default 30 s on a loaded machine (the 4-association run failed so).
            ["storescu", "-ta", "900", "-aec", aec, "127.0.0.1", str(port), *map(str, g)],
            env=DCMTK,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for g in groups
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu to port {port} failed: {err.decode()[-500:]}")
    return time.monotonic() - started


def measure(name: str, pid: int, files: list[Path], port: int, aec: str, associations: int) -> Run:
    cpu0, _ = _process_tree_stats(pid)
    senders0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = _utc_now()
    wall = send(files, port, aec, associations)
    senders1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, rss = _process_tree_stats(pid)
    mb = sum(f.stat().st_size for f in files) / 1e6
    spent = {each: cpu1[each] - cpu0.get(each, 0.0) for each in cpu1}
    per_process = [round(spent[each], 2) for each in cpu1] if len(cpu1) > 1 else None
    cpu = round(sum(spent.values()), 2)
    senders = senders1.ru_utime + senders1.ru_stime - senders0.ru_utime - senders0.ru_stime
    return Run(
        name,
        associations,
        len(files),
        round(mb, 1),
        round(wall, 3),
        cpu,
        round(rss, 1),
        per_process,
        round(senders, 2),
        started,
    )


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def start_storescp(work: Path, port: int = BENCH_PORTS["storescp"]) -> subprocess.Popen:
    out = work / "storescp"
    out.mkdir()
    return subprocess.Popen(
        ["storescp", "-od", str(out), str(port)],
        env=DCMTK,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_orthanc(work: Path, ports: dict[str, int] = BENCH_PORTS, **settings: object) -> subprocess.Popen | None:
    """Orthanc from Debian on ``ports`` (orthanc, orthanc_http); ``settings`` add to or replace its configuration."""
    binary = shutil.which("Orthanc")
    if not binary:
        return None
    (work / "orthanc").mkdir()
    config = work / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(work / "orthanc"),
                "IndexDirectory": str(work / "orthanc"),
                "DicomAet": "ORTHANC",
                "DicomPort": ports["orthanc"],
                "HttpPort": ports["orthanc_http"],
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": False,
                "Plugins": [],
                "ConcurrentJobs": 2,
            }
            | settings
        )
    )
    proc = subprocess.Popen(
        [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"}
    )
    if wait_for_echo("ORTHANC", ports["orthanc"], tries=100):
        return proc
    proc.kill()
    raise RuntimeError("Orthanc did not start")


def wait_for_echo(aec: str, port: int, tries: int = 200) -> bool:
    """True once a C-ECHO to ``aec`` on ``port`` succeeds (dcmtk echoscu, every 0.2 s)."""
    for _ in range(tries):
        if (
            subprocess.run(["echoscu", "-aec", aec, "127.0.0.1", str(port)], env=DCMTK, capture_output=True).returncode
            == 0
        ):
            return True
        time.sleep(0.2)
    return False


def diana_config(work: Path, p: dict[str, int] = BENCH_PORTS, extra: str = "") -> Path:
    """The pipeline's configuration on ports ``p``; ``extra``: more TOML sections (not those written here)."""
    path = work / "diana-bench.toml"
    path.write_text(f"""
[kafka]
bootstrap = "127.0.0.1:{p["kafka"]}"
[opensearch]
url = "http://127.0.0.1:{p["opensearch"]}"
[receiver]
ae_title = "DIANA"
host = "127.0.0.1"
port = {p["diana"]}
metrics_port = 0
processes = {RECEIVER_PROCESSES}
[sinks]
archive_metrics_port = 0
opensearch_metrics_port = 0
metadata_metrics_port = 0
[storage]
landing_dir = "{work}/landing"
archive_dir = "{work}/archive"
[stream]
web_port = {p.get("stream_web", 29066)}
data_dir = "{work}/faust"
quiet_seconds = "CT=5,DX=5,*=5"
[stack]
home = "{work}/stack"
kafka_port = {p["kafka"]}
kafka_controller_port = {p["controller"]}
opensearch_port = {p["opensearch"]}
opensearch_transport_port = {p["transport"]}
[log]
level = "warning"
{extra}""")
    return path


def bench_env(config: Path) -> dict[str, str]:
    """The environment of a bench's diana commands: its configuration file only, no DIANA_* setting of the caller
    (a test's DIANA_TEST_PORT_OFFSET, say)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_CONFIG"] = str(config)
    return env


def diana(config: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diana.cli", *args], env=bench_env(config), cwd=REPO, **kw)


def searchable_latencies(
    url: str, total: int, timeout: float, since: datetime | None = None
) -> tuple[float, list[float]]:
    """Poll OpenSearch until ``total`` instance documents received after ``since`` are visible; their latencies."""
    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[url])
    seen: dict[str, float] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + timeout
    received = (
        {"range": {"received_at": {"gte": since.isoformat(timespec="milliseconds")}}} if since else {"match_all": {}}
    )
    while len(seen) < total and time.monotonic() < deadline:
        # Only the documents not seen yet: fetching every one on every poll made OpenSearch, which
        # shares the 2 cores with the pipeline being measured, return up to 1,300 documents 4 times a second.
        query = {"bool": {"filter": [received], "must_not": [{"ids": {"values": list(seen)}}]}}
        try:
            hits = client.search(
                index="diana-instances", body={"size": 10000, "_source": ["received_at"], "query": query}
            )["hits"]["hits"]
        except Exception:  # the index does not exist yet
            hits = []
        now = datetime.now(UTC)
        for hit in hits:
            if hit["_id"] not in seen:
                seen[hit["_id"]] = time.monotonic()
                received_at = datetime.fromisoformat(hit["_source"]["received_at"])
                latencies.append((now - received_at).total_seconds())
        time.sleep(0.25)  # while the receiver is being timed too: a light poll
    if len(seen) < total:
        raise RuntimeError(f"only {len(seen)} of {total} instances searchable after {timeout}s")
    return time.monotonic(), latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", type=int, default=1000, help="CT slices of 512x512x16 bit (default 1000)")
    ap.add_argument("--dx", type=int, default=300, help="small DX images (default 300)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench", help="where results.json/.md go")
    ap.add_argument("--no-orthanc", action="store_true", help="skip Orthanc even if installed")
    ap.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="do not sample the receiver with py-spy (a run of its own after the measured ones; the 'profile' extra)",
    )
    ap.add_argument(
        "--jvm-warm-up",
        type=int,
        default=2000,
        help="small instances sent (untimed) before the measured runs, so Kafka and OpenSearch run compiled (default 2000)",
    )
    ap.add_argument(
        "--opensearch-warm-up",
        type=int,
        default=0,
        help="then this many bulk documents written (untimed) into a scratch index of OpenSearch, copies of the "
        "warm-up's instance documents (default 0: none; 100000 did not make the 4-association run's OpenSearch "
        "CPU lower in 2 of 3 runs, docs/PERFORMANCE.md issue 19 stop 26)",
    )
    ap.add_argument(
        "--port-offset", type=int, default=0, help="added to every port of the bench (another bench runs beside it)"
    )
    args = ap.parse_args(argv)

    from diana.compose.local.stack import LocalStack
    from diana.config import load_config

    compile_bytecode()
    ports = {k: v + args.port_offset for k, v in BENCH_PORTS.items()} | {"stream_web": 29066 + args.port_offset}
    work = Path(tempfile.mkdtemp(prefix="diana-bench-"))
    config = diana_config(work, ports)
    cfg = load_config(config, environ={})
    stack = LocalStack(cfg)
    procs: list[subprocess.Popen] = []
    runs: list[Run] = []
    result: dict = {}
    try:
        print(f"corpus: {args.ct} CT + {args.dx} DX in {work}", flush=True)
        # Two corpora of the same shape with different UIDs: every run stores new objects.
        files = corpus(work / "corpus-a", args.ct, args.dx)
        files_b = corpus(work / "corpus-b", args.ct, args.dx)
        files_c = corpus(work / "corpus-c", args.ct, args.dx)
        # The profile's own corpus: py-spy at 200 Hz on the 2 cores tripled the receiver's wall time
        # per instance (bench/receiver_timeline.py --py-spy, docs/PERFORMANCE.md), so no measured run
        # is sampled; this one is sent after them all.
        files_p = corpus(work / "corpus-p", min(args.ct, PROFILE_CT), 0) if args.profile else []
        files_w = corpus(work / "corpus-w", WARMUP_CT, 0)
        files_j = make_study(
            work / "corpus-j", [SeriesSpec("CT", "JVM WARM-UP", args.jvm_warm_up)], rows=64, patient_id="BENCHJVM"
        ).files
        stack.reset()
        stack.start()
        subprocess.run(
            [sys.executable, "-m", "diana.cli", "--config", str(config), "topics"],
            check=True,
            cwd=REPO,
            env=bench_env(config),
            capture_output=True,
        )
        names = ("receive", "aggregate", "sink archive", "sink opensearch")
        pipeline = {n: diana(config, *n.split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in names}
        procs += pipeline.values()
        wait_for_echo("DIANA", ports["diana"])
        scp = start_storescp(work, ports["storescp"])
        procs.append(scp)
        orthanc = None if args.no_orthanc else start_orthanc(work, ports)
        if orthanc:
            procs.append(orthanc)
        time.sleep(1)

        # The pipeline's start-up, measured apart: the receiver answers C-ECHO seconds before the sinks
        # have joined their groups and created the indices, and instances sent meanwhile wait for that
        # (it was most of the receipt -> searchable tail, docs/PERFORMANCE.md issue 19). A few warm-up
        # instances, sent at once and waited for, time it; the measured runs start in the steady state.
        started = time.monotonic()
        send(files_w, ports["diana"], "DIANA", 1)
        startup_s, startup_latencies = searchable_latencies(cfg.opensearch.url, len(files_w), 600)
        startup_s -= started
        # Then the JVMs' warm-up, untimed: freshly started, Kafka and OpenSearch spent 12.9 of the 22.4
        # CPU seconds of the end-to-end window compiling (their C1/C2 compiler threads, 2026-11-29
        # 18:15, docs/PERFORMANCE.md), on the 2 cores the receiver and the sinks need. A deployed
        # pipeline runs on warm JVMs; small instances take the same paths through both.
        since_jvm = datetime.now(UTC)
        send(files_j, ports["diana"], "DIANA", 2)
        searchable_latencies(cfg.opensearch.url, len(files_j), 900, since_jvm)
        # And one reindex of those events, untimed as a target: OpenSearch's bulk path into a new index
        # with refresh off is not the live sink's, and the measured reindex below spent 0.96 of its
        # 1.81 JVM CPU seconds in OpenSearch's compiler threads without it (2026-11-30 00:05, issue 19
        # stop 25, docs/PERFORMANCE.md). Its time is reported beside the measured one.
        warm_up_reindex_s = _timed_reindex(config, {})[0]
        # On request, OpenSearch's bulk path run further: its compiler settled after about 100,000 bulk
        # documents in bench.reindex (issue 19 stop 26, docs/PERFORMANCE.md), not after 10,000 warm-up
        # instances here (stop 25). Off by default: it did not lower the 4-association run's
        # OpenSearch CPU reliably (stop 26).
        started = time.monotonic()
        bulk_warm_up = (
            warm_up_opensearch_bulk(cfg.opensearch.url, "diana-instances", args.opensearch_warm_up)
            if args.opensearch_warm_up
            else 0
        )
        bulk_warm_up_s = time.monotonic() - started
        jvm_warm_up_ended = _utc_now()
        # diana first, on one association: that run is also the end-to-end measurement. OpenSearch is
        # watched while the corpus is sent (polled after the send, every instance would look searchable
        # only after the last one was sent: the send's length, not a latency).
        # Every process of the end-to-end run, the broker and the search engine included: what the
        # two cores spent between the first send and the last instance searchable.
        watched = {n: p.pid for n, p in pipeline.items()}
        for service in ("kafka", "opensearch"):
            pid = stack.pid_of(service)
            if pid is None:
                raise RuntimeError(f"{service} is not running")
            watched[service] = pid
        window_cpu_before = _cpu_seconds(watched)
        with ThreadPoolExecutor(max_workers=1) as watcher:
            first_send = time.monotonic()
            since = datetime.now(UTC)
            watching = watcher.submit(searchable_latencies, cfg.opensearch.url, len(files), 1800, since)
            runs.append(measure("diana-star", pipeline["receive"].pid, files, ports["diana"], "DIANA", 1))
            done_at, latencies = watching.result()
        searchable_s = done_at - first_send
        window_cpu = {n: round(cpu - window_cpu_before[n], 1) for n, cpu in _cpu_seconds(watched).items()}
        # Since each pipeline process started (its imports and start-up included).
        cpu_by_process = {n: round(_proc_stats(p.pid)[0], 1) for n, p in pipeline.items()}
        archived = sum(1 for _ in (work / "archive").rglob("*.dcm"))
        runs.append(measure("storescp", scp.pid, files, ports["storescp"], "ANY", 1))
        if orthanc:
            runs.append(measure("orthanc", orthanc.pid, files, ports["orthanc"], "ORTHANC", 1))
        # The receiver as the floors run: the rest of the pipeline paused (SIGSTOP; Kafka and OpenSearch
        # run), on a corpus of its own. Not a target's figure: it says how much of the receiver's is the
        # pipeline sharing the cores. The pipeline catches up before anything else is timed.
        paused = [p.pid for n, p in pipeline.items() if n != "receive"]
        paused += [child for pid in paused for child in _children(pid)]
        since_paused = datetime.now(UTC)
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            runs.append(measure(PAUSED, pipeline["receive"].pid, files_c, ports["diana"], "DIANA", 1))
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        searchable_latencies(cfg.opensearch.url, len(files_c), 600, since_paused)
        # The floors under the receiver's figures, on the same corpus in the same minutes (receiver_floor.py).
        for steps in FLOOR_STEPS:
            floor = start_floor(
                work / f"floor-{steps}",
                ports["floor"],
                steps,
                f"127.0.0.1:{ports['kafka']}",
                processes=RECEIVER_PROCESSES,
            )
            try:
                if not wait_for_echo("FLOOR", ports["floor"]):
                    raise RuntimeError(f"the {steps} floor SCP did not answer C-ECHO")
                runs.append(measure(f"floor: {steps}", floor.pid, files, ports["floor"], "FLOOR", 1))
                sent = len(files)
                if steps == STRICT_FLOOR:  # and under the 4-association target
                    runs.append(measure(f"floor: {steps}", floor.pid, files_b, ports["floor"], "FLOOR", 4))
                    sent += len(files_b)
                landed = sum(1 for _ in (work / f"floor-{steps}" / "landed").iterdir())
                if landed != sent:
                    raise RuntimeError(f"the {steps} floor SCP stored {landed} of {sent} instances")
            finally:
                stop_processes([floor])
            shutil.rmtree(work / f"floor-{steps}", ignore_errors=True)
        # The second corpus over 4 parallel associations, and what every process of the pipeline spent
        # meanwhile: the receiver's workers share the two cores with the sinks, Kafka and OpenSearch.
        four_cpu_before = _cpu_seconds(watched)
        runs.append(measure("diana-star", pipeline["receive"].pid, files_b, ports["diana"], "DIANA", 4))
        four_cpu = {n: round(cpu - four_cpu_before[n], 2) for n, cpu in _cpu_seconds(watched).items()}
        runs.append(measure("storescp", scp.pid, files_b, ports["storescp"], "ANY", 4))
        if orthanc:
            runs.append(measure("orthanc", orthanc.pid, files_b, ports["orthanc"], "ORTHANC", 4))

        # Re-index the whole instance topic with a fresh consumer, REINDEX_RUNS times; the median is
        # the figure. A second long: the first one after the runs above once took 0.95 CPU seconds
        # where the next two took 0.75 each, with nothing else busy (stop 27, docs/PERFORMANCE.md).
        events = len(files) + len(files_b) + len(files_c) + len(files_w) + len(files_j)
        # What every process spent meanwhile: the reindex shares the two cores with whatever the
        # runs before it left running (the references included).
        around = watched | {"storescp": scp.pid} | ({"orthanc": orthanc.pid} if orthanc else {})
        reindex_started = _utc_now()
        reindex_runs = [_timed_reindex(config, around) for _ in range(REINDEX_RUNS)]
        reindex_s, reindex_cpu, machine = sorted(reindex_runs, key=lambda run: run[0])[REINDEX_RUNS // 2]
        # The same command over a kind whose topic is empty here (no dose worker runs): its fixed cost
        # (start-up, index creation, alias swap; no catch-up process is started for an empty topic) and
        # nothing else, a lower bound on the fixed part of the run above, so events / this is the most
        # that run could have reached.
        reindex_fixed_s = _timed_reindex(config, {}, EMPTY_KIND)[0]

        # Where the receiver's CPU goes, sampled on a corpus of its own over one association.
        receiver_profile = None
        if files_p:
            profiler = Profiler(pipeline["receive"].pid, work / "receiver.folded")
            profiler.start()
            time.sleep(1)  # py-spy attaches
            send(files_p, ports["diana"], "DIANA", 1)
            receiver_profile = profiler.stop()
            if receiver_profile is not None:
                receiver_profile["instances"] = len(files_p)

        reference = {r.associations: r.wall_s for r in runs if r.receiver == "storescp"}
        orthanc_rate = {r.associations: r.per_s for r in runs if r.receiver == "orthanc"}
        runs_four = next(r for r in runs if r.receiver == "diana-star" and r.associations == 4)
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
            "corpus": {"instances": len(files), "megabytes": runs[0].megabytes, "ct": args.ct, "dx": args.dx},
            "runs": [
                asdict(r)
                | {
                    "per_s": round(r.per_s, 1),
                    "mb_per_s": round(r.mb_per_s, 1),
                    "ratio_to_storescp": round(r.wall_s / reference[r.associations], 2),
                    "rate_vs_orthanc": round(r.per_s / orthanc_rate[r.associations], 2)
                    if r.associations in orthanc_rate
                    else None,
                }
                for r in runs
            ],
            "startup": {
                "instances": len(files_w),
                "jvm_warm_up_instances": len(files_j),
                "opensearch_warm_up_documents": bulk_warm_up,
                "opensearch_warm_up_seconds": round(bulk_warm_up_s, 2),
                # From the JVM warm-up's first send to the end of its reindex and OpenSearch's bulk warm-up (UTC).
                "jvm_warm_up_utc": [since_jvm.isoformat(timespec="seconds"), jvm_warm_up_ended],
                "searchable_s": round(startup_s, 2),
                "receipt_to_searchable_max_s": round(max(startup_latencies), 3),
            },
            "four_associations": {
                "cpu_s": four_cpu | {"storescu": runs_four.sender_cpu_s},
                "cores_busy": round((sum(four_cpu.values()) + (runs_four.sender_cpu_s or 0)) / runs_four.wall_s, 2),
            },
            "end_to_end": {
                "archived": archived,  # the warm-up's instances included
                "searchable_s": round(searchable_s, 2),
                "pipeline_cpu_s": cpu_by_process,
                "window_cpu_s": window_cpu,
                "window_cores_busy": round(sum(window_cpu.values()) / searchable_s, 2),
                "searchable_vs_storescp": round(searchable_s / reference[1], 2),
                "stability_window_s": "CT=5,DX=5 (completion only; not in searchable_s)",
                "receipt_to_searchable_s": {
                    "p50": round(pct(latencies, 0.5), 3),
                    "p95": round(pct(latencies, 0.95), 3),
                    "p99": round(pct(latencies, 0.99), 3),
                },
            },
            "reindex": {
                "events": events,
                "seconds": round(reindex_s, 2),
                "events_per_s": round(events / reindex_s),
                "empty_kind": EMPTY_KIND,
                "empty_kind_seconds": round(reindex_fixed_s, 2),
                "ceiling_events_per_s": round(events / reindex_fixed_s),
                "warm_up_events": len(files_w) + len(files_j),
                "warm_up_seconds": round(warm_up_reindex_s, 2),
                "started_utc": reindex_started,
                "runs_seconds": [round(run[0], 2) for run in reindex_runs],
                "cpu_s": reindex_cpu,
                "machine_cpu_s": machine,
            },
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "receiver_profile": receiver_profile,
        }
        result["targets"] = targets(result)
    finally:
        stop_processes(procs)
        stop_stack(stack, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


def runs_by_receiver(result: dict) -> dict[tuple[str, int], dict]:
    """The runs of a result by (receiver, associations)."""
    return {(r["receiver"], r["associations"]): r for r in result["runs"]}


def targets(result: dict) -> list[dict]:
    """Issue 19's targets, each a ratio or bound measured in this one run: figure, bound, met or not;
    for the receiver's, also the same figure of the floor measured beside it (``floor: parse``: pynetdicom,
    the contract's waits and pydicom's parse of the data set, nothing else: receiver_floor.py) and whether that floor
    itself meets the bound (if not, no receiver built on it can: the target is out of reach here)."""
    runs = runs_by_receiver(result)
    e = result["end_to_end"]
    rows = []

    def add(name: str, value: float | None, bound: str, floor: float | None = None) -> None:
        """One row; the run's figure and the floor's are judged against the same written bound."""
        met = None if value is None else _within(value, bound)
        floor_met = None if floor is None else _within(floor, bound)
        rows.append(
            {"target": name, "value": value, "bound": bound, "met": met, "floor": floor, "floor_met": floor_met}
        )

    diana1, scp1 = runs[("diana-star", 1)], runs[("storescp", 1)]
    floor = runs.get((f"floor: {STRICT_FLOOR}", 1))
    scp_cpu = max(scp1["cpu_s"], 0.01)
    floor_wall = None if floor is None else round(floor["wall_s"] / scp1["wall_s"], 2)
    floor_cpu = None if floor is None else round(floor["cpu_s"] / scp_cpu, 2)
    add("receiver wall, 1 association, × storescp", round(diana1["wall_s"] / scp1["wall_s"], 2), "≤ 2", floor_wall)
    add("receiver CPU seconds, 1 association, × storescp's", round(diana1["cpu_s"] / scp_cpu, 2), "≤ 3", floor_cpu)
    floor4 = runs.get((f"floor: {STRICT_FLOOR}", 4), {}).get("rate_vs_orthanc")
    add("rate with 4 associations, × Orthanc's", runs[("diana-star", 4)]["rate_vs_orthanc"], "≥ 3", floor4)
    add("receipt → searchable, p95 s", e["receipt_to_searchable_s"]["p95"], "< 2")
    # Nothing is searchable before it was received: the receiver's wall floor bounds this one too.
    add("all searchable after first send, × storescp wall", e["searchable_vs_storescp"], "≤ 3", floor_wall)
    # Its floor: the events over the time the same command takes with nothing to do.
    reindex = result["reindex"]
    add(
        "diana reindex of dicom.instances, events/s",
        reindex["events_per_s"],
        "≥ 5000",
        reindex.get("ceiling_events_per_s"),
    )
    rss = max(r["peak_rss_mb"] for r in result["runs"] if r["receiver"] == "diana-star")
    add("receiver peak RSS MB", rss, "< 250")
    return rows


def _within(value: float, bound: str) -> bool:
    """``value`` against a bound written as in the issue ("≤ 2", "≥ 3", "< 2")."""
    op, limit = bound.split()
    return {"≤": value <= float(limit), "≥": value >= float(limit), "<": value < float(limit)}[op]


def render_profile(profile: dict | None) -> list[str]:
    if not profile:
        return ["", "Receiver profile: none (py-spy not installed, or --no-profile)."]
    lines = [
        "",
        f"Receiver profile (py-spy, {profile['samples']} samples of active threads during a 1-association run of "
        f"{profile.get('instances', '?')} CT instances after the measured runs, not during them):",
        "",
        "| own % | frame (where the CPU was) | | inclusive % | frame (with what it called) |",
        "|---:|---|---|---:|---|",
    ]
    for own, inc in zip(profile["own"], profile["inclusive"], strict=False):
        lines.append(f"| {own['percent']} | {own['frame']} | | {inc['percent']} | {inc['frame']} |")
    return lines


def _jvm_warm_up_text(startup: dict) -> str:
    """The untimed JVM warm-up before the measured runs (its OpenSearch part absent in older results)."""
    text = f" Then, untimed: {startup['jvm_warm_up_instances']} small instances sent and reindexed"
    if startup.get("opensearch_warm_up_documents"):
        text += (
            f", and {startup['opensearch_warm_up_documents']} copies of their documents bulk-indexed into a scratch "
            f"index in {startup['opensearch_warm_up_seconds']} s (OpenSearch's compiler settling)"
        )
    return text + "."


def _reindex_runs_text(reindex: dict) -> str:
    """The times of every timed run (absent in older results, which timed one)."""
    if "runs_seconds" not in reindex:
        return ""
    return f" (the median of {len(reindex['runs_seconds'])} runs: {', '.join(map(str, reindex['runs_seconds']))} s)"


def _reindex_cpu_text(reindex: dict) -> str:
    """What each process and the machine spent during the measured reindex (absent in older results)."""
    if "cpu_s" not in reindex:
        return ""
    cpu, machine = reindex["cpu_s"], reindex["machine_cpu_s"]
    return (
        " CPU seconds during the median run: "
        + ", ".join(f"{k} {v}" for k, v in cpu.items())
        + f"; the machine {machine['busy']} busy ({round(machine['busy'] / reindex['seconds'], 2)} cores)"
        + f" and {machine['steal']} stolen by the hypervisor."
    )


def _warm_up_reindex_text(reindex: dict) -> str:
    """The untimed reindex of the JVM warm-up (absent in older results)."""
    if "warm_up_seconds" not in reindex:
        return ""
    return (
        f" Before the measured runs, the same command over the {reindex['warm_up_events']} warm-up events "
        f"(the first reindex of this OpenSearch, untimed as a target) took {reindex['warm_up_seconds']} s."
    )


def _four_associations_line(result: dict) -> list[str]:
    """Where the two cores went while diana-star received over 4 associations (absent in older results)."""
    four = result.get("four_associations")
    if four is None:
        return []
    wall = runs_by_receiver(result)[("diana-star", 4)]["wall_s"]
    return [
        f"CPU seconds of each process while diana-star received over 4 associations ({wall} s): "
        + ", ".join(f"{k} {v}" for k, v in four["cpu_s"].items())
        + f"; {four['cores_busy']} of the {result['machine']['cpus']} cores busy on average."
    ]


def render(result: dict) -> str:
    c = result["corpus"]
    lines = [
        f"Corpus: {c['instances']} instances, {c['megabytes']} MB ({c['ct']} CT 512x512x16, {c['dx']} DX); "
        f"{result['machine']['cpus']} CPUs; {result['when']}",
        "",
        "| receiver | associations | wall s | inst/s | MB/s | × storescp wall | rate × Orthanc | peak RSS MB | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['receiver']} | {r['associations']} | {r['wall_s']} | {r['per_s']} | {r['mb_per_s']} | "
            f"{r['ratio_to_storescp']} | {r['rate_vs_orthanc'] or '-'} | {r['peak_rss_mb']} | {r['cpu_s']} |"
        )
    e = result["end_to_end"]
    lat = e["receipt_to_searchable_s"]
    runs = runs_by_receiver(result)
    paused, scp = runs.get((PAUSED, 1)), runs[("storescp", 1)]
    if paused is not None:
        lines += [
            "",
            f"The receiver with the rest of the pipeline paused, as the floors run (not a target's figure): "
            f"{paused['ratio_to_storescp']} × storescp's wall, "
            f"{round(paused['cpu_s'] / max(scp['cpu_s'], 0.01), 2)} × its CPU.",
        ]
    lines += [
        "",
        f"End to end (diana-star, 1 association): all {c['instances']} archived and searchable "
        f"{e['searchable_s']} s after the first send ({e['searchable_vs_storescp']} × storescp's wall time); "
        f"receipt to searchable p50 {lat['p50']} s, p95 {lat['p95']} s, p99 {lat['p99']} s. "
        f"Stability window (series completion, not included): {e['stability_window_s']}.",
        f"Start-up (not in those figures): {result['startup']['instances']} warm-up instances sent once the "
        f"receiver answered C-ECHO were all searchable {result['startup']['searchable_s']} s later."
        + _jvm_warm_up_text(result["startup"]),
        "CPU seconds of each process from the first send to the last instance searchable: "
        + ", ".join(f"{k} {v}" for k, v in e["window_cpu_s"].items())
        + f"; together {round(sum(e['window_cpu_s'].values()), 1)} s over {e['searchable_s']} s, "
        f"{e['window_cores_busy']} of the {result['machine']['cpus']} cores busy on average. "
        "Since each pipeline process started: " + ", ".join(f"{k} {v}" for k, v in e["pipeline_cpu_s"].items()) + ".",
        *_four_associations_line(result),
        f"Re-index of dicom.instances by a fresh consumer: {result['reindex']['events']} events in "
        f"{result['reindex']['seconds']} s = {result['reindex']['events_per_s']} events/s"
        + _reindex_runs_text(result["reindex"])
        + "; the same command over "
        f"an empty topic ({result['reindex']['empty_kind']}) took {result['reindex']['empty_kind_seconds']} s, "
        f"so no run of it could pass {result['reindex']['ceiling_events_per_s']} events/s on these events."
        + _warm_up_reindex_text(result["reindex"])
        + _reindex_cpu_text(result["reindex"]),
        f"Load average at the end (1, 5, 15 min; the machine is shared): {result['load_average']}.",
        "",
        "| target (issue 19) | this run | bound | met? | floor, same run (receiver: `floor: parse`; reindex: events ÷ "
        "the command's time over an empty topic) | could the floor meet it? |",
        "|---|---:|---|---|---:|---|",
    ]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("**met**" if t["met"] else "not met")
        floor_met = {None: "-", True: "yes", False: "**no: out of reach here**"}[t.get("floor_met")]
        lines.append(f"| {t['target']} | {t['value']} | {t['bound']} | {met} | {t.get('floor') or '-'} | {floor_met} |")
    lines += render_profile(result.get("receiver_profile"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
