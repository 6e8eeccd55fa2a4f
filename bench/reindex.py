"""`diana reindex` of dicom.instances at scale: events only, real headers, a real Kafka and OpenSearch.

Fills dicom.instances with N InstanceArrived events built from the headers of a small generated
corpus (CT and DX, read by the receiver's own header reader; each event gets its own SOP Instance UID,
and a new study every 200 events, in the record and in its header JSON alike), then times
``diana reindex --kinds instances`` end to end as a subprocess (start-up, index creation, the alias
swap included). Optionally:

- ``--profile``: a second reindex under ``py-spy record`` (its top frames are printed);
- ``--processes 1,2``: alternate runs with these ``diana reindex --processes`` counts;
- ``--floor``: OpenSearch's own bulk rate for the same documents: the NDJSON bodies built in memory
  beforehand (with the sink's own document builder) and posted by a bare ``http.client`` from
  ``--floor-threads`` threads into a fresh index with the same template and refresh off. That is the
  rate no client of this OpenSearch can beat on this machine.

Runs a Kafka and an OpenSearch of its own, on the test suite's ports shifted by ``--port-offset``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import REPO, _proc_stats, corpus
from bench.pipeline_steps import compile_bytecode, produce_instance_event
from bench.profile import Profiler, summarise_folded

STUDY_SIZE = 200


def _config_text(home: Path, offset: int) -> str:
    return f"""
[kafka]
bootstrap = "127.0.0.1:{19092 + offset}"
partitions = 3
[opensearch]
url = "http://127.0.0.1:{19200 + offset}"
[storage]
landing_dir = "{home}/landing"
archive_dir = "{home}/archive"
[stack]
home = "{home}/stack"
kafka_port = {19092 + offset}
kafka_controller_port = {19093 + offset}
opensearch_port = {19200 + offset}
opensearch_transport_port = {19300 + offset}
[log]
level = "warning"
"""


def template_events(root: Path, ct: int, dx: int) -> list[dict[str, Any]]:
    """InstanceArrived records as the receiver builds them, one per generated file."""
    from diana.producers.header import read_header

    events = []
    for path in corpus(root, ct, dx):
        data = path.read_bytes()
        header = read_header(data)
        events.append(
            {
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "study_instance_uid": header.study_instance_uid,
                "series_instance_uid": header.series_instance_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                **header.fields,
                "size_bytes": len(data),
                "sha256": "0" * 64,
                "landing_path": f"bench/{header.sop_instance_uid}.dcm",
                "landing_uri": f"file:///bench/{header.sop_instance_uid}.dcm",
                "received_at": datetime.now(UTC),
                "source": "IMPORT",
                "calling_ae": "BENCH",
                "called_ae": "DIANA",
            }
        )
    return events


def numbered(template: dict[str, Any], i: int) -> dict[str, Any]:
    """Event ``i``: the template with a SOP Instance UID of its own and study ``i // STUDY_SIZE``."""
    sop, study = f"1.2.826.0.1.3680043.10.1131.{i}", f"1.2.826.0.1.3680043.10.1132.{i // STUDY_SIZE}"
    event = dict(template, sop_instance_uid=sop, study_instance_uid=study)
    header = template.get("header_json")
    if header:
        event["header_json"] = header.replace(template["sop_instance_uid"], sop).replace(
            template["study_instance_uid"], study
        )
    return event


def fill(cfg: Any, templates: list[dict[str, Any]], n: int) -> int:
    """Produce ``n`` events to dicom.instances; return their total size in bytes."""
    from diana.clients import kafka_producer
    from diana.schemas.codec import default_codec

    codec = default_codec()
    producer = kafka_producer(cfg.kafka, {"acks": "all", "linger.ms": 20, "batch.size": 1_000_000})
    size = 0
    for i in range(n):
        event = numbered(templates[i % len(templates)], i)
        size += produce_instance_event(producer, codec, event)
    if producer.flush(120) > 0:
        raise RuntimeError("events not acknowledged")
    return size


def reindex(
    config: Path, progress: bool, profile_to: Path | None = None, tree: Path = REPO, processes: int | None = None
) -> tuple[float, str, float]:
    """Run `diana reindex --kinds instances` of the checkout ``tree`` (its .venv; under py-spy if
    ``profile_to``); (seconds, its output, its CPU seconds, its catch-up processes' included)."""
    python = str(tree / ".venv" / "bin" / "python") if tree != REPO else sys.executable
    cmd = [python, "-m", "diana.cli", "--config", str(config), "reindex", "--kinds", "instances"]
    if processes is not None:
        cmd += ["--processes", str(processes)]
    if not progress:
        cmd.append("--no-progress")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    profiler = Profiler(proc.pid, profile_to, rate=100) if profile_to is not None else None
    if profiler is not None:
        time.sleep(0.5)  # the child has exec'd the interpreter: py-spy finds a Python process
        profiler.start()
    stdout, stderr = proc.communicate()
    seconds = time.monotonic() - started
    if profiler is not None:
        profiler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    return seconds, stdout, cpu


def opensearch_cpu(stack: Any) -> float:
    """CPU seconds OpenSearch (its process and children) has used so far."""
    return _proc_stats(int(stack.opensearch.pid_file.read_text().strip()))[0]


def drop_unaliased(cfg: Any) -> None:
    """Delete the instance index versions no alias points to (former runs'): each run indexes alone."""
    from diana.clients import opensearch_client
    from diana.schemas.layout import IndexLayout

    alias = IndexLayout(cfg.opensearch.index_prefix).alias("instances")
    client = opensearch_client(cfg.opensearch, timeout=120)
    for name, info in client.indices.get(index=f"{alias}-v*").items():
        if alias not in info.get("aliases", {}):
            client.indices.delete(index=name)


def bulk_floor(
    cfg: Any,
    templates: list[dict[str, Any]],
    n: int,
    threads: int,
    max_bytes: int,
    translog: str = "request",
    header: bool = True,
) -> dict[str, Any]:
    """OpenSearch's own bulk rate for the same documents, bodies prepared beforehand.

    ``translog``: the new index's ``index.translog.durability``; ``header``: False drops the DICOM JSON
    header from each document (what the header alone costs OpenSearch)."""
    from diana.clients import opensearch_client
    from diana.schemas.layout import IndexLayout
    from diana.sinks.opensearch import _TEMPLATES, _document

    layout = IndexLayout(cfg.opensearch.index_prefix)
    client = opensearch_client(cfg.opensearch, timeout=120)
    # Outside the aliases' versions (`<alias>-vN`), with the same settings and mapping as a version.
    index = f"{layout.alias('instances')}-bench-floor"
    if client.indices.exists(index=index):
        client.indices.delete(index=index)
    client.indices.create(index=index, body=json.loads((_TEMPLATES / "instances.json").read_text()))
    settings = {"refresh_interval": "-1", "translog.durability": translog}
    client.indices.put_settings(index=index, body={"index": settings})
    bodies: list[bytes] = []
    lines: list[bytes] = []
    size = 0
    for i in range(n):
        event = numbered(templates[i % len(templates)], i)
        if not header:
            event["header_json"] = None
        doc = _document(event)
        lines += [json.dumps({"create": {"_index": index, "_id": event["sop_instance_uid"]}}).encode(), doc]
        size += len(doc)
        if size >= max_bytes:
            bodies.append(b"\n".join(lines) + b"\n")
            lines, size = [], 0
    if lines:
        bodies.append(b"\n".join(lines) + b"\n")
    host, port = cfg.opensearch.url.split("//", 1)[1].rsplit(":", 1)

    def post(body: bytes) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request("POST", "/_bulk", body, {"Content-Type": "application/x-ndjson"})
        answer = json.loads(conn.getresponse().read())
        conn.close()
        if answer.get("errors"):
            raise RuntimeError("bulk errors in the floor run")

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, bodies))
    seconds = time.monotonic() - started
    client.indices.refresh(index=index)
    count = client.count(index=index)["count"]
    client.indices.delete(index=index)
    return {
        "translog": translog,
        "header": header,
        "max_bytes": max_bytes,
        "documents": count,
        "requests": len(bodies),
        "threads": threads,
        "megabytes": round(sum(map(len, bodies)) / 1e6, 1),
        "seconds": round(seconds, 2),
        "events_per_s": round(count / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reindex", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="events in dicom.instances (default 20000)")
    ap.add_argument(
        "--port-offset",
        type=int,
        default=4050,
        help="shift of the test suite's ports (default 4050: beside the tests of offset 4000)",
    )
    ap.add_argument("--runs", type=int, default=1, help="timed reindex runs, one after the other (default 1)")
    ap.add_argument("--progress", action="store_true", help="time the runs with the progress bar on")
    ap.add_argument(
        "--compare",
        type=Path,
        help="another checkout with its own .venv (e.g. before a change): each run times it, then this tree",
    )
    ap.add_argument("--profile", action="store_true", help="one more reindex under py-spy; print its top frames")
    ap.add_argument(
        "--processes",
        default="",
        metavar="N,M",
        help="alternate runs with these `diana reindex --processes` counts (default: the command's own)",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="OpenSearch's own bulk rate for the same documents, after each round of runs",
    )
    ap.add_argument("--floor-threads", type=int, default=4, help="bare bulk requests in flight (default 4)")
    ap.add_argument(
        "--floor-variants",
        action="store_true",
        help="the floor also with translog durability async, without the header, and at other request sizes",
    )
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--work", type=Path, help="this folder (kept) instead of a temporary one: its stack can be reused")
    ap.add_argument("--keep-stack", action="store_true", help="leave Kafka and OpenSearch running (with --work)")
    ap.add_argument("--no-fill", action="store_true", help="reuse the events of a former run in --work's stack")
    args = ap.parse_args(argv)

    from diana.compose.local.stack import LocalStack
    from diana.config import load_config

    if (args.keep_stack or args.no_fill) and not args.work:
        ap.error("--keep-stack and --no-fill need --work")
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="diana-bench-reindex-"))
    work.mkdir(parents=True, exist_ok=True)
    compile_bytecode()
    config = work / "diana.toml"
    config.write_text(_config_text(work, args.port_offset))
    cfg = load_config(config, environ={})
    stack = LocalStack(cfg)
    result: dict[str, Any] = {"events": args.events, "when": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        templates = template_events(work / "corpus", 16, 4)
        if not args.no_fill:
            stack.reset()
        stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
        subprocess.run(
            [sys.executable, "-m", "diana.cli", "--config", str(config), "topics"],
            check=True,
            cwd=REPO,
            env=env,
            capture_output=True,
        )
        if not args.no_fill:
            started = time.monotonic()
            size = fill(cfg, templates, args.events)
            result["fill"] = {"megabytes": round(size / 1e6, 1), "seconds": round(time.monotonic() - started, 1)}
            print(f"filled dicom.instances: {args.events} events, {size / 1e6:.1f} MB", flush=True)
        result["runs"] = []
        # Compared trees alternate run by run: on a shared machine the load moves within minutes.
        trees = [args.compare.resolve(), REPO] if args.compare else [REPO]
        counts: list[int | None] = [int(n) for n in args.processes.split(",") if n.strip()] or [None]
        for _ in range(args.runs):
            for tree, processes in [(t, n) for t in trees for n in counts]:
                drop_unaliased(cfg)
                load = os.getloadavg()[0]
                os_cpu = opensearch_cpu(stack)
                seconds, out, cpu = reindex(config, args.progress, tree=tree, processes=processes)
                os_cpu = opensearch_cpu(stack) - os_cpu
                rate = args.events / seconds
                # CPU per event of the reindex process and of OpenSearch: the rate 2 idle cores would allow.
                run = {
                    "tree": str(tree),
                    "processes": processes,
                    "seconds": round(seconds, 2),
                    "events_per_s": round(rate),
                    "load_1m": load,
                    "reindex_cpu_us": round(1e6 * cpu / args.events),
                    "opensearch_cpu_us": round(1e6 * os_cpu / args.events),
                }
                result["runs"].append(run)
                label = f"{tree}" + (f", --processes {processes}" if processes is not None else "")
                print(f"reindex [{label}]: {args.events} events in {seconds:.2f} s = {rate:.0f}/s (load {load:.2f})")
                print(f"  CPU per event: reindex {run['reindex_cpu_us']} us, OpenSearch {run['opensearch_cpu_us']} us")
                print(out.strip(), flush=True)
            if args.floor:  # each round: the runs' ratio to the floor is measured under the same load
                os_cpu = opensearch_cpu(stack)
                floor = bulk_floor(cfg, templates, args.events, args.floor_threads, cfg.sinks.bulk_max_bytes)
                floor["opensearch_cpu_us"] = round(1e6 * (opensearch_cpu(stack) - os_cpu) / args.events)
                result.setdefault("floors", []).append(floor | {"load_1m": os.getloadavg()[0]})
                print(f"bare bulk floor: {floor}", flush=True)
        if args.profile:
            drop_unaliased(cfg)
            folded = work / "reindex.folded"
            seconds, _, _ = reindex(config, args.progress, folded)
            summary = summarise_folded(folded.read_text(), top=15)
            result["profile"] = {"seconds": round(seconds, 2)} | summary
            print(f"profiled run: {seconds:.2f} s, {summary['samples']} samples")
            for own, inc in zip(summary["own"], summary["inclusive"], strict=False):
                print(f"  {own['percent']:5.1f} {own['frame']:70.70} | {inc['percent']:5.1f} {inc['frame']}")
        if args.floor_variants:
            result["floor_variants"] = []
            for threads, max_bytes, translog, header in [
                (4, cfg.sinks.bulk_max_bytes, "async", True),
                (4, cfg.sinks.bulk_max_bytes, "request", False),
                (2, cfg.sinks.bulk_max_bytes, "request", True),
                (8, 1_000_000, "request", True),
                (4, 20_000_000, "request", True),
            ]:
                variant = bulk_floor(cfg, templates, args.events, threads, max_bytes, translog, header)
                result["floor_variants"].append(variant)
                print(f"bare bulk variant: {variant}", flush=True)
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(f"load average at the end: {result['load_average']}")
    finally:
        if not args.keep_stack:
            stack.stop()
            shutil.rmtree(stack._opensearch_dir(), ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
