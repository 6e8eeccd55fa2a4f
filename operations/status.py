"""`diana status`: one screen a person can read about the whole pipeline.

Per topic and partition: first and end offsets. Per consumer group: lag per topic.
Per routing destination (`diana route`): what its consumer group has not routed yet, counting
partitions it never committed on (a destination down since it was configured). Per index alias: the
versioned index behind it and its document count. Archive and landing: object counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition

from diana.clients import kafka_admin, kafka_consumer, opensearch_client
from diana.config import Config, ConfigError
from diana.storage import ObjectStore, open_store

__all__ = ["PipelineStatus", "collect_status", "render_status", "group_lag", "kafka_error_code"]


@dataclass
class PipelineStatus:
    topics: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)  # topic -> partition -> (low, high)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> topic -> lag
    indices: dict[str, tuple[str, int]] = field(default_factory=dict)  # alias -> (index, documents)
    archive_objects: int = 0
    landing_objects: int = 0
    services: dict[str, tuple[str, bool]] = field(default_factory=dict)  # name -> (address, listening)
    routes: dict[str, dict[str, int]] = field(default_factory=dict)  # routing destination -> topic -> lag
    errors: list[str] = field(default_factory=list)


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1):
            return True
    except OSError:
        return False


def service_addresses(cfg: Config) -> dict[str, tuple[str, int]]:
    """Where the outward services listen: the receiver (storage, and Q/R by default), Q/R alone, DICOMweb."""
    r, qr, web = cfg.receiver, cfg.query_retrieve, cfg.dicomweb
    out = {"receiver (C-STORE" + (", C-FIND/C-MOVE/C-GET)" if qr.on_receiver else ")"): (r.host, r.port)}
    out["query/retrieve alone (diana serve)"] = (r.host, qr.port)
    out["DICOMweb (diana serve)"] = (web.host, web.port)
    return out


def watermarks(cfg: Config, topics: list[str]) -> dict[str, dict[int, tuple[int, int]]]:
    admin = kafka_admin(cfg.kafka)
    consumer = kafka_consumer(cfg.kafka, "diana-status")
    try:
        meta = admin.list_topics(timeout=10).topics
        return {
            t: {p: consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10) for p in sorted(meta[t].partitions)}
            for t in topics
            if t in meta
        }
    finally:
        consumer.close()


def group_lag(
    cfg: Config, group: str, marks: dict[str, dict[int, tuple[int, int]]], count_uncommitted: bool = False
) -> dict[str, int]:
    """Messages not yet committed by ``group``, per topic.

    A partition the group never committed on is left out (status shows what a group has started),
    or, with ``count_uncommitted``, counted whole (waiting for a group to catch up needs that).
    """
    admin = kafka_admin(cfg.kafka)
    partitions = [TopicPartition(t, p) for t, parts in marks.items() for p in parts]
    result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)], request_timeout=10)
    committed = result[group].result().topic_partitions
    lag: dict[str, int] = {}
    for tp in committed:
        if tp.offset < 0 and not count_uncommitted:
            continue
        low, high = marks[tp.topic][tp.partition]
        lag[tp.topic] = lag.get(tp.topic, 0) + high - max(tp.offset, low)
    return lag


def _count(root: Path) -> int:
    return (
        sum(1 for p in root.rglob("*.dcm") if not p.name.startswith(".") and ".incoming" not in p.parts)
        if root.exists()
        else 0
    )


def _route_topics(cfg: Config, status: PipelineStatus) -> dict[str, list[str]]:
    """Routing destination -> the topics its worker consumes, from the configured rules (none: no routing)."""
    if not cfg.routing.rules:
        return {}
    from diana.access.routing.rules import RulesError
    from diana.access.routing.service import destination_topics, load_configured_rules

    try:
        return destination_topics(load_configured_rules(cfg))
    except RulesError as exc:
        status.errors.append(f"routing rules: {exc}")
        return {}


def _count_archived(archive: ObjectStore) -> int:
    return sum(1 for key in archive.list() if key.endswith(".dcm"))


# Errors that say Kafka as a whole did not answer, not one group.
_KAFKA_GONE = (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)


def _kafka_text(exc: KafkaException) -> str:
    return exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)


def kafka_error_code(exc: KafkaException) -> int | None:
    """The librdkafka error code ``exc`` carries (None: it carries no KafkaError)."""
    return exc.args[0].code() if exc.args and isinstance(exc.args[0], KafkaError) else None


def _collect_kafka(cfg: Config, status: PipelineStatus, topics: list[str]) -> None:
    """The topics' offsets and each consumer group's lag (routing destinations apart), into ``status``."""
    status.topics = watermarks(cfg, topics)
    admin = kafka_admin(cfg.kafka)
    route_prefix = cfg.routing.group_prefix + "-"
    route_topics = _route_topics(cfg, status)
    groups = sorted(g.group_id for g in admin.list_consumer_groups(request_timeout=10).result().valid)
    for group in groups:
        if group.startswith(("diana-status", "lag-probe-", "reader-")):
            continue
        try:  # one group's failure (its coordinator moving, no right to read it) is that group's line
            if group.startswith(route_prefix) and group.removeprefix(route_prefix) in route_topics:
                destination = group.removeprefix(route_prefix)
                marks = {t: status.topics[t] for t in route_topics[destination] if t in status.topics}
                status.routes[destination] = group_lag(cfg, group, marks, count_uncommitted=True)
                continue
            lag = group_lag(cfg, group, status.topics)
        except KafkaException as exc:
            status.errors.append(f"consumer group {group}: {_kafka_text(exc)}")
            if kafka_error_code(exc) in _KAFKA_GONE:
                break  # Kafka itself went: each further group would wait its 10 s for the same answer
            continue
        if lag:
            status.groups[group] = lag


def collect_status(cfg: Config, say: Callable[[str], None] = lambda _line: None) -> PipelineStatus:
    """Everything `diana status` shows; ``say`` is told before a step that may take long (listing a large
    archive: a walk of its folders, or a request per 1,000 S3 keys)."""
    from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
    from opensearchpy.exceptions import ConnectionTimeout, OpenSearchException

    from diana.schemas.layout import IndexLayout
    from diana.schemas.topics import ALL_TOPICS

    status = PipelineStatus()
    try:
        _collect_kafka(cfg, status, [t.name for t in ALL_TOPICS])
    except KafkaException as exc:
        # What is wrong is what status is asked for: the rest is still shown.
        status.errors.append(f"kafka at {cfg.kafka.bootstrap}: {_kafka_text(exc)}")
    client = opensearch_client(cfg.opensearch, timeout=10)
    layout = IndexLayout(cfg.opensearch.index_prefix)
    for kind in layout.id_fields:
        alias = layout.alias(kind)
        try:
            target = sorted(client.indices.get_alias(name=alias))
            count = client.count(index=alias)["count"]
            status.indices[alias] = (",".join(target), count)
        except OpenSearchConnectionError as exc:
            if isinstance(exc, ConnectionTimeout):  # slow on this one: the next may answer
                status.errors.append(f"{alias}: no answer within 10 s")
                continue
            # Refused, unresolvable, TLS: the same for every alias after it, said once.
            status.errors.append(f"opensearch at {cfg.opensearch.url}: {exc.info or exc.error}")
            break
        except OpenSearchException as exc:
            status.errors.append(f"{alias}: {getattr(exc, 'error', exc)}")
    try:
        say("counting the archive's objects…")
        status.archive_objects = _count_archived(open_store(cfg, "archive"))
    except (OSError, ConfigError) as exc:  # the object store unreachable, or its credentials file missing
        status.errors.append(f"archive: {exc}")
    status.landing_objects = _count(cfg.path(cfg.storage.landing_dir))  # this host's; an S3 store's below
    if cfg.storage.backend == "s3":
        try:
            say("counting the landing store's objects…")
            status.landing_objects += _count_archived(open_store(cfg, "landing"))
        except (OSError, ConfigError) as exc:
            status.errors.append(f"landing: {exc}")
    for name, (host, port) in service_addresses(cfg).items():
        status.services[name] = (f"{host}:{port}", _listening(host, port))
    return status


def render_status(status: PipelineStatus) -> str:
    out = ["PROBLEMS", *(f"  ! {e}" for e in status.errors), ""] if status.errors else []
    out.append("TOPICS                      partition   first offset     end offset")
    for topic, parts in status.topics.items():
        for p, (low, high) in parts.items():
            out.append(f"  {topic:<26}{p:>9}{low:>15}{high:>15}")
    out.append("")
    out.append("CONSUMER GROUPS             topic                               lag")
    for group, lags in status.groups.items():
        for topic, lag in sorted(lags.items()):
            out.append(f"  {group:<26}{topic:<30}{lag:>9}")
    out.append("")
    if status.routes:
        out.append("ROUTING destination          topic                               lag")
        for destination, lags in status.routes.items():
            for topic, lag in sorted(lags.items()):
                out.append(f"  {destination:<26}{topic:<30}{lag:>9}")
        out.append("")
    out.append("INDICES                     index                         documents")
    for alias, (index, count) in status.indices.items():
        out.append(f"  {alias:<26}{index:<30}{count:>9}")
    out.append("")
    out.append(f"ARCHIVE  objects: {status.archive_objects}")
    out.append(f"LANDING  objects waiting: {status.landing_objects}")
    out.append("")
    out.append("SERVICES")
    for name, (address, up) in status.services.items():
        out.append(f"  {name:<44}{address:<24}{'listening' if up else 'not listening'}")
    return "\n".join(out)
