"""python -m bench.nodes: ingest and aggregation rate with one node against two, in one run, on one cluster.

A node is one receiver, one aggregates worker, one archive sink and one OpenSearch sink, each a
separate "host" (bench/hosts.py: own folder and configuration; landing and archive on S3Proxy), on
the local cluster mode (3 brokers, 2 OpenSearch nodes; one dose worker throughout). The cluster is
started once; then phase 1 runs node 1 alone and phase 2 adds node 2. Each phase:

1. sends a corpus of the same shape (CT studies of 50 instances, fresh UIDs) over --associations
   associations, spread round robin over the phase's receivers, with the aggregates workers stopped:
   the ingest rate is instances acknowledged per second, and acknowledged and archived per second
   (until the archive sinks' group has committed everything); the OpenSearch sinks likewise;
2. then starts the phase's aggregates workers on that backlog (start-up and drain reported; a
   few hundred events drain within one poll, so this is no rate);
3. checks the fault suite's invariants (archived byte-identical, indexed once, aggregates exact,
   nothing left in landing/, lag 0).

Then the aggregation rate, with everything but the aggregates workers stopped: --aggregation-events
header-less events (bench.stream_soak's writer: series of 100 CT instances, two series a study, new
UIDs for each batch) are written to dicom.instances, and one worker, then (on a second batch of the
same shape) two workers drain them: events over the time from the first committed progress to a lag
of 0, start-up apart.

The load average is sampled every second. On a machine with fewer cores than processes two nodes
cannot double anything: read the rates with the load beside them (docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.faults import PORTS, REPO, Outcome
from bench.hosts import NodesSuite
from tests.support.helpers import group_lag


@dataclass
class Phase:
    nodes: int
    instances: int
    label: str
    acknowledged: int = 0
    failed_attempts: int = 0
    send_s: float = 0.0
    acknowledged_per_s: float = 0.0
    archive_lag_at_end_of_send: int = 0
    archived_s: float = 0.0
    archived_per_s: float = 0.0
    indexed_s: float = 0.0
    indexed_per_s: float = 0.0
    aggregation_backlog: int = 0
    aggregates_startup_s: float = 0.0
    aggregation_s: float = 0.0
    load_min: float = 0.0
    load_max: float = 0.0
    load_mean: float = 0.0
    invariants: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass
class Aggregation:
    workers: int
    events: int
    startup_s: float = 0.0
    drain_s: float = 0.0
    events_per_s: float = 0.0
    load_mean: float = 0.0
    load_max: float = 0.0


class LoadSampler:
    """The 1-minute load average, every second, while running."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.values.append(os.getloadavg()[0])
            self._stop.wait(1.0)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_members(suite: NodesSuite, group: str, members: int, timeout: float = 120.0) -> None:
    """Until ``group`` has ``members`` consumers (a new sink has joined and got partitions)."""
    from diana.clients import kafka_admin

    admin = kafka_admin(suite.cfg.kafka)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = admin.describe_consumer_groups([group])[group].result(timeout=10)
            if len(found.members) >= members and str(found.state).endswith("STABLE"):
                return
        except Exception:  # the group is coordinated by a broker that is busy: ask again
            pass
        time.sleep(1.0)
    raise RuntimeError(f"group {group} did not reach {members} members in {timeout:.0f} s")


def instances_lag(suite: NodesSuite, group: str) -> int:
    from diana.schemas.topics import INSTANCES

    return group_lag(suite.cfg, group, [INSTANCES.name])


def wait_lag_zero(suite: NodesSuite, group: str, timeout: float) -> float:
    """Seconds (monotonic) when ``group`` has committed all of dicom.instances."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if instances_lag(suite, group) == 0:
            return time.monotonic()
        problems = suite.exited()
        if problems:
            raise RuntimeError("; ".join(problems))
        time.sleep(0.5)
    raise RuntimeError(f"{group} not caught up after {timeout:.0f} s")


def run_phase(suite: NodesSuite, nodes: int, instances: int, timeout: float, label: str = "") -> Phase:
    cfg = suite.cfg
    phase = Phase(nodes, instances, label or f"{nodes} node{'s' if nodes > 1 else ''}")
    suite.instances = instances
    for node in range(1, nodes + 1):
        for role in ("receiver", "archive-sink", "opensearch-sink"):
            if f"{role}-{node}" not in suite.procs:
                suite.start_process(f"{role}-{node}")
    suite.wait_echo()
    for group in (cfg.sinks.archive_group, cfg.sinks.opensearch_group):
        wait_members(suite, group, nodes)
    files = suite.corpus(phase.label.replace(" ", ""))
    corpus = suite.describe(files)
    acked: set = set()
    attempts = [0]
    with LoadSampler() as load:
        started = time.monotonic()
        suite.send(files, acked, attempts, started + timeout, threading.Event())
        sent = time.monotonic()
        phase.acknowledged, phase.failed_attempts = len(acked), attempts[0] - len(acked)
        phase.send_s = round(sent - started, 1)
        phase.acknowledged_per_s = round(len(acked) / (sent - started), 1)
        phase.archive_lag_at_end_of_send = instances_lag(suite, cfg.sinks.archive_group)
        archived = wait_lag_zero(suite, cfg.sinks.archive_group, timeout)
        indexed = wait_lag_zero(suite, cfg.sinks.opensearch_group, timeout)
        phase.archived_s, phase.indexed_s = round(archived - started, 1), round(indexed - started, 1)
        phase.archived_per_s = round(len(acked) / (archived - started), 1)
        phase.indexed_per_s = round(len(acked) / (indexed - started), 1)

        names = [f"aggregates-{node}" for node in range(1, nodes + 1)]
        phase.aggregation_backlog, phase.aggregates_startup_s, phase.aggregation_s = drain(suite, names, timeout)
    values = load.values or [os.getloadavg()[0]]
    phase.load_min, phase.load_max = round(min(values), 1), round(max(values), 1)
    phase.load_mean = round(sum(values) / len(values), 1)
    outcome = Outcome(f"nodes-{nodes}")
    deadline = time.monotonic() + timeout
    while True:
        problems = suite.check(corpus, acked, outcome)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    phase.problems = problems
    phase.invariants = "hold" if not problems else "FAIL"
    # The aggregates workers stop: the next phase starts its own on its own backlog.
    stop(suite, names)
    return phase


def drain(suite: NodesSuite, names: list[str], timeout: float) -> tuple[int, float, float]:
    """Start the aggregates workers ``names`` on the group's backlog: (backlog, start-up s, drain s)."""
    group = suite.cfg.stream.app_id
    backlog = instances_lag(suite, group)
    woken = time.monotonic()
    for name in names:
        suite.start_process(name)
    first = 0.0
    deadline = woken + timeout
    while time.monotonic() < deadline:
        left = instances_lag(suite, group)
        if not first and left < backlog:
            first = time.monotonic()
        if left == 0:
            break
        problems = suite.exited()
        if problems:
            raise RuntimeError("; ".join(problems))
        time.sleep(0.25)
    else:
        raise RuntimeError(f"{group} not caught up after {timeout:.0f} s")
    done = time.monotonic()
    return backlog, round(first - woken, 1), round(done - first, 1)


def stop(suite: NodesSuite, names: list[str]) -> None:
    for name in names:
        proc = suite.procs.pop(name)
        proc.terminate()
        proc.wait(60)


def aggregation(suite: NodesSuite, workers: int, events: int, timeout: float) -> Aggregation:
    from bench.stream_soak import write_events

    result = Aggregation(workers, events)
    write_events(suite.cfg, events, per_series=100, span_s=120, root=f"1.2.826.0.1.3680043.10.1234.{workers}")
    names = [f"aggregates-{n}" for n in range(1, workers + 1)]
    with LoadSampler() as load:
        backlog, result.startup_s, result.drain_s = drain(suite, names, timeout)
    result.events = backlog
    result.events_per_s = round(backlog / max(result.drain_s, 0.25), 1)
    values = load.values or [os.getloadavg()[0]]
    result.load_mean, result.load_max = round(sum(values) / len(values), 1), round(max(values), 1)
    stop(suite, names)
    return result


def render(phases: list[Phase], args: argparse.Namespace, aggregations: list[Aggregation] | None = None) -> str:
    rows = [
        "| nodes | instances | acknowledged/s | acknowledged and archived/s | indexed/s | archive lag at end of send "
        "| aggregates: start-up s, then backlog drained in s | load average min/mean/max | invariants |",
        "|" + "---|" * 9,
    ]
    for p in phases:
        rows.append(
            f"| {p.nodes} | {p.acknowledged}/{p.instances} | {p.acknowledged_per_s} ({p.send_s} s) "
            f"| {p.archived_per_s} ({p.archived_s} s) | {p.indexed_per_s} ({p.indexed_s} s) "
            f"| {p.archive_lag_at_end_of_send} | {p.aggregates_startup_s}, then {p.aggregation_backlog} in "
            f"{p.aggregation_s} s | {p.load_min}/{p.load_mean}/{p.load_max} "
            f"| {p.invariants}{': ' + '; '.join(p.problems) if p.problems else ''} |"
        )
    rows += [
        "",
        "| aggregates workers | events | events/s | start-up s | load average mean/max |",
        "|---|---|---|---|---|",
    ]
    for a in aggregations or []:
        rows.append(
            f"| {a.workers} | {a.events} | {a.events_per_s} ({a.drain_s} s) | {a.startup_s} | {a.load_mean}/{a.load_max} |"
        )
    return (
        f"Run: `python -m bench.nodes --instances {args.instances} --associations {args.associations} "
        f"--warmup {args.warmup} --aggregation-events {args.aggregation_events}"
        f"{f' --port-shift {args.port_shift}' if args.port_shift else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores\n\n" + "\n".join(rows) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500, help="instances per phase (default 500)")
    parser.add_argument("--associations", type=int, default=4, help="parallel associations (default 4)")
    parser.add_argument(
        "--port-shift",
        type=int,
        default=0,
        help="add this to every port (as bench.faults: Kafka 27092, OpenSearch 27200, S3Proxy 27090, receivers "
        "27112/27113); keep the result below 32768",
    )
    parser.add_argument(
        "--warmup", type=int, default=100, help="instances sent to node 1 first, not measured (default 100)"
    )
    parser.add_argument(
        "--aggregation-events",
        type=int,
        default=20000,
        help="header-less events per aggregation batch, one worker then two (default 20000)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per step, seconds (default 600)")
    parser.add_argument("--out", default=str(REPO / "var" / "nodes"), help="results.json and results.md here")
    args = parser.parse_args(argv)
    for name in PORTS:
        PORTS[name] += args.port_shift
    work = Path(tempfile.mkdtemp(prefix="diana-nodes-"))
    suite = NodesSuite(work, short=True, instances=args.instances, associations=args.associations, nodes=2)
    phases: list[Phase] = []
    aggregations: list[Aggregation] = []
    try:
        started = time.monotonic()
        suite.start(["dose-1", "receiver-1"])
        print(f"cluster and S3Proxy started in {time.monotonic() - started:.0f} s", flush=True)
        # Not measured: the first instances pay for index creation, connections and the JVMs' warm-up.
        if args.warmup:
            print(json.dumps(asdict(run_phase(suite, 1, args.warmup, args.timeout, "warm-up"))), flush=True)
        for nodes in (1, 2):
            phase = run_phase(suite, nodes, args.instances, args.timeout)
            print(json.dumps(asdict(phase)), flush=True)
            phases.append(phase)
        # Only the aggregates workers from here: the sinks and the dose worker would compete for the
        # cores and take the header-less events (which have no landed object) as their own.
        stop(suite, [name for name in suite.procs])
        for workers in (1, 2):
            result = aggregation(suite, workers, args.aggregation_events, args.timeout)
            print(json.dumps(asdict(result)), flush=True)
            aggregations.append(result)
    finally:
        suite.stop_all()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(
                {"phases": [asdict(p) for p in phases], "aggregation": [asdict(a) for a in aggregations]}, indent=1
            )
        )
        (out / "results.md").write_text(render(phases, args, aggregations))
        if os.environ.get("DIANA_FAULTS_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
    return 0 if len(aggregations) == 2 and all(p.invariants == "hold" for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
