"""Steps several benches take the same way: the tree's bytecode compiled as an installation has it, an
InstanceArrived event produced without dropping it when the client's queue is full, `diana reindex` of the
instance topic run to its end, OpenSearch's bulk path run until its compiler settles, and the teardown of
a bench's processes and local stack."""

from __future__ import annotations

import compileall
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "compile_bytecode",
    "produce_instance_event",
    "reindex_instances",
    "stop_processes",
    "stop_stack",
    "warm_up_opensearch_bulk",
]

_REPO = Path(__file__).resolve().parents[1]  # the tree whose `diana` the reindex runs

# The folders of the `diana` package (setup.cfg's package_dir).
_PACKAGE_FOLDERS = ("diana", "producers", "schemas", "stream_apps", "sinks", "access", "operations", "compose")


def compile_bytecode() -> None:
    """Write the bytecode of the tree's modules, as `pip install` does for an installation.

    Run from a checkout (an editable install) with PYTHONDONTWRITEBYTECODE set, as on these machines,
    every `diana` process compiled each module it imported from source: 20-30 ms of a `diana reindex`
    of 1.0-1.2 s (docs/PERFORMANCE.md, issue 19 stop 30). A stale file is recompiled, as Python would."""
    for folder in _PACKAGE_FOLDERS:
        if not compileall.compile_dir(_REPO / folder, quiet=1):
            raise RuntimeError(f"could not compile {_REPO / folder}")


def produce_instance_event(producer: Any, codec: Any, event: dict[str, Any]) -> int:
    """``event`` encoded and handed to ``producer`` (keyed by study, as the receiver does); its size.

    A full local queue (BufferError) is waited out by serving delivery reports, not dropped."""
    from diana.schemas.topics import INSTANCES

    value = codec.encode(INSTANCES.value_schema, event)
    while True:
        try:
            producer.produce(INSTANCES.name, key=event["study_instance_uid"].encode(), value=value)
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)
    return len(value)


def reindex_instances(config: Path, env: dict[str, str], kind: str = "instances") -> subprocess.CompletedProcess[str]:
    """`diana reindex --kinds instances` (or ``kind``) with ``config``, run to its end (output captured)."""
    command = [sys.executable, "-m", "diana.cli", "--config", str(config), "reindex", "--kinds", kind]
    return subprocess.run([*command, "--no-progress"], cwd=_REPO, env=env, capture_output=True, text=True)


def warm_up_opensearch_bulk(url: str, alias: str, documents: int, per_request: int = 1000) -> int:
    """Bulk-index copies of the documents under ``alias`` (the instance documents the bench's warm-up
    sent) into a scratch index of the same mapping until ``documents`` were written, then delete it.

    A freshly started OpenSearch spends most of its CPU compiling for its first tens of thousands of
    bulk documents (its CPU per document fell from 271 to 62-79 us over 100,000 in bench.reindex,
    docs/PERFORMANCE.md, issue 19 stop 26); a deployed one has long finished. Returns the documents
    written."""
    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[url], timeout=120)
    index = next(iter(client.indices.get_alias(name=alias)))
    mapping = client.indices.get_mapping(index=index)[index]["mappings"]
    hits = client.search(index=alias, body={"size": 10_000, "query": {"match_all": {}}})["hits"]["hits"]
    if not hits:
        raise RuntimeError(f"nothing under {alias} to warm OpenSearch up with")
    scratch = "bench-jvm-warm-up"
    client.indices.delete(index=scratch, ignore_unavailable=True)
    client.indices.create(index=scratch, body={"settings": {"number_of_replicas": 0}, "mappings": mapping})
    written = 0
    try:
        while written < documents:
            lines = []
            for n in range(written, min(written + per_request, documents)):
                lines += [{"index": {"_index": scratch, "_id": str(n)}}, hits[n % len(hits)]["_source"]]
            response = client.bulk(body=lines)
            if response.get("errors"):
                raise RuntimeError("the warm-up's bulk request had errors")
            written += len(lines) // 2
    finally:
        client.indices.delete(index=scratch, ignore_unavailable=True)
    return written


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then wait up to 30 s for each; kill what does not end."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def stop_stack(stack: Any, work: Path | None) -> None:
    """Stop a bench's Kafka and OpenSearch (``LocalStack``) and remove OpenSearch's data and ``work``
    (None: the work folder is kept)."""
    stack.stop()
    shutil.rmtree(stack._opensearch_dir(), ignore_errors=True)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
