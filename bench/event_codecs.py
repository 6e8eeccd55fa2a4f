"""CPU per instance event of Kafka's compression codecs, as the pipeline writes and reads the events.

The receiver sends each event in its own produce request and waits for its acknowledgement (one
association at a time), so a codec's fixed cost per batch is paid per event; every consumer pays
the decompression again. For each codec, on a topic of its own (``compression.type=producer``, one
partition) of the Kafka at ``--bootstrap``: ``--events`` InstanceArrived events built from the
headers of a generated corpus (as ``bench.reindex`` builds them) are produced one by one with the
receiver's producer settings, then read back by a fresh consumer; the CPU time of this process over
each phase, divided by the events, is printed with the wall time and the compressed size.

    python -m bench.event_codecs --bootstrap 127.0.0.1:9092 [--events 3000] [--codecs gzip,lz4,...]

Needs a running Kafka (``diana stack start``, or a bench's kept stack); writes nothing else.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import uuid
from pathlib import Path

DEFAULT_CODECS = "gzip,lz4,zstd,snappy,none"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _events(count: int) -> list[bytes]:
    """``count`` encoded InstanceArrived events from a small generated corpus."""
    from bench.reindex import numbered, template_events
    from diana.schemas.codec import default_codec
    from diana.schemas.topics import INSTANCES

    codec = default_codec()
    with tempfile.TemporaryDirectory(prefix="diana-codecs-") as root:
        templates = template_events(Path(root), 8, 2)
    return [codec.encode(INSTANCES.value_schema, numbered(templates[i % len(templates)], i)) for i in range(count)]


def measure(bootstrap: str, codec: str, values: list[bytes]) -> dict[str, float]:
    """Produce ``values`` one by one with ``codec``, read them back; CPU and wall per event."""
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"bench-codec-{codec}-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, 1, 1, config={"compression.type": "producer"})])[topic].result()
    try:
        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 0,
                "compression.type": codec,
                "socket.nagle.disable": True,
            }
        )
        producer.produce(topic, b"first")  # the producer id and connections, outside the timing
        producer.flush(30)
        cpu, wall = _cpu_s(), time.monotonic()
        for value in values:  # each acknowledged before the next, as over one association
            producer.produce(topic, value=value)
            producer.flush(30)
        produce_cpu, produce_wall = _cpu_s() - cpu, time.monotonic() - wall
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}", "enable.partition.eof": True}
        )
        consumer.assign([TopicPartition(topic, 0, 1)])
        cpu, wall = _cpu_s(), time.monotonic()
        read, at_end = 0, False
        while not at_end:
            for msg in consumer.consume(2000, 0.05):
                if msg.error() is None:
                    read += 1
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end = read >= len(values)
        consume_cpu, consume_wall = _cpu_s() - cpu, time.monotonic() - wall
        consumer.close()
    finally:
        admin.delete_topics([topic])
    n = len(values)
    return {
        "produce_cpu_us": produce_cpu / n * 1e6,
        "produce_wall_us": produce_wall / n * 1e6,
        "consume_cpu_us": consume_cpu / n * 1e6,
        "consume_wall_us": consume_wall / n * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.event_codecs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="a running Kafka, host:port")
    ap.add_argument("--events", type=int, default=3000, help="events per codec (default 3000)")
    ap.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma-separated (default {DEFAULT_CODECS})")
    args = ap.parse_args(argv)
    import zlib

    import cramjam

    values = _events(args.events)
    raw = sum(map(len, values)) / len(values)
    sizes = {
        "gzip": sum(len(zlib.compress(v, 6)) for v in values) / len(values),
        "lz4": sum(len(bytes(cramjam.lz4.compress(v))) for v in values) / len(values),  # a frame, as Kafka sends
        "zstd": sum(len(bytes(cramjam.zstd.compress(v, 3))) for v in values) / len(values),
        "snappy": sum(len(bytes(cramjam.snappy.compress_raw(v))) for v in values) / len(values),
        "none": raw,
    }
    print(f"{len(values)} events of {raw:.0f} bytes on average")
    print(
        "| codec | produce CPU µs/event | produce wall µs/event | consume CPU µs/event | bytes/event compressed alone |"
    )
    print("|---|---:|---:|---:|---:|")
    for codec in args.codecs.split(","):
        m = measure(args.bootstrap, codec, values)
        print(
            f"| {codec} | {m['produce_cpu_us']:.1f} | {m['produce_wall_us']:.0f} | {m['consume_cpu_us']:.1f} "
            f"| {sizes.get(codec, float('nan')):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
