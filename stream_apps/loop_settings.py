"""The transactional loop's settings, and the bounds on its broker calls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
from confluent_kafka import KafkaError

from diana.config import KafkaConfig

__all__ = ["ConsumerFatal", "LoopSettings", "Stopped", "slow"]

log = structlog.get_logger("diana.stream.transactional")

# Every broker call of a transaction must end well inside transaction.timeout.ms: past it the
# broker aborts the transaction anyway, so waiting longer only delays the retry.
_CALL_SHARE = 0.5  # a call's own timeout, as a share of the transaction timeout
_WATCHDOG_SHARE = 0.8  # the watchdog around a call that may ignore its timeout (librdkafka 5456)


@contextmanager
def slow(step: str, warn_after_s: float = 5.0) -> Iterator[None]:
    """Log a broker call that took long: where a stalled worker waited, in its log."""
    started = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - started
        if took > warn_after_s:
            log.warning("slow.step", step=step, seconds=round(took, 1))


class ConsumerFatal(Exception):
    def __init__(self, error: KafkaError) -> None:
        super().__init__(str(error))
        self.error = error


class Stopped(Exception):
    """A stop was requested while waiting for the broker."""


@dataclass(frozen=True)
class LoopSettings:
    kafka: KafkaConfig
    group_id: str
    transactional_id: str
    topics: tuple[str, ...]
    changelog: str
    # Messages per transaction at most ([stream] transaction_max_events, diana/config.py says why 2000).
    max_batch: int = 2000
    # Where a message whose handling raised goes, with its origin and the reason.
    deadletter: str = "dicom.deadletter"
    # A dead worker's open transaction holds back read_committed readers for at most this long.
    transaction_timeout_ms: int = 10_000
    # A killed worker's partitions move to the others after this long; a worker that restarts
    # within it under the same group_instance_id gets them back with no rebalance at all.
    session_timeout_ms: int = 10_000
    # Static membership (KIP-345): the worker's stable id; None: a dynamic member.
    group_instance_id: str | None = None
    # init_transactions, and the committed-offsets read on assignment, retry this long, then the
    # worker exits with the reason (a supervisor restarts it) instead of waiting for ever.
    give_up_after_s: float = 120.0
    # Transactions failing this long with none committed stop the worker, naming the cause
    # ([stream] transaction_max_retry_s, failing_transactions.py): a cause that lasts is not retried for ever.
    transaction_max_retry_s: float = 300.0
    # The worker's own folder of local state files (one per partition, local_state.py); None: none
    # kept, every assignment reads the whole changelog.
    state_dir: Path | None = None
    # Namespaces kept on local disk only once in the file, read on demand (state_store.py): what
    # grows with the archive and is read rarely. Only with a state_dir.
    cold_namespaces: frozenset[str] = frozenset()

    @property
    def call_timeout_s(self) -> float:
        return self.transaction_timeout_ms / 1000 * _CALL_SHARE

    @property
    def watchdog_s(self) -> float:
        return self.transaction_timeout_ms / 1000 * _WATCHDOG_SHARE
