"""Where one instance's time goes in the receiver: a timeline per C-STORE (issue 19).

Runs a Kafka of its own (no OpenSearch, no workers, no sinks) and the receiver in this process with
timestamps taken around each step of the C-STORE path, feeds it N CT slices of 0.5 MB from dcmtk
``storescu`` over one association, and prints the median and p90 of each step:

    first fragment → last fragment written → handler entered → header read (the file fsync'd beside
    it) → landed (hard link + folder fsync) → event produced → delivery report → publisher woke →
    handler returned → response bytes sent → next request's first fragment

The wrappers are added here only; the receiver's code is unchanged by them.

    .venv/bin/python -m bench.receiver_timeline --instances 200 --port-offset 1000
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from diana.config import load_config

_STEPS = [
    ("first_fragment", "last_fragment", "data set arriving (storescu → file)"),
    ("last_fragment", "handler", "last fragment → C-STORE handler called"),
    # The received file is fsync'd in a helper thread while the header is read (producers/scp.py):
    # these two spans overlap, and only the first is on the instance's path.
    ("handler", "header", "header read (the fsync beside it)"),
    ("handler", "synced", "fsync of the received file (beside the header read)"),
    ("header", "landed", "rest of the fsync, if longer; landing (hard link + folder fsync)"),
    ("landed", "produced", "encode + produce()"),
    ("produced", "delivered", "produce() → delivery report (broker ack + poll)"),
    ("delivered", "woke", "delivery report → publisher's waiter woke"),
    ("woke", "returned", "rest of the handler"),
    ("returned", "response_sent", "handler returned → C-STORE response on the socket"),
    ("response_sent", "next_first_fragment", "response sent → next data set's first fragment"),
]


def _config_text(home: Path, offset: int) -> str:
    return f"""
[kafka]
bootstrap = "127.0.0.1:{19092 + offset}"
partitions = 3
publish_timeout_s = 5

[receiver]
ae_title = "TIMELINE"
host = "127.0.0.1"
port = {11190 + offset}
metrics_port = {19464 + offset}

[storage]
landing_dir = "{home}/landing"
archive_dir = "{home}/archive"
quarantine_dir = "{home}/quarantine"

[stack]
home = "{home}/stack"
kafka_port = {19092 + offset}
kafka_controller_port = {19093 + offset}
opensearch_port = {19200 + offset}
opensearch_transport_port = {19300 + offset}
"""


class Timeline:
    """Timestamps per instance, in the order the receiver handles them (one association)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instances: list[dict[str, float]] = []
        self.current: dict[str, float] = {}

    def mark(self, name: str, first: bool = False) -> None:
        now = time.perf_counter()
        with self.lock:
            if first or not self.instances:
                self.current = {}
                self.instances.append(self.current)
            if first or name not in self.current or name == "last_fragment":
                self.current[name] = now

    def mark_in(self, index: int, name: str) -> None:
        now = time.perf_counter()
        with self.lock:
            self.instances[index].setdefault(name, now)


def _instrument(receiver: Any, line: Timeline) -> None:
    from pynetdicom.transport import AssociationSocket

    from diana.producers import ingest as ingest_module
    from diana.producers import scp as scp_module
    from diana.producers.spill import SpillFile

    state = {"response_pending": -1}

    original_init, original_write, original_sync = SpillFile.__init__, SpillFile.write, SpillFile.sync

    def init(self: SpillFile, **kwargs: Any) -> None:
        original_init(self, **kwargs)
        line.mark("first_fragment", first=True)
        if len(line.instances) > 1:
            line.mark_in(len(line.instances) - 2, "next_first_fragment")

    def write(self: SpillFile, data: bytes) -> int:
        written = original_write(self, data)
        line.mark("last_fragment")
        return written

    def sync(self: SpillFile) -> tuple[str, int]:
        result = original_sync(self)
        line.mark("synced")
        return result

    SpillFile.__init__ = init  # type: ignore[method-assign]
    SpillFile.write = write  # type: ignore[method-assign]
    SpillFile.sync = sync  # type: ignore[method-assign]

    original_handle = scp_module.handle_store

    def handle_store(event: Any, ingest: Any) -> int:
        line.mark("handler")
        status = original_handle(event, ingest)
        line.mark("returned")
        state["response_pending"] = len(line.instances) - 1
        return status

    scp_module.handle_store = handle_store

    original_read = ingest_module.read_header_file

    def read_header_file(*args: Any, **kwargs: Any) -> Any:
        result = original_read(*args, **kwargs)
        line.mark("header")
        return result

    ingest_module.read_header_file = read_header_file

    publisher = receiver.publisher
    original_publish = publisher.publish

    def publish(topic: str, key: bytes, value: bytes) -> float:
        line.mark("landed")
        result = original_publish(topic, key, value)
        line.mark("woke")
        return result

    publisher.publish = publish

    class ProducerProbe:
        def __init__(self, producer: Any) -> None:
            self._producer = producer

        def __getattr__(self, name: str) -> Any:
            return getattr(self._producer, name)

        def produce(self, *args: Any, on_delivery: Any = None, **kwargs: Any) -> None:
            def delivered(err: Any, msg: Any) -> None:
                line.mark("delivered")
                on_delivery(err, msg)

            self._producer.produce(*args, on_delivery=delivered, **kwargs)
            line.mark("produced")

    publisher._producer = ProducerProbe(publisher._producer)

    original_send = AssociationSocket.send

    def send(self: AssociationSocket, bytestream: bytes) -> None:
        original_send(self, bytestream)
        pending = state["response_pending"]
        if pending >= 0 and bytestream[:1] == b"\x04":  # P-DATA-TF: the C-STORE response
            line.mark_in(pending, "response_sent")
            state["response_pending"] = -1

    AssociationSocket.send = send  # type: ignore[method-assign]


def _thread_schedstat() -> dict[int, tuple[int, int]]:
    """(ns on a CPU, ns waiting for one in the run queue) of each thread of this process so far."""
    stats = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            on_cpu, waiting, _ = (int(x) for x in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        stats[int(task.name)] = (on_cpu, waiting)
    return stats


class SchedSampler:
    """The run-queue wait of all this process's threads over a run (threads that end are kept at
    their last sample, taken every 50 ms)."""

    def __init__(self) -> None:
        self.start = _thread_schedstat()
        self.last = dict(self.start)
        self.names: dict[int, str] = {}
        self._name_threads()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sched-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.last.update(_thread_schedstat())
            self._name_threads()

    def _name_threads(self) -> None:
        """Remember what each thread is: Python's name for its own threads (digits dropped, so an
        association's threads add up across associations), the kernel's (librdkafka's rdk:...) else."""
        python = {t.native_id: re.sub(r"[-_ ]?\d+", "", t.name) for t in threading.enumerate()}
        for tid in self.last:
            if tid not in self.names:
                try:
                    kernel = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
                except OSError:
                    continue
                self.names[tid] = python.get(tid) or re.sub(r"\d+", "", kernel)

    def cpu_by_thread(self) -> dict[str, float]:
        """CPU seconds of the run by kind of thread (after ``stop``), largest first."""
        totals: dict[str, float] = {}
        for tid, (on_cpu, _) in self.last.items():
            name = self.names.get(tid, "?")
            totals[name] = totals.get(name, 0.0) + (on_cpu - self.start.get(tid, (0, 0))[0]) / 1e9
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def stop(self) -> tuple[float, float]:
        """(CPU seconds, run-queue wait seconds) of the run."""
        self._stop.set()
        self._thread.join()
        self.last.update(_thread_schedstat())
        self._name_threads()
        cpu = sum(v[0] - self.start.get(t, (0, 0))[0] for t, v in self.last.items())
        wait = sum(v[1] - self.start.get(t, (0, 0))[1] for t, v in self.last.items())
        return cpu / 1e9, wait / 1e9


class GcTimes:
    """Count and duration of the cyclic collector's passes, by generation, while it runs."""

    def __init__(self) -> None:
        self.by_generation = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
        self._started: dict[int, float] = {}
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            self._started[generation] = time.perf_counter()
        elif generation in self._started:
            self.by_generation[generation][0] += 1
            self.by_generation[generation][1] += time.perf_counter() - self._started.pop(generation)

    def stop(self) -> None:
        gc.callbacks.remove(self._observe)

    def __str__(self) -> str:
        return ", ".join(
            f"generation {g}: {n} taking {seconds * 1000:.1f} ms" for g, (n, seconds) in self.by_generation.items()
        )


def _summary(line: Timeline, skip: int) -> list[tuple[str, float, float, float]]:
    rows = []
    instances = [i for i in line.instances[skip:] if "next_first_fragment" in i]
    for start, end, label in _STEPS:
        spans = [(i[end] - i[start]) * 1000 for i in instances if start in i and end in i]
        if spans:
            spans.sort()
            rows.append((label, statistics.mean(spans), statistics.median(spans), spans[int(len(spans) * 0.9)]))
    totals = sorted((i["next_first_fragment"] - i["first_fragment"]) * 1000 for i in instances)
    rows.append(
        (
            "whole instance (first fragment → next first fragment)",
            statistics.mean(totals),
            statistics.median(totals),
            totals[int(len(totals) * 0.9)],
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200, help="CT slices of 0.5 MB to send (default 200)")
    parser.add_argument("--port-offset", type=int, default=1000, help="added to every port (default 1000)")
    parser.add_argument(
        "--stock-send-wait",
        action="store_true",
        help="without the DUL wake-up on queued primitives (reactor.py before issue 19's rx-wait change)",
    )
    parser.add_argument(
        "--py-spy", action="store_true", help="sample the receiver with py-spy meanwhile, as bench.ingest does"
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="the receiver without its gc.freeze() at start (what it cost before)",
    )
    parser.add_argument("--keep-kafka", action="store_true", help="leave the Kafka running (for repeated runs)")
    args = parser.parse_args(argv)

    from diana.clients import kafka_admin
    from diana.compose.local.stack import LocalStack
    from diana.logs import configure_logging
    from diana.producers.scp import Receiver
    from diana.schemas.topics import ensure_topics, topic_settings
    from tests.support.dicomgen import SeriesSpec, make_study

    configure_logging("warning")
    home = Path("var") / f"receiver-timeline-{args.port_offset}"
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()
    config_file = home / "diana.toml"
    config_file.write_text(_config_text(home, args.port_offset))
    config = load_config(config_file, environ={})
    stack = LocalStack(config)
    stack.start_kafka()
    stack.wait_kafka()
    ensure_topics(kafka_admin(config.kafka), config.kafka.partitions, **topic_settings(config.kafka))
    shutil.rmtree(home / "landing", ignore_errors=True)
    corpus = Path(tempfile.mkdtemp(prefix="timeline-"))
    receiver = None
    try:
        make_study(corpus, [SeriesSpec("CT", "TIMELINE", args.instances)], rows=512)
        receiver = Receiver(config)
        if args.stock_send_wait:
            from diana.producers import reactor

            reactor.fast_reactor = lambda dul: setattr(dul, "_run_loop_delay", 0.0)
        if args.no_gc_freeze:
            gc.freeze = lambda: None  # type: ignore[assignment]
        line = Timeline()
        _instrument(receiver, line)
        receiver.start()
        files = sorted(str(p) for p in corpus.rglob("*.dcm"))
        profiler = None
        if args.py_spy:
            from bench.profile import Profiler

            profiler = Profiler(os.getpid(), home / "receiver.folded")
            profiler.start()
            time.sleep(1)  # py-spy attaches
        collections = GcTimes()
        started, sampler = time.perf_counter(), SchedSampler()
        subprocess.run(
            ["/usr/bin/storescu", "-aec", "TIMELINE", "127.0.0.1", str(config.receiver.port), *files],
            check=True,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        wall = time.perf_counter() - started
        cpu, runqueue = sampler.stop()
        collections.stop()
        if profiler is not None:
            profiler.stop()
        n = len(files)
        print(
            f"{n} instances over 1 association in {wall:.2f} s = {wall / n * 1000:.1f} ms each; receiver threads: "
            f"{cpu / n * 1000:.1f} ms on a CPU and {runqueue / n * 1000:.1f} ms waiting for one (run queue) per "
            f"instance; load average {os.getloadavg()}"
        )
        print(
            "CPU per instance by thread (ms): "
            + ", ".join(f"{name} {seconds / n * 1000:.2f}" for name, seconds in sampler.cpu_by_thread().items())
        )
        print(f"Cyclic garbage collections during the run: {collections}")
        print("| step | mean ms | median ms | p90 ms |\n|---|---:|---:|---:|")
        for label, mean, median, p90 in _summary(line, skip=5):
            print(f"| {label} | {mean:.2f} | {median:.2f} | {p90:.2f} |")
    finally:
        if receiver is not None:
            receiver.stop()
        shutil.rmtree(corpus, ignore_errors=True)
        if not args.keep_kafka:
            stack.stop_kafka()
    return 0


if __name__ == "__main__":
    sys.exit(main())
