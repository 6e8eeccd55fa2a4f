"""Receipt → searchable, stage by stage (issue 19): where an instance's time goes between the receiver and search.

    python -m bench.latency_chain --ct 200 --dx 50 --port-offset 1000 [--rate N] [--out FILE]

Runs the whole pipeline (its own Kafka and OpenSearch on bench.ingest's ports shifted by ``--port-offset``;
receiver, aggregates worker, archive and OpenSearch sinks), sends a few warm-up instances and waits
until they are searchable (the start-up transient: sink joining its group, indices created), then
sends the corpus from dcmtk ``storescu`` over one association (at full speed), or with ``--rate N`` from
pynetdicom over one association at N instances a second (paced: the n-th C-STORE starts n/N s after the
first, or as soon as the one before it returned if it is late), while a thread polls OpenSearch every
``--poll`` seconds. Paced runs below the machine's throughput tell latency that is ours from latency that
is a backlog: the machine's CPU busy fraction (``/proc/stat``, every core) is reported over the
measurement and per second. Afterwards it reads every event back from ``dicom.instances`` (partition, offset,
Kafka timestamp) and joins it with the OpenSearch sink's per-batch timeline (its ``sink.batch_written``
debug lines: when it asked for the batch, when the batch came, when the bulk write returned), so each
instance's latency splits into:

- receipt → produce: ``received_at`` (set after the object is durable) to the event's Kafka timestamp;
- produce → asked: the event waited for the sink to finish writing the batch before it;
- batch wait: from the later of produce and the sink's request to the batch's return from ``consume``
  (Kafka's delivery to the consumer and the wait for the batch to fill, at most ``[sinks] max_wait_s``);
- bulk write: the batch's bulk request(s);
- written → searchable: the index's refresh and the poll's own resolution.

It prints each stage's mean, p50, p95 and max, the same for the slowest 5 %, OpenSearch's refresh,
merge and GC counters over the run, and the load average. Figures: docs/PERFORMANCE.md (issue 19).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.cpu_share import busy_share, machine_ticks
from bench.ingest import BENCH_PORTS, REPO, bench_env, corpus, diana, diana_config, pct, send, wait_for_echo
from bench.pipeline_steps import stop_processes, stop_stack

STAGES = ("receipt→produce", "produce→asked", "batch wait", "bulk write", "written→searchable", "total")


class Watcher(threading.Thread):
    """Polls the instance index; for each document the time the first search that returned it came back."""

    def __init__(self, url: str, interval: float):
        super().__init__(daemon=True)
        from opensearchpy import OpenSearch

        self.client = OpenSearch(hosts=[url], timeout=30)
        self.interval = interval
        self.seen: dict[str, float] = {}
        self.round_trips: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.time()
            try:
                hits = self.client.search(
                    index="diana-instances", body={"size": 10000, "_source": False, "query": {"match_all": {}}}
                )["hits"]["hits"]
            except Exception:  # the index does not exist yet
                hits = []
            back = time.time()
            self.round_trips.append(back - sent)
            for hit in hits:
                self.seen.setdefault(hit["_id"], back)
            self.stop.wait(self.interval)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.seen)} of {count} instances searchable after {timeout} s")
            time.sleep(0.1)


class CpuSampler(threading.Thread):
    """The machine's CPU busy fraction in each second, so a run shows whether the cores were saturated."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.busy: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = machine_ticks()
        while not self.stop.wait(1.0):
            now = machine_ticks()
            self.busy.append(busy_share(last, now))
            last = now


def send_paced(files: list[Path], port: int, aec: str, rate: float) -> dict[str, float]:
    """Send ``files`` over one pynetdicom association, the n-th C-STORE started n/rate s after the first
    (at once if the one before returned later than that); its wall, the rate reached and the lateness."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    ae = AE(ae_title="LATENCY")
    for pair in sorted({(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in map(read_file_meta_info, files)}):
        ae.add_requested_context(*pair)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {aec} on port {port}")
    late: list[float] = []
    failed = 0
    started = time.monotonic()
    try:
        for n, path in enumerate(files):
            due = started + n / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                late.append(-wait)
            status = assoc.send_c_store(path)  # by path: streamed from the file, as storescu does
            if getattr(status, "Status", None) != 0:
                failed += 1
    finally:
        assoc.release()
    wall = time.monotonic() - started
    if failed:
        raise RuntimeError(f"{failed} C-STOREs failed")
    return {
        "rate_asked": rate,
        "rate_reached": round(len(files) / wall, 1),
        "wall_s": round(wall, 2),
        "late_sends": len(late),
        "late_max_s": round(max(late, default=0.0), 3),
    }


def read_events(bootstrap: str) -> dict[str, dict[str, Any]]:
    """Every InstanceArrived on the topic: SOP Instance UID → partition, offset, Kafka timestamp, received_at."""
    from confluent_kafka import Consumer, TopicPartition

    from diana.schemas.codec import default_codec

    codec = default_codec()
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"latency-chain-{uuid.uuid4()}", "enable.auto.commit": False}
    )
    meta = consumer.list_topics("dicom.instances", timeout=30).topics["dicom.instances"]
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition("dicom.instances", p), timeout=30)[1] for p in meta.partitions
    }
    consumer.assign([TopicPartition("dicom.instances", p, 0) for p in meta.partitions])
    events: dict[str, dict[str, Any]] = {}
    remaining = sum(ends.values())
    while remaining > 0:
        for msg in consumer.consume(500, timeout=5):
            if msg.error():
                continue
            remaining -= 1
            _, record = codec.decode(msg.value())
            received = record["received_at"]
            events[record["sop_instance_uid"]] = {
                "partition": msg.partition(),
                "offset": msg.offset(),
                "produced": msg.timestamp()[1] / 1000,
                "received": (
                    received if isinstance(received, datetime) else datetime.fromisoformat(received)
                ).timestamp(),
            }
    consumer.close()
    return events


def read_batches(log_file: Path, since: float) -> tuple[dict[tuple[int, int], dict[str, float]], dict[str, Any]]:
    """(partition, offset) of dicom.instances → its batch's asked_at, consumed_at, written_at (the sink's debug log);
    and the sizes of the batches written from ``since`` (instances, and the other consumer's topics)."""
    batches: dict[tuple[int, int], dict[str, float]] = {}
    sizes: dict[str, list[int]] = {"instances": [], "others": []}
    for line in log_file.read_text(errors="replace").splitlines():
        if '"sink.batch_written"' not in line:
            continue
        entry = json.loads(line)
        times = {k: entry[k] for k in ("asked_at", "consumed_at", "written_at")}
        if entry["written_at"] >= since:
            instances = any(k.startswith("dicom.instances/") for k in entry["offsets"])
            sizes["instances" if instances else "others"].append(entry["messages"])
        for where, (first, last) in entry["offsets"].items():
            topic, partition = where.rsplit("/", 1)
            if topic == "dicom.instances":
                for offset in range(first, last + 1):
                    batches[(int(partition), offset)] = times
    stats = {
        k: {
            "batches": len(v),
            "messages": sum(v),
            "mean": round(sum(v) / len(v), 1) if v else 0,
            "max": max(v, default=0),
        }
        for k, v in sizes.items()
    }
    return batches, stats


def opensearch_counters(url: str) -> dict[str, float]:
    """Refresh, merge and GC counters of the node(s), summed: compared before and after the run."""
    from opensearchpy import OpenSearch

    stats = OpenSearch(hosts=[url]).nodes.stats(metric="jvm,indices,process", index_metric="refresh,merge,indexing")
    out: dict[str, float] = {}
    for node in stats["nodes"].values():
        idx = node["indices"]
        for key, value in (
            ("refreshes", idx["refresh"]["total"]),
            ("refresh_ms", idx["refresh"]["total_time_in_millis"]),
            ("merges", idx["merges"]["total"]),
            ("merge_ms", idx["merges"]["total_time_in_millis"]),
            ("indexing_ms", idx["indexing"]["index_time_in_millis"]),
            ("cpu_ms", node["process"]["cpu"]["total_in_millis"]),
        ):
            out[key] = out.get(key, 0) + value
        for name, gc in node["jvm"]["gc"]["collectors"].items():
            out[f"gc_{name}"] = out.get(f"gc_{name}", 0) + gc["collection_count"]
            out[f"gc_{name}_ms"] = out.get(f"gc_{name}_ms", 0) + gc["collection_time_in_millis"]
    return out


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": round(sum(values) / len(values), 3),
        "p50": round(pct(values, 0.5), 3),
        "p95": round(pct(values, 0.95), 3),
        "max": round(max(values), 3),
    }


def chain(
    events: dict[str, dict[str, Any]], batches: dict[tuple[int, int], dict[str, float]], seen: dict[str, float]
) -> list[dict[str, float]]:
    """Each measured instance's stages, in seconds."""
    rows = []
    for sop, ev in events.items():
        batch = batches.get((ev["partition"], ev["offset"]))
        if batch is None or sop not in seen:
            continue
        rows.append(
            {
                "received": ev["received"],
                "receipt→produce": ev["produced"] - ev["received"],
                "produce→asked": max(0.0, batch["asked_at"] - ev["produced"]),
                "batch wait": batch["consumed_at"] - max(batch["asked_at"], ev["produced"]),
                "bulk write": batch["written_at"] - batch["consumed_at"],
                "written→searchable": seen[sop] - batch["written_at"],
                "total": seen[sop] - ev["received"],
            }
        )
    return rows


def report(rows: list[dict[str, float]]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r["total"])
    tail = rows[int(0.95 * len(rows)) :]
    start = min(r["received"] for r in rows)
    return {
        "instances": len(rows),
        "all": {s: summary([r[s] for r in rows]) for s in STAGES},
        "slowest_5pct": {s: summary([r[s] for r in tail]) for s in STAGES},
        # When the slow ones were received (seconds into the run): a start-up transient, or periodic?
        "slowest_received_at_s": sorted(round(r["received"] - start, 2) for r in tail),
    }


def render(result: dict[str, Any]) -> str:
    cpu = result["cpu"]
    lines = [
        f"{result['instances']} instances, refresh {result['refresh_interval']}; load average before {result['load_before']}, after {result['load_after']}",
        f"sender: {result['sender']}",
        f"machine CPU busy (all cores): {cpu['busy']} from the first send to all searchable, {cpu['busy_sending']} while sending;"
        f" per second p50 {cpu['per_second_p50']}, p95 {cpu['per_second_p95']}, seconds >= 0.95 busy: {cpu['seconds_saturated']} of {cpu['seconds']}",
        "",
        "| stage | mean s | p50 s | p95 s | max s | slowest 5 %: mean s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in STAGES:
        a, t = result["all"][s], result["slowest_5pct"][s]
        lines.append(f"| {s} | {a['mean']} | {a['p50']} | {a['p95']} | {a['max']} | {t['mean']} |")
    lines += [
        "",
        f"slowest 5 % received at (s into the run): {result['slowest_received_at_s']}",
        f"warm-up instances (start-up transient) total latency: {result['warmup_total_s']}",
        f"OpenSearch over the run: {result['opensearch_delta']}",
        f"OpenSearch CPU per instance sent: {result['opensearch_cpu_ms_per_instance']} ms",
        f"OpenSearch refresh thread pool: {result['refresh_thread_pool']}",
        f"poll round trip: {result['poll_round_trip_s']}",
        f"OpenSearch sink batches written during the run: {result['batch_sizes']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency_chain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", type=int, default=200, help="CT slices of 512x512x16 bit (default 200)")
    ap.add_argument("--dx", type=int, default=50, help="small DX images (default 50)")
    ap.add_argument("--port-offset", type=int, default=1000, help="added to bench.ingest's ports (default 1000)")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="instances a second, paced, from pynetdicom over one association (default 0: storescu, full speed)",
    )
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between searches of the watcher (default 0.1)")
    ap.add_argument("--warmup", type=int, default=4, help="instances sent (and waited for) before measuring")
    ap.add_argument("--extra", default="", help="more TOML for the pipeline's configuration (e.g. a [sinks] setting)")
    ap.add_argument(
        "--refresh-interval",
        default="",
        help="[opensearch] refresh_interval of the indices (default: the configured 1s)",
    )
    ap.add_argument(
        "--refresh-on-write",
        choices=("true", "false"),
        default="",
        help="[opensearch] refresh_on_write for the run (refresh=true on each bulk; default: as configured, false)",
    )
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)

    from diana.compose.local.stack import LocalStack
    from diana.config import load_config

    ports = {k: v + args.port_offset for k, v in BENCH_PORTS.items()} | {"stream_web": 29066 + args.port_offset}
    work = Path(tempfile.mkdtemp(prefix="diana-latency-"))
    config = diana_config(work, ports, args.extra)
    cfg = load_config(config, environ={})
    stack = LocalStack(cfg)
    procs: list[subprocess.Popen] = []
    try:
        files = corpus(work / "corpus", args.ct, args.dx)
        warm = corpus(work / "warm", args.warmup, 0) if args.warmup else []
        stack.reset()
        stack.start()
        env = bench_env(config)
        if args.refresh_interval:  # the OpenSearch sink creates the indices (from its templates)
            env["DIANA_OPENSEARCH_REFRESH_INTERVAL"] = args.refresh_interval
        if args.refresh_on_write:
            env["DIANA_OPENSEARCH_REFRESH_ON_WRITE"] = args.refresh_on_write
        subprocess.run(
            [sys.executable, "-m", "diana.cli", "topics"], check=True, env=env, capture_output=True, cwd=REPO
        )
        for name in ("receive", "aggregate", "sink archive"):
            procs.append(diana(config, *name.split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sink_log = work / "sink-opensearch.log"
        with sink_log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "diana.cli", "sink", "opensearch"],
                    env=env | {"DIANA_LOG_LEVEL": "debug", "DIANA_LOG_FORMAT": "json"},
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=out,
                )
            )
        if not wait_for_echo("DIANA", ports["diana"]):
            raise RuntimeError("the receiver did not answer C-ECHO")
        watcher = Watcher(cfg.opensearch.url, args.poll)
        watcher.start()
        warm_sent = time.time()
        if warm:
            send(warm, ports["diana"], "DIANA", 1)
            watcher.wait_for(len(warm), 300)
        warmup_total = round(max(watcher.seen.values(), default=warm_sent) - warm_sent, 2)
        warm_uids = set(watcher.seen)
        before = opensearch_counters(cfg.opensearch.url)
        load_before = [round(x, 2) for x in os.getloadavg()]
        sampler = CpuSampler()
        sampler.start()
        cpu_start = machine_ticks()
        measure_start = time.time()
        if args.rate > 0:
            sender: dict[str, Any] = send_paced(files, ports["diana"], "DIANA", args.rate)
        else:
            sender = {
                "rate_asked": "full speed (storescu)",
                "wall_s": round(send(files, ports["diana"], "DIANA", 1), 2),
            }
            sender["rate_reached"] = round(len(files) / sender["wall_s"], 1)
        cpu_sent = machine_ticks()
        watcher.wait_for(len(warm) + len(files), 600)
        cpu_end = machine_ticks()
        sampler.stop.set()
        watcher.stop.set()
        load_after = [round(x, 2) for x in os.getloadavg()]
        after = opensearch_counters(cfg.opensearch.url)
        from opensearchpy import OpenSearch

        # The refreshes of every shard share this pool (its size depends on the node's processors).
        pool = OpenSearch(hosts=[cfg.opensearch.url]).nodes.info(metric="thread_pool")
        refresh_threads = [n["thread_pool"]["refresh"] for n in pool["nodes"].values()]
        time.sleep(1)  # the sink's last debug line
        events = read_events(cfg.kafka.bootstrap)
        measured = {sop: ev for sop, ev in events.items() if sop not in warm_uids}
        batches, batch_sizes = read_batches(sink_log, measure_start)
        result: dict[str, Any] = report(chain(measured, batches, watcher.seen))
        result |= {
            "batch_sizes": batch_sizes,
            "refresh_thread_pool": refresh_threads,
            "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_before": load_before,
            "load_after": load_after,
            "warmup_total_s": warmup_total,
            "opensearch_delta": {k: round(after[k] - before.get(k, 0), 1) for k in after},
            "opensearch_cpu_ms_per_instance": round((after["cpu_ms"] - before["cpu_ms"]) / len(files), 2),
            "poll_round_trip_s": summary(watcher.round_trips),
            "sender": sender,
            "cpu": {
                "cores": os.cpu_count(),
                "busy": round(busy_share(cpu_start, cpu_end), 3),
                "busy_sending": round(busy_share(cpu_start, cpu_sent), 3),
                "per_second_p50": round(pct(sampler.busy, 0.5), 3) if sampler.busy else None,
                "per_second_p95": round(pct(sampler.busy, 0.95), 3) if sampler.busy else None,
                "seconds_saturated": sum(b >= 0.95 for b in sampler.busy),
                "seconds": len(sampler.busy),
            },
            "extra": args.extra,
            "refresh_interval": (args.refresh_interval or "1s (default)")
            + (f", refresh_on_write {args.refresh_on_write}" if args.refresh_on_write else ""),
        }
    finally:
        stop_processes(procs)
        stop_stack(stack, work)
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
