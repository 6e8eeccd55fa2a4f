"""Refill dicom.instances of a kept bench.reindex stack one event per produce request (the receiver's way)."""

import os
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

from bench.pipeline_steps import produce_instance_event
from bench.reindex import numbered, template_events
from diana.clients import kafka_producer
from diana.config import load_config
from diana.schemas.codec import default_codec

work = Path(sys.argv[1])
n = int(sys.argv[2])
single = sys.argv[3] == "single"
cfg = load_config(work / "diana.toml", environ={})
admin = AdminClient({"bootstrap.servers": cfg.kafka.bootstrap})
for f in admin.delete_topics(["dicom.instances"]).values():
    f.result()
time.sleep(2)
env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
subprocess.run(
    [sys.executable, "-m", "diana.cli", "--config", str(work / "diana.toml"), "topics"],
    check=True,
    env=env,
    capture_output=True,
)
templates = template_events(work / "corpus", 16, 4)
codec = default_codec()
producer = kafka_producer(cfg.kafka, {"acks": "all", "linger.ms": 0 if single else 20, "batch.size": 1_000_000})
t = time.time()
for i in range(n):
    produce_instance_event(producer, codec, numbered(templates[i % len(templates)], i))
    if single:
        producer.flush(10)
producer.flush(60)
print("filled", n, "single" if single else "batched", round(time.time() - t, 1), "s")
