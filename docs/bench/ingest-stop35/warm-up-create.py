"""Warm-up variant: copies of the instance documents written with create ops, 4 requests of 500 in flight."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from opensearchpy import OpenSearch

url, alias, documents, op = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = OpenSearch(hosts=[url], timeout=120)
index = next(iter(client.indices.get_alias(name=alias)))
mapping = client.indices.get_mapping(index=index)[index]["mappings"]
hits = client.search(index=alias, body={"size": 10_000, "query": {"match_all": {}}})["hits"]["hits"]
scratch = "bench-jvm-warm-up"
client.indices.delete(index=scratch, ignore_unavailable=True)
client.indices.create(
    index=scratch, body={"settings": {"number_of_replicas": 0, "refresh_interval": "-1"}, "mappings": mapping}
)


def post(start):
    lines = []
    for n in range(start, min(start + 500, documents)):
        lines += [{op: {"_index": scratch, "_id": str(n)}}, hits[n % len(hits)]["_source"]]
    r = client.bulk(body=lines)
    assert not r.get("errors")


t = time.time()
with ThreadPoolExecutor(4) as pool:
    list(pool.map(post, range(0, documents, 500)))
client.indices.delete(index=scratch)
print("warm-up", op, documents, round(time.time() - t, 1), "s")
