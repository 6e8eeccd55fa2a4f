"""How much of a study diana-star already holds: its instances in the OpenSearch instance index.

A study counts as complete when the index holds at least as many of its instances as the PACS says
it has (NumberOfStudyRelatedInstances): the index is written by the OpenSearch sink only after the
receiver landed the object durably and published its event, so what it counts is really received.
"""

from __future__ import annotations

import threading
import time

from opensearchpy import OpenSearch
from opensearchpy.exceptions import NotFoundError

from diana.schemas.layout import IndexLayout

__all__ = ["IndexedCounter"]


class IndexedCounter:
    def __init__(self, client: OpenSearch, index_prefix: str):
        self.client = client
        self.alias = IndexLayout(index_prefix).alias("instances")

    def count(self, study_instance_uid: str) -> int:
        try:
            result = self.client.count(
                index=self.alias, body={"query": {"term": {"study_instance_uid": study_instance_uid}}}
            )
        except NotFoundError:  # nothing indexed yet at all
            return 0
        return int(result["count"])

    def wait_for(self, study_instance_uid: str, target: int, timeout_s: float, stop: threading.Event) -> int:
        """Poll until the study has ``target`` instances indexed or ``timeout_s`` passed; the last count.

        Stops early when the count has not moved for a third of the timeout and is still short, so a
        partial retrieve is known in seconds, not after the whole timeout.
        """
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while True:
            now_count = self.count(study_instance_uid)
            if now_count >= target:
                return now_count
            now = time.monotonic()
            if now_count != last:
                last, last_change = now_count, now
            if now > deadline or now - last_change > max(timeout_s / 3, 5.0) or stop.is_set():
                return now_count
            stop.wait(0.5)
