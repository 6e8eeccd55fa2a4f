"""Creates the Faust app of diana-star; the agents live in their own modules (aggregates.py)."""
from __future__ import annotations

import faust

from diana.config import Config

__all__ = ["create_app"]


def create_app(config: Config) -> faust.App:
    return faust.App(
        config.stream.app_id,
        broker=f"kafka://{config.kafka.bootstrap}",
        store="memory://",
        datadir=str(config.path(config.stream.data_dir)),
        # Changelogs are co-partitioned with dicom.instances: one study, one partition, one worker.
        topic_partitions=config.kafka.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_port=config.stream.web_port,
        web_host="127.0.0.1",
        autodiscover=False,
        processing_guarantee=config.stream.processing_guarantee,
    )
