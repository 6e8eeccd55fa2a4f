"""Memory of the aggregates worker's state per instance: open series against completed (compacted) ones.

    python -m bench.state_size [--events 100000] [--per-series 100]

No broker: the worker's handler folds real encoded InstanceArrived events into a real ``Batch``
(the transactional producer replaced by a sink that drops what it is given). All events arrive
within one second, so every series is open (one ``seen`` entry per instance, what the worker kept
for every instance before bounded state); then one event an hour later completes them all (each
series compacted to a digest and instance-number runs). Python's tracemalloc measures the state
(``_Store``) at both points.
"""

from __future__ import annotations

import argparse
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

from tqdm import tqdm

from bench.stream_soak import soak_event


class _Dropped:
    def produce(self, *args: Any, **kwargs: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state_size", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="instances (default 100000)")
    ap.add_argument("--per-series", type=int, default=100, help="instances per series (default 100)")
    args = ap.parse_args(argv)

    from confluent_kafka import Message

    from diana.schemas.codec import default_codec
    from diana.schemas.topics import INSTANCES
    from diana.stream_apps.aggregates import AggregatesHandler
    from diana.stream_apps.batch import Batch, _Store
    from diana.stream_apps.completeness import QuietTimes

    codec, store, producer = default_codec(), _Store(), _Dropped()
    handler = AggregatesHandler(QuietTimes.parse("*=30"), retention_days=30)
    handler.partition_started(0, {INSTANCES.name: 0}, store.partitions.setdefault(0, {}))
    start = datetime.now(UTC) - timedelta(hours=2)

    def feed(offset: int, event: dict[str, Any], batch: Batch) -> None:
        stamp = int(event["received_at"].timestamp() * 1000)
        value = codec.encode(INSTANCES.value_schema, event)
        handler.handle(
            batch, Message(topic=INSTANCES.name, partition=0, offset=offset, value=value, timestamp=(2, stamp))
        )
        batch.message_done()

    def event(i: int, at: datetime) -> dict[str, Any]:
        return soak_event(i, args.per_series, at)

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for first in tqdm(range(0, args.events, 500), desc="batches", unit="batch", mininterval=2):
        batch = Batch(store, producer, "changelog")
        for i in range(first, min(first + 500, args.events)):
            feed(i, event(i, start + timedelta(milliseconds=i * 1000 // args.events)), batch)
        batch.commit_locally()
    del batch
    open_bytes = tracemalloc.get_traced_memory()[0] - base
    counts_open = {k: len(v) for k, v in store.partitions[0].items()}
    batch = Batch(store, producer, "changelog")
    feed(args.events, event(args.events, start + timedelta(hours=1)), batch)  # a new series, an hour later
    batch.commit_locally()
    del batch  # its record of the deletions is not state
    done_bytes = tracemalloc.get_traced_memory()[0] - base
    counts_done = {k: len(v) for k, v in store.partitions[0].items()}
    print(f"{args.events} instances, {args.per_series} per series")
    print(
        f"all series open:      {open_bytes / 1e6:8.1f} MB  {open_bytes / args.events:6.0f} B/instance  {counts_open}"
    )
    print(
        f"all series completed: {done_bytes / 1e6:8.1f} MB  {done_bytes / args.events:6.0f} B/instance  {counts_done}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
