"""Unit: topic replication and size settings agree with the producers and the cluster."""

from __future__ import annotations

import pytest

from diana.config import load_config
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import (
    ALL_TOPICS,
    DEADLETTER,
    INSTANCES,
    SERIES,
    expires,
    replication,
    topic_config,
    topic_settings,
)


def test_replication_is_automatic_three_and_two_on_a_cluster_and_one_on_a_single_broker():
    assert replication(brokers=1) == (1, 1)
    assert replication(brokers=2) == (2, 1)
    assert replication(brokers=3) == (3, 2)
    assert replication(brokers=5) == (3, 2)
    assert replication(brokers=5, replication_factor=5, min_insync_replicas=3) == (5, 3)
    with pytest.raises(ValueError, match="no write could succeed"):
        replication(brokers=3, replication_factor=2, min_insync_replicas=3)


def test_every_topic_takes_the_producers_message_limit_and_instance_events_are_compressed():
    kafka = load_config(None, environ={}).kafka
    settings = topic_settings(kafka)
    assert settings["max_message_bytes"] == kafka.max_message_bytes == 8 * 1024 * 1024
    for topic in (INSTANCES, DEADLETTER, SERIES):
        config = topic_config(topic, settings["max_message_bytes"], 2)
        assert config["max.message.bytes"] == str(kafka.max_message_bytes) and config["min.insync.replicas"] == "2"
    assert (
        topic_config(INSTANCES, 1, 1)["compression.type"] == topic_config(DEADLETTER, 1, 1)["compression.type"] == "lz4"
    )
    assert topic_config(INSTANCES, 1, 1)["retention.ms"] == "-1"  # the topic's own settings stay
    assert "compression.type" not in topic_config(SERIES, 1, 1)


def test_the_dose_workers_kafka_client_reads_the_instance_events_codec():
    # aiokafka decompresses lz4 only with cramjam installed; without it the dose worker's fetcher
    # crashed on the first batch of a codec it could not read.
    from aiokafka.codec import has_lz4, lz4_decode, lz4_encode

    from diana.schemas.topics import EVENT_COMPRESSION

    assert EVENT_COMPRESSION == "lz4" and has_lz4()
    event = b'{"00080060":{"vr":"CS","Value":["CT"]}}' * 40
    assert lz4_decode(lz4_encode(event)) == event


def test_only_the_dead_letters_expire_of_the_indexed_topics():
    """Their index is carried over by `diana reindex` (the topic keeps 90 days); every other indexed topic
    is kept for ever or compacted, so the index can be rebuilt from it alone."""
    by_name = {t.name: t for t in ALL_TOPICS}
    assert [t for t in IndexLayout("diana").kinds if expires(by_name[t])] == ["dicom.deadletter"]
    assert expires(by_name["dicom.ticks"]) and not expires(by_name["dose.by-patient"])
