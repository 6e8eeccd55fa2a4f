"""How much of a study diana-star already holds: its instances in the OpenSearch instance index.

A study counts as complete when the index holds at least as many of its instances as the PACS says
it has (NumberOfStudyRelatedInstances): the index is written by the OpenSearch sink only after the
receiver landed the object durably and published its event, so what it counts is really received.
"""

from __future__ import annotations

import threading
import time

from opensearchpy import OpenSearch

from diana.schemas.layout import IndexLayout

__all__ = ["IndexedCounter"]


class IndexedCounter:
    def __init__(self, client: OpenSearch, index_prefix: str):
        self.client = client
        self.alias = IndexLayout(index_prefix).alias("instances")
        # One client for all retrieve workers: one request at a time keeps its connection pool of one.
        self._lock = threading.Lock()

    def count(self, study_instance_uid: str) -> int:
        with self._lock:
            # 404: nothing indexed yet at all (the sink creates the index with its first document).
            result = self.client.count(
                index=self.alias, body={"query": {"term": {"study_instance_uid": study_instance_uid}}}, ignore=404
            )
        return int(result.get("count", 0))

    def wait_for(self, study_instance_uid: str, target: int, timeout_s: float, stop: threading.Event) -> int:
        """Poll until the study has ``target`` instances indexed, ``timeout_s`` passed or ``stop`` is set; the last count."""
        deadline = time.monotonic() + timeout_s
        while True:
            have = self.count(study_instance_uid)
            if have >= target or time.monotonic() > deadline or stop.wait(0.5):
                return have
