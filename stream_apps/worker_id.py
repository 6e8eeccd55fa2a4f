"""The aggregates worker's stable id: its static group member id and its transactional id.

A worker that comes back under the same id gets its partitions back without a rebalance (static
membership) and fences its dead predecessor's open transaction at once. Two workers must never
share an id: the broker would fence one with the other.

Configured (``[stream] worker_id``, e.g. a StatefulSet pod name) it is used as is. Otherwise it is
made once and kept in the data directory, so it survives restarts on that disk and differs
between hosts even when their names are the same (the old default, host name plus port, did not).
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

__all__ = ["WorkerIdError", "stable_worker_id", "check_worker_id"]

# Kafka's rule for group.instance.id and a safe subset for transactional.id.
_LEGAL = re.compile(r"[A-Za-z0-9._-]{1,200}")


class WorkerIdError(ValueError):
    """A configured worker id Kafka would refuse."""


def check_worker_id(value: str) -> str:
    if not _LEGAL.fullmatch(value):
        raise WorkerIdError(
            f"[stream] worker_id {value!r} is not usable as a Kafka member id: use 1 to 200 of A-Z a-z 0-9 . _ -"
        )
    return value


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "host"


def stable_worker_id(configured: str, data_dir: Path, app_id: str, port: int) -> str:
    """The configured id, or the one kept in ``data_dir`` (made on first start).

    The file is per app id and metrics port: two workers on one host need two ports anyway, so
    they get two ids from one data directory. With metrics off (port 0) the id is random per
    start: a restart is then a new member (a rebalance, and its predecessor's transaction is
    aborted only after transaction.timeout.ms).
    """
    if configured:
        return check_worker_id(configured)
    if not port:
        return f"{_host()}-{uuid.uuid4().hex[:12]}"
    path = data_dir / f"{app_id}-{port}.worker-id"
    try:
        kept = path.read_text().strip()
        if _LEGAL.fullmatch(kept):
            return kept
    except FileNotFoundError:
        pass
    made = f"{_host()}-{uuid.uuid4().hex[:12]}"
    data_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(made + "\n")
    os.replace(partial, path)  # two starts racing: one id wins, both read it below
    return path.read_text().strip()
