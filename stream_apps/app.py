"""Creates a Faust app (the dose worker); its agents live in their own modules (dose/agent.py)."""

from __future__ import annotations

import faust
from faust.transport.producer import ProducerBuffer

from diana.clients import faust_broker_settings
from diana.config import Config

__all__ = ["create_app", "deepen_faust_producer_buffer"]


def deepen_faust_producer_buffer() -> None:
    """Called once when the dose worker starts: a process-wide change to Faust, never made on import.

    Faust blocks an agent in ProducerBuffer.wait_until_ebb once 100 table writes are pending; seen
    here right after a restart with a backlog, that wait never returned until the next rebalance.
    Each instance makes about five table writes, so allow a deep buffer instead.
    """
    ProducerBuffer.max_messages = 100_000


def create_app(
    config: Config, app_id: str | None = None, web_port: int | None = None, replication_factor: int = 1
) -> faust.App:
    """The aggregates app by default; the dose worker passes its own id and port, and the replication
    factor its changelogs got (ensure_state_topics), for the topics Faust creates itself."""
    return faust.App(
        app_id or config.stream.app_id,
        **faust_broker_settings(config.kafka),
        store="memory://",
        datadir=str(config.path(config.stream.data_dir)),
        # Changelogs are co-partitioned with dicom.instances: one study, one partition, one worker.
        topic_partitions=config.kafka.partitions,
        topic_replication_factor=replication_factor,
        consumer_auto_offset_reset="earliest",
        web_port=web_port or config.stream.web_port,
        web_host="127.0.0.1",
        # The web port serves our /metrics/ page alone. Faust's /table endpoints (on by default) answered
        # any local caller a table's keys and values, e.g. /table/dose-patients/<PatientID>/ that patient's
        # doses, without authentication; /router tells which worker holds a key (for @table_route, which
        # diana does not use). Faust's statistics and graph pages stay off (they follow debug, off).
        web_tables_enabled=False,
        web_router_enabled=False,
        autodiscover=False,
        processing_guarantee=config.stream.processing_guarantee,
        # A killed worker's partitions move on after 10 s instead of Faust's 60 s (as for the
        # aggregates worker); heartbeats come from the consumer thread, every 3 s.
        broker_session_timeout=10.0,
        # A table's record is one key's whole state (a QA phantom's patient: ~1,400 studies, several MB):
        # Faust's 1 MB defaults refused to write it to its changelog, or to read it back.
        producer_max_request_size=config.kafka.max_message_bytes,
        consumer_max_fetch_size=config.kafka.max_message_bytes,
    )
