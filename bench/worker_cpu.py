"""CPU per event of the aggregates worker's own Python work, without a broker, as its state grows.

    python -m bench.worker_cpu [--events 1000000] [--chunk 250000]

The events of bench.stream_soak (series of 100 CT instances, two series per study, 4 partitions by
study, event times spread as there so series complete and compact as they do in the soak) are
encoded first; then, timed, what the worker does with them per transaction of 500: decode and fold
(AggregatesHandler), the output records and the changelog records (the transactional producer
replaced by a stand-in that drops them and reports each delivery at once), the commit to the
in-memory store, and the local SQLite files with their checkpoints (cold namespaces on disk, as in
the worker). Prints the CPU microseconds per event for each ``--chunk`` events and overall: a
cost that grew with the state would show as later chunks costing more. Not timed: librdkafka
(fetching, producing), the broker round trips of each transaction, the broker itself.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.cpu_share import own_cpu_s
from bench.stream_soak import SOAK_ROOT, soak_event

_PARTITIONS, _PER_BATCH = 4, 500


class _Producer:
    """Stands in for the transactional producer: drops records, reports each delivery at once."""

    def __init__(self) -> None:
        self.offsets: dict[int, int] = {}

    def produce(self, topic: str, key: Any = None, value: Any = None, partition: Any = None, **kwargs: Any) -> None:
        from confluent_kafka import Message

        if partition is None:  # an output record: dropped
            return
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        if kwargs.get("on_delivery") is not None:
            kwargs["on_delivery"](None, Message(topic=topic, partition=partition, offset=offset))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="InstanceArrived events (default 1000000)")
    ap.add_argument("--chunk", type=int, default=250_000, help="report every this many events (default 250000)")
    args = ap.parse_args(argv)

    from confluent_kafka import Message

    from diana.logs import configure_logging
    from diana.schemas.codec import default_codec
    from diana.schemas.topics import INSTANCES
    from diana.stream_apps.aggregates import COLD, AggregatesHandler
    from diana.stream_apps.batch import Batch
    from diana.stream_apps.completeness import QuietTimes
    from diana.stream_apps.local_state import Checkpoint, LocalStates
    from diana.stream_apps.state_store import StateStore

    configure_logging("warning")  # a line per completed series is not what is measured
    codec, root = default_codec(), SOAK_ROOT
    start, span_s = datetime.now(UTC) - timedelta(hours=2), max(60.0, args.events / 2000)
    messages: list[list[Message]] = [[] for _ in range(_PARTITIONS)]
    for i in tqdm(range(args.events), desc="events encoded", unit="ev", mininterval=2):
        study_no = i // 100 // 2
        at = start + timedelta(seconds=span_s * i / args.events)
        event = soak_event(i, 100, at, root)
        queue = messages[study_no % _PARTITIONS]
        stamp = int(at.timestamp() * 1000) + 5  # the broker's append time, just after
        value = codec.encode(INSTANCES.value_schema, event)
        queue.append(
            Message(
                topic=INSTANCES.name,
                partition=study_no % _PARTITIONS,
                offset=len(queue),
                value=value,
                timestamp=(2, stamp),
            )
        )

    folder = Path(tempfile.mkdtemp(prefix="diana-worker-cpu-"))
    try:
        local = LocalStates(folder, "changelog", COLD)
        store, producer = StateStore(local, COLD), _Producer()
        handler = AggregatesHandler(QuietTimes.parse("*=30"), retention_days=30)
        for partition in range(_PARTITIONS):
            handler.partition_started(partition, {INSTANCES.name: 0}, {})
            local.write(partition, [], Checkpoint(0, 0))  # an empty file, as after a first restore
            store.backed.add(partition)
        per_partition = _PER_BATCH // _PARTITIONS
        done, positions = 0, [0] * _PARTITIONS
        began = chunk_began = own_cpu_s()
        chunk_from = 0
        while done < args.events:
            batch = Batch(store, producer, "changelog")
            for partition in range(_PARTITIONS):
                for message in messages[partition][positions[partition] : positions[partition] + per_partition]:
                    handler.handle(batch, message)
                    batch.message_done()
                    done += 1
                positions[partition] += per_partition
            batch.send_latest()
            batch.write_changelog()
            batch.commit_locally()
            for partition in batch.sent:  # as TransactionalLoop._write_local after the commit
                checkpoint = Checkpoint(batch.last_offset[partition] + 1, 0)
                if local.write(partition, batch.encoded.get(partition, []), checkpoint, encoded=True):
                    store.evict(partition)
            if done - chunk_from >= args.chunk or done >= args.events:
                now = own_cpu_s()
                per_event_us = (now - chunk_began) / (done - chunk_from) * 1e6
                print(f"events {chunk_from:>10,} to {done:>10,}: {per_event_us:6.1f} µs of CPU per event", flush=True)
                chunk_began, chunk_from = now, done
        total = own_cpu_s() - began
        print(
            f"all {args.events:,} events: {total:.1f} CPU s, {total / args.events * 1e6:.1f} µs per event, "
            f"{args.events / total:,.0f} events per CPU-second"
        )
        local.close_all()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
