import copy
import io
import json
import time

import fastavro
from confluent_kafka import Consumer

from diana.config import load_config
from diana.schemas.codec import default_codec
from diana.schemas.field_decoder import FieldDecoder

cfg = load_config("/tmp/rx36/diana.toml", environ={})
c = Consumer(
    {
        "bootstrap.servers": cfg.kafka.bootstrap,
        "group.id": "x-dec",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
)
c.subscribe(["dicom.instances"])
msgs = []
while len(msgs) < 2000:
    m = c.poll(5)
    if m is None:
        break
    if m.error() is None:
        msgs.append(m.value())
c.close()
codec = default_codec()
name, rec = codec.decode(msgs[0])
print(name, len(rec), "fields", len(msgs[0]), "bytes; header", len(rec.get("header_json") or ""))
fields = list(rec)
fd = FieldDecoder(codec, name, fields)


def bench(f, label):
    best = 1e9
    for _ in range(5):
        t = time.process_time()
        for v in msgs:
            f(v)
        best = min(best, (time.process_time() - t) / len(msgs))
    print(f"{label}: {best * 1e6:.1f} us")


bench(lambda v: codec.decode(v, "InstanceArrived"), "codec.decode")
bench(fd.decode if hasattr(fd, "decode") else fd, "field decoder, all fields")
e = codec._by_fingerprint[bytes(msgs[0][2:10])]
bench(lambda v: fastavro.schemaless_reader(io.BytesIO(v[10:]), e.parsed, None), "fastavro bare")
s1 = fastavro.parse_schema({"type": "record", "name": "X", "fields": [{"name": "a", "type": "long"}]})
b1 = b"\x02"
t = time.process_time()
for _ in range(100000):
    fastavro.schemaless_reader(io.BytesIO(b1), s1, None)
print("1-field call", (time.process_time() - t) / 100000 * 1e6, "us")
# which fields cost: drop logical types
raw = copy.deepcopy(e.raw)


def strip(s):
    if isinstance(s, dict):
        s.pop("logicalType", None)
        for v in s.values():
            strip(v)
    elif isinstance(s, list):
        for v in s:
            strip(v)


strip(raw)
p2 = fastavro.parse_schema(raw, named_schemas={})
bench(lambda v: fastavro.schemaless_reader(io.BytesIO(v[10:]), p2, None), "fastavro no logical types")
print([(f["name"], f["type"]) for f in e.raw["fields"] if "logicalType" in json.dumps(f)])
