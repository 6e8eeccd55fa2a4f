"""Soak benchmark of the aggregates worker: InstanceArrived events only (no pixel data, no receiver).

    python -m bench.stream_soak [--events 100000] [--per-series 100] [--retention-days 30] [--out docs/bench]

Starts its own Kafka (ports 26092/26093 plus --port-offset, nothing else), writes N events (series of --per-series
CT instances, two series per study, event times spread over the write), then:
1. one worker (`diana aggregate`) from the beginning: events/s until its group's lag is 0, its RSS;
2. `kill -9` of that worker and a restart: seconds until its partitions are assigned again (state
   restored from its local files and the changelog's tail) and until an event written after the
   restart is aggregated; with --full-restore-too, once more without the local files (the whole
   changelog is read);
3. two workers of a fresh group from the beginning: events/s together.
Results: JSON and a Markdown table in --out. The issue's target is --events 10000000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.cpu_share import PhaseCpu, process_cpu_s
from bench.pipeline_steps import produce_instance_event

REPO = Path(__file__).resolve().parent.parent
PORTS = {"kafka": 26092, "controller": 26093, "opensearch": 26200, "transport": 26300, "worker": 26066}


def soak_config(work: Path, retention_days: float = 30.0, kafka_heap_mb: int = 512) -> Path:
    path = work / "diana-soak.toml"
    path.write_text(f"""
[kafka]
bootstrap = "127.0.0.1:{PORTS["kafka"]}"
partitions = 4
[opensearch]
url = "http://127.0.0.1:{PORTS["opensearch"]}"
[stream]
web_port = {PORTS["worker"]}
data_dir = "{work}/data"
quiet_seconds = "CT=30,*=30"
state_retention_days = {retention_days!r}
[stack]
home = "{work}/stack"
kafka_port = {PORTS["kafka"]}
kafka_controller_port = {PORTS["controller"]}
kafka_heap_mb = {kafka_heap_mb}
opensearch_port = {PORTS["opensearch"]}
opensearch_transport_port = {PORTS["transport"]}
[log]
level = "info"
""")
    return path


SOAK_ROOT = "1.2.826.0.1.3680043.10.1234"


def soak_event(i: int, per_series: int, received_at: datetime, root: str = SOAK_ROOT) -> dict[str, Any]:
    """The ``i``-th InstanceArrived event of the soaks: series of ``per_series`` CT instances, two
    series per study (bench.stream_soak, bench.worker_cpu, bench.state_size)."""
    series_no, number = divmod(i, per_series)
    study_no = series_no // 2
    return {
        "sop_instance_uid": f"{root}.3.{i}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": f"{root}.1.{study_no}",
        "series_instance_uid": f"{root}.2.{series_no}",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 526_000,
        "sha256": f"{i:064x}",
        "landing_path": f"00/{i:064x}.dcm",
        "received_at": received_at,
        "source": "C_STORE",
        "modality": "CT",
        "instance_number": number + 1,
        "patient_id": f"SOAK{study_no % 1000}",
    }


def write_events(cfg: Any, count: int, per_series: int, span_s: float, root: str = SOAK_ROOT) -> None:
    """``count`` events, series by series, two series per study; event times spread over ``span_s``.

    Their UIDs start with ``root``: a second batch needs its own, or it only repeats the first."""
    from confluent_kafka import Producer

    from diana.schemas.codec import default_codec
    from diana.schemas.topics import EVENT_COMPRESSION

    codec = default_codec()
    producer = Producer(
        {
            "bootstrap.servers": cfg.kafka.bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": EVENT_COMPRESSION,  # the topic's own: the broker keeps batches as they are
            "queue.buffering.max.messages": 500_000,
        }
    )
    start = datetime.now(UTC) - timedelta(seconds=span_s)
    for i in tqdm(range(count), desc="events written", unit="ev", mininterval=2):
        event = soak_event(i, per_series, start + timedelta(seconds=span_s * i / count), root)
        produce_instance_event(producer, codec, event)
    if producer.flush(300) != 0:
        raise RuntimeError("events not all written after 300 s")


def lag(cfg: Any, group: str) -> int:
    from diana.operations import status
    from diana.schemas.topics import INSTANCES

    marks = status.watermarks(cfg, [INSTANCES.name])
    return sum(status.group_lag(cfg, group, marks, count_uncommitted=True).values())


def wait_lag_zero(cfg: Any, group: str, procs: list[subprocess.Popen], timeout: float, poll_s: float = 1.0) -> float:
    deadline = time.monotonic() + timeout
    bar = tqdm(desc=f"{group} lag", unit="ev", mininterval=2)
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"worker {p.pid} exited with {p.returncode}")
        left = lag(cfg, group)
        bar.set_postfix(left=left)
        if left == 0:
            bar.close()
            return time.monotonic()
        time.sleep(poll_s)
    raise RuntimeError(f"{group} not caught up after {timeout:.0f} s")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory in MB; field VmHWM: its peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(config: Path, log: Path, app_id: str, web_port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env.update({"DIANA_CONFIG": str(config), "DIANA_STREAM_APP_ID": app_id, "DIANA_STREAM_WEB_PORT": str(web_port)})
    out = open(log, "ab")  # the child keeps it open
    return subprocess.Popen([sys.executable, "-m", "diana.cli", "aggregate"], stdout=out, stderr=out, env=env, cwd=REPO)


def wait_log(log: Path, text: str, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count(text) >= count:
            return time.monotonic()
        time.sleep(0.1)
    raise RuntimeError(f"{text!r} not seen {count} times in {log} after {timeout:.0f} s")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="InstanceArrived events (default 100000)")
    ap.add_argument("--per-series", type=int, default=100, help="instances per series (default 100)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds one phase may take (default 7200)")
    ap.add_argument("--work", type=Path, default=REPO / "var" / "soak", help="stack and logs (deleted first)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench", help="where stream-soak.json/.md go")
    ap.add_argument("--skip-two-workers", action="store_true", help="leave out phase 3")
    ap.add_argument(
        "--full-restore-too",
        action="store_true",
        help="after phase 2, a second kill -9 and restart with the local state removed (the whole changelog is read)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds between catching up and the kill -9 (default 3; past the 30 s quiet time every series "
        "is complete, so the restore reads a completed archive's state)",
    )
    ap.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="added to every port (26092 is also a test port at DIANA_TEST_PORT_OFFSET=7000)",
    )
    ap.add_argument(
        "--retention-days",
        type=float,
        default=30.0,
        help="[stream] state_retention_days of the workers (default 30: nothing retires during a soak; "
        "0.0005, 43 s of event time, retires most studies before the end)",
    )
    ap.add_argument("--kafka-heap-mb", type=int, default=512, help="the broker's heap (default 512)")
    ap.add_argument(
        "--poll",
        type=float,
        default=1.0,
        help="seconds between lag checks while a phase runs (default 1; each check costs the harness CPU "
        "the worker then lacks on a busy machine)",
    )
    args = ap.parse_args(argv)
    # SIGTERM stops it like Ctrl-C: the workers and the broker are stopped (finally below).
    signal.signal(signal.SIGTERM, _interrupt)

    from diana.clients import kafka_admin
    from diana.compose.local.stack import LocalStack
    from diana.config import load_config
    from diana.schemas.topics import ensure_topics, topic_settings

    for name in PORTS:
        PORTS[name] += args.port_offset
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    config = soak_config(args.work, args.retention_days, args.kafka_heap_mb)
    cfg = load_config(config, environ={})
    stack = LocalStack(cfg)
    procs: list[subprocess.Popen] = []
    result: dict[str, Any] = {
        "events": args.events,
        "per_series": args.per_series,
        "partitions": 4,
        "retention_days": args.retention_days,
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "uptime_at_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each phase too: a run stopped later keeps what it measured
        (args.out / "stream-soak.json").write_text(json.dumps(result, indent=2) + "\n")

    try:
        stack.start_kafka()
        stack.wait_kafka()
        ensure_topics(kafka_admin(cfg.kafka), cfg.kafka.partitions, **topic_settings(cfg.kafka))
        began = time.monotonic()
        write_events(cfg, args.events, args.per_series, span_s=max(60.0, args.events / 2000))
        result["write_s"] = round(time.monotonic() - began, 1)

        # 1. One worker from the beginning.
        log1 = args.work / "worker-1.log"
        started = time.monotonic()
        one = worker(config, log1, "soak-one", PORTS["worker"])
        procs.append(one)
        assigned = wait_log(log1, "partitions.assigned", 1, 600)
        broker = int(stack.kafka.pid_file.read_text().strip())
        meter = PhaseCpu({"worker": one.pid, "broker": broker})
        meter.start()
        done = wait_lag_zero(cfg, "soak-one", [one], args.timeout, args.poll)
        meter.stop()
        result["one_worker"] = {
            "start_to_assigned_s": round(assigned - started, 1),
            "processing_s": round(done - assigned, 1),
            "events_per_s": round(args.events / (done - assigned)),
            "cpu_s": round(process_cpu_s(one.pid), 1),
            "events_per_cpu_s": round(args.events / process_cpu_s(one.pid)),
            "rss_mb_at_end": round(rss_mb(one.pid), 1),
            "rss_mb_peak": round(rss_mb(one.pid, "VmHWM"), 1),
            # From assignment to a lag of 0: the worker's, the broker's and the machine's CPU.
            "phase_cpu": meter.report(),
            "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        }
        print(json.dumps(result["one_worker"]), flush=True)
        save()

        # 2. kill -9 and restart: the state comes back from the changelog.
        time.sleep(args.settle)  # ticks complete what is due; the state is what it is
        one.send_signal(signal.SIGKILL)
        one.wait()
        procs.remove(one)
        killed = time.monotonic()
        again = worker(config, log1, "soak-one", PORTS["worker"])
        procs.append(again)
        restored = wait_log(log1, "partitions.assigned", 2, 600)
        write_events_after = time.monotonic()
        write_events(cfg, 10, args.per_series, span_s=0)  # same UIDs as the first 10: counted once
        caught = wait_lag_zero(cfg, "soak-one", [again], 600)
        restore_line = [x for x in log1.read_text(errors="replace").splitlines() if "state.restored" in x][-1]
        result["kill_9_restart"] = {
            "kill_to_assigned_s": round(restored - killed, 1),
            "restore_log": restore_line.split("]", 2)[-1].strip(),
            "new_events_caught_up_s": round(caught - write_events_after, 1),
            "rss_mb_after_restore": round(rss_mb(again.pid), 1),
        }
        print(json.dumps(result["kill_9_restart"]), flush=True)
        save()
        if args.full_restore_too:
            # 2b. The same kill -9 with the local state removed: the whole changelog is read, as
            # every restore did before the local state existed.
            again.send_signal(signal.SIGKILL)
            again.wait()
            procs.remove(again)
            shutil.rmtree(args.work / "var" / "aggregates-state")
            killed = time.monotonic()
            again = worker(config, log1, "soak-one", PORTS["worker"])
            procs.append(again)
            restored = wait_log(log1, "partitions.assigned", 3, 600)
            restore_line = [x for x in log1.read_text(errors="replace").splitlines() if "state.restored" in x][-1]
            result["kill_9_restart_without_local_state"] = {
                "kill_to_assigned_s": round(restored - killed, 1),
                "restore_log": restore_line.split("]", 2)[-1].strip(),
                "rss_mb_after_restore": round(rss_mb(again.pid), 1),
            }
            print(json.dumps(result["kill_9_restart_without_local_state"]), flush=True)
        result["local_state_mb"] = (
            round(sum(f.stat().st_size for f in (args.work / "var").rglob("*") if f.is_file()) / 2**20, 1)
            if (args.work / "var").exists()
            else 0.0
        )
        again.terminate()
        again.wait(60)
        procs.remove(again)

        # 3. Two workers of a fresh group from the beginning.
        if not args.skip_two_workers:
            logs = [args.work / "worker-2a.log", args.work / "worker-2b.log"]
            started = time.monotonic()
            pair = [worker(config, logs[i], "soak-two", PORTS["worker"] + 10 + i) for i in range(2)]
            procs += pair
            assigned = max(wait_log(log, "partitions.assigned", 1, 600) for log in logs)
            meter = PhaseCpu({"worker_a": pair[0].pid, "worker_b": pair[1].pid, "broker": broker})
            meter.start()
            done = wait_lag_zero(cfg, "soak-two", pair, args.timeout, args.poll)
            meter.stop()
            rate = (args.events + 10) / (done - assigned)
            result["two_workers"] = {
                "processing_s": round(done - assigned, 1),
                "events_per_s": round(rate),
                "ratio_to_one_worker": round(rate / result["one_worker"]["events_per_s"], 2),
                "cpu_s": [round(process_cpu_s(p.pid), 1) for p in pair],
                "rss_mb_at_end": [round(rss_mb(p.pid), 1) for p in pair],
                # Workers + broker near the machine's CPU count: the phase was bound by the cores.
                "phase_cpu": meter.report(),
                "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            }
            print(json.dumps(result["two_workers"]), flush=True)
        result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        result["cpus"] = os.cpu_count()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stack.stop_kafka()
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
