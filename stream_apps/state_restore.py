"""Rebuild the state of newly assigned partitions: the local file plus the changelog's tail, or the whole changelog.

For each partition the local file (local_state.py) is loaded if it can be trusted, and the
changelog is read from its checkpoint to the end; otherwise the partition's state is read from
the changelog's start, as every restore did before the local files existed. Either way the read
is ``read_committed`` and goes to the end the broker reports, after the group's committed offsets
became stable (the caller waits for that), so the state and the input position agree.
Afterwards the local file is brought to the same point: the keys the tail changed, or the whole
state after a full read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import ConfigResource
from prometheus_client import Counter, Histogram

from diana.clients import kafka_admin, kafka_consumer
from diana.config import KafkaConfig
from diana.stream_apps.local_state import Checkpoint, LocalStateError, LocalStates, now_ms, tail_refusal

__all__ = ["GiveUp", "RestoreReport", "restore_partitions"]

log = structlog.get_logger("diana.stream.restore")

RESTORE_SECONDS = Histogram("diana_stream_restore_seconds", "Time to rebuild the state of newly assigned partitions")
RESTORE_RECORDS = Counter(
    "diana_stream_restore_records_total", "Changelog records read to rebuild state, by kind of restore", ["kind"]
)
PARTITION_RESTORES = Counter(
    "diana_stream_partition_restores_total",
    "Partition state restores: tail (local file + changelog tail) or full (why the local file was not used)",
    ["kind", "reason"],
)

SEP = "/"
NONE: frozenset[str] = frozenset()
State = dict[str, dict[str, Any]]


class GiveUp(RuntimeError):
    """The broker could not be reached or agreed with for longer than the worker waits: exit and say why."""


@dataclass
class RestoreReport:
    records: dict[int, int] = field(default_factory=dict)  # partition -> changelog records read
    # partition -> "tail", or why the whole changelog was read (local_state.tail_refusal, or
    # no_local_state, damaged, watermarks_unavailable, local_state_off)
    kinds: dict[int, str] = field(default_factory=dict)
    # Partitions whose cold namespaces (local_state.LocalStates.cold) are left in their local file,
    # read from it on demand (state_store.py).
    backed: set[int] = field(default_factory=set)


def apply_record(state: State, composite_key: str, value: Any, on_disk: frozenset[str] = frozenset()) -> None:
    """One changelog record (value None: a deletion) applied to a partition's state.

    ``on_disk``: namespaces whose entries are partly in the local file only; a deletion there stays
    as None (the file's value is hidden) until the file has it too."""
    namespace, _, key = composite_key.partition(SEP)
    space = state.setdefault(namespace, {})
    if value is None and namespace not in on_disk:
        space.pop(key, None)
    else:
        space[key] = value


def changelog_facts(kafka: KafkaConfig, topic: str, timeout: float = 10.0) -> tuple[int | None, str]:
    """The changelog's delete.retention.ms and topic id as the broker has them (None, "": unknown)."""
    resource = ConfigResource("TOPIC", topic)
    admin = kafka_admin(kafka)  # kept referenced until the answers came: a collected client cancels them
    retention_ms: int | None = None
    topic_id = ""
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
        retention_ms = int(configs["delete.retention.ms"].value)
    except (KafkaException, KeyError, ValueError, TypeError) as exc:
        log.warning("state.delete_retention_unknown", topic=topic, reason=str(exc))
    try:
        described = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic].result(timeout)
        topic_id = str(described.topic_id)
    except (KafkaException, KeyError, ValueError, TypeError) as exc:
        log.warning("state.topic_id_unknown", topic=topic, reason=str(exc))
    return retention_ms, topic_id


def _local_start(
    local: LocalStates, partition: int, low: int, high: int, retention_ms: int | None
) -> tuple[Checkpoint | None, State | None, str]:
    """(checkpoint, state, "tail") if the local file can be completed by the tail, else (None, None, reason)."""
    if not local.topic_id:  # a recreated changelog could not be told from the one the file knew
        return None, None, "topic_id_unknown"
    try:
        checkpoint, state = local.file(partition).load(skip=local.cold)
    except LocalStateError as exc:
        if exc.reason != "no_local_state":
            log.warning("state.local_refused", partition=partition, reason=str(exc))
        return None, None, exc.reason
    refusal = tail_refusal(checkpoint, low, high, now_ms(), retention_ms)
    if refusal is not None:
        log.info("state.local_refused", partition=partition, reason=refusal, position=checkpoint.position)
        return None, None, refusal
    return checkpoint, state, "tail"


def restore_partitions(
    kafka: KafkaConfig,
    group_id: str,
    changelog: str,
    partitions: list[int],
    states: dict[int, State],
    local: LocalStates | None,
    give_up_after_s: float,
    still_running: Callable[[], None],
) -> RestoreReport:
    """Fill ``states[p]`` for each of ``partitions``; bring the local files to the same position."""
    report = RestoreReport()
    if not partitions:
        return report
    started, began_ms = time.monotonic(), now_ms()
    reader = kafka_consumer(
        kafka,
        f"{group_id}-restore",
        {
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        },
    )
    starts: dict[int, int] = {}
    checkpoints: dict[int, Checkpoint] = {}
    touched: dict[int, set[str]] = {}
    last_read: dict[int, int] = {}
    load_seconds: dict[int, float] = {}  # partition -> seconds spent loading its local file
    steps: dict[str, float] = {}  # where the restore's time went (seconds)
    try:
        retention_ms: int | None = None
        if local is not None:
            retention_ms, local.topic_id = changelog_facts(kafka, changelog)
        steps["broker_facts"] = time.monotonic() - started
        for p in partitions:
            states[p] = {}
            report.records[p] = 0
            try:
                low, high = reader.get_watermark_offsets(TopicPartition(changelog, p), timeout=10)
            except KafkaException as exc:  # the full read below waits out a restarting broker
                log.warning("state.watermarks_unavailable", partition=p, reason=str(exc))
                low, high, kind = -1, -1, "watermarks_unavailable"
            else:
                kind = "local_state_off"
                if local is not None:
                    loading = time.monotonic()
                    checkpoint, state, kind = _local_start(local, p, low, high, retention_ms)
                    load_seconds[p] = round(time.monotonic() - loading, 2)
                    if checkpoint is not None and state is not None:
                        states[p], checkpoints[p], starts[p] = state, checkpoint, checkpoint.position
                        touched[p] = set()
                        report.backed.add(p)  # its cold namespaces stay in the file
            report.kinds[p] = kind
            if p not in starts:
                starts[p] = low if low >= 0 else OFFSET_BEGINNING
        steps["local_load"] = sum(load_seconds.values())
        reading = time.monotonic()
        on_disk = local.cold if local is not None else frozenset()
        _read(
            reader,
            changelog,
            starts,
            states,
            touched,
            last_read,
            report,
            started + give_up_after_s,
            still_running,
            on_disk,
        )
        ends = _ends(reader, changelog, starts, last_read)
        steps["changelog_read"] = time.monotonic() - reading
    finally:
        reader.close()
    seconds = time.monotonic() - started
    writing = time.monotonic()
    RESTORE_SECONDS.observe(seconds)
    for p in partitions:
        kind = "tail" if report.kinds[p] == "tail" else "full"
        RESTORE_RECORDS.labels(kind).inc(report.records[p])
        PARTITION_RESTORES.labels(kind, "" if kind == "tail" else report.kinds[p]).inc()
        log.info(
            "state.partition_restored",
            partition=p,
            kind=kind,
            reason=None if kind == "tail" else report.kinds[p],
            from_offset=starts[p] if starts[p] >= 0 else 0,
            records=report.records[p],
            local_load_s=load_seconds.get(p),
        )
        if local is not None:
            if _write_back(local, p, states[p], checkpoints.get(p), touched.get(p), Checkpoint(ends[p], began_ms)):
                # The file holds the whole restored state: the cold namespaces leave memory.
                report.backed.add(p)
                for namespace in local.cold:
                    states[p].pop(namespace, None)
    sizes: dict[str, int] = {}
    for p in partitions:
        for namespace, space in states[p].items():
            sizes[namespace] = sizes.get(namespace, 0) + len(space)
    log.info(
        "state.restored",
        partitions=partitions,
        records=sum(report.records.values()),
        tail=sorted(p for p in partitions if report.kinds[p] == "tail"),
        full=sorted(p for p in partitions if report.kinds[p] != "tail"),
        entries=sizes,
        seconds=round(seconds, 2),
        steps={k: round(v, 2) for k, v in steps.items()},
        local_write_s=round(time.monotonic() - writing, 2),
    )
    return report


def _read(
    reader: Any,
    changelog: str,
    starts: dict[int, int],
    states: dict[int, State],
    touched: dict[int, set[str]],
    last_read: dict[int, int],
    report: RestoreReport,
    deadline: float,
    still_running: Callable[[], None],
    on_disk: frozenset[str] = frozenset(),
) -> None:
    """Read each partition from its start to the end (EOF), applying every record.

    A tail read (a partition in ``touched``) completes a loaded file: its ``on_disk`` namespaces keep
    their deletions as None (apply_record)."""
    unfinished = set(starts)
    reader.assign([TopicPartition(changelog, p, start) for p, start in starts.items()])
    while unfinished:
        for msg in reader.consume(num_messages=10_000, timeout=0.05):
            error = msg.error()
            if error:
                if error.code() == KafkaError._PARTITION_EOF:
                    unfinished.discard(msg.partition())
                elif error.code() == KafkaError._FATAL or error.fatal() or time.monotonic() > deadline:
                    raise GiveUp(
                        f"the state changelog could not be read ({error}); check that the broker is up "
                        "and reachable, then start the worker again"
                    )
                else:  # e.g. a broker restarting: the client retries on its own
                    log.warning("state.restore_waiting", reason=str(error))
                    still_running()
                continue
            p, key, value = msg.partition(), msg.key().decode(), msg.value()
            apply_record(
                states[p], key, None if value is None else json.loads(value), on_disk if p in touched else NONE
            )
            report.records[p] += 1
            last_read[p] = msg.offset()
            if p in touched:
                touched[p].add(key)


def _ends(reader: Any, changelog: str, starts: dict[int, int], last_read: dict[int, int]) -> dict[int, int]:
    """Where each partition's read ended: every committed record before it has been applied."""
    ends = {p: max(start, last_read.get(p, -1) + 1) for p, start in starts.items()}
    try:
        for tp in reader.position([TopicPartition(changelog, p) for p in starts]):
            if tp.offset >= 0:  # past the last transaction marker too
                ends[tp.partition] = max(ends[tp.partition], tp.offset)
    except KafkaException as exc:  # the record-based end is right too, only a little earlier
        log.warning("state.restore_position_unknown", reason=str(exc))
    return ends


def _write_back(
    local: LocalStates,
    partition: int,
    state: State,
    old: Checkpoint | None,
    touched: set[str] | None,
    new: Checkpoint,
) -> bool:
    """Bring the partition's local file to ``new``: the keys the tail changed, or the whole state.

    True if the file now holds the whole state."""
    local.resume(partition)
    if old is None or touched is None:
        return new.position >= 0 and local.replace(partition, state, new)
    if new.position == old.position:
        return True  # nothing was read: the file is already this state
    changes = []
    for composite in touched:
        namespace, _, key = composite.partition(SEP)
        changes.append((namespace, key, state.get(namespace, {}).get(key)))
    return local.write(partition, changes, new)
