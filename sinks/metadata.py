"""Metadata sink: prepares a series' WADO-RS metadata as one archive file when the series completes.

It reads the series revisions the aggregates worker publishes on ``dicom.series``. For the latest
COMPLETED or AMENDED revision of each series in a batch, it reads the DICOM JSON header of every
instance of the series from the instance index (what WADO-RS answers from today) and writes them,
with the index state they came from, as ``layout.series_metadata_path`` (format:
schemas/series_metadata.py), atomically and durably. Offsets are committed by consumer.py's loop
after the writes, so a crash re-prepares the batch; a file already describing the same index state
is left as it is (idempotent).

The index may lag behind the revision (the OpenSearch sink is another consumer): while it holds fewer
instance documents than the revision counts, the batch is tried again (``IndexBehind``), for at
most ``index_wait_s`` per revision, its other series prepared meanwhile; after that the file is written from what the index holds. Either
way WADO-RS serves a file only while the index still holds the state the file was prepared from.

The files are derived (WADO-RS answers a series without one from the index), so no failure of one is
allowed to hold the partition for good: the store's trouble that passes (unreachable, a full disk:
``store_wide``) is retried for as long as it lasts, an error of the series' own (a folder's permission,
an I/O error, the store refusing that key) for ``write_retry_s``, then the file is left unwritten
(``metadata.not_written``, ``diana_metadata_not_written_total``) and the batch goes on. A store that
refuses every key (read-only credentials, a bucket policy) so leaves every series' file unwritten, one
window after another: the counter says so, and a replay of the sink's group once it is fixed writes them.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import structlog
from confluent_kafka import Message
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import TransportError
from prometheus_client import Counter

from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.layout import IndexLayout, series_metadata_path
from diana.schemas.series_metadata import (
    BASE_MARKER,
    PreparedHeader,
    absolute_bulk_uris,
    encode_entry,
    index_state,
    index_state_request,
    read_header,
)
from diana.schemas.topics import SERIES
from diana.sinks.consumer import DeadLetters, RetryableError
from diana.storage import ObjectStore, error_kind, store_wide

__all__ = ["MetadataSink"]

log = structlog.get_logger("diana.sink.metadata")

PREPARED = Counter("diana_metadata_prepared_total", "Series metadata files written", ["status"])
UNCHANGED = Counter("diana_metadata_unchanged_total", "Series revisions whose metadata file was already current")
NOT_WRITTEN = Counter(
    "diana_metadata_not_written_total",
    "Series metadata files left unwritten after write_retry_s of errors of their own (WADO-RS answers from the index)",
)
PREPARE_ON = ("COMPLETED", "AMENDED")
PAGE = 1000


class IndexBehind(RetryableError):
    """The index holds fewer of a series' instances than its revision counts (or changed while read)."""


def series_state(client: OpenSearch, index: str, study_instance_uid: str) -> dict[str, tuple[int, float | None]]:
    return index_state(client.search(index=index, body=index_state_request(study_instance_uid)))


class MetadataSink:
    name = "metadata"
    topics = (SERIES.name,)

    def __init__(
        self,
        client: OpenSearch,
        layout: IndexLayout,
        archive: ObjectStore,
        codec: Codec | None = None,
        index_wait_s: float = 300.0,
        write_retry_s: float = 300.0,
    ):
        self.client = client
        self.index = layout.alias("instances")
        self.archive = archive
        self.codec = codec or default_codec()
        self.index_wait_s = index_wait_s
        self.write_retry_s = write_retry_s
        # (series, revision) -> when the index was first found behind it
        self._behind_since: dict[tuple[str, int], float] = {}
        # series -> (when its file first failed with an error of its own, when last): of any revision, one file
        self._failing: dict[str, tuple[float, float]] = {}
        # (series, revision) given up on while their batch is tried again for the others: not tried again
        self._given_up: set[tuple[str, int]] = set()

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        latest: dict[str, tuple[Message, dict[str, Any]]] = {}
        for msg in batch:
            try:
                _, event = self.codec.decode(msg.value(), expect=SERIES.value_schema)
            except DecodeError as exc:
                dead.send(msg, f"metadata: {exc}")
                continue
            if event["status"] not in PREPARE_ON:
                continue
            known = latest.get(event["series_instance_uid"])
            if known is None or known[1]["revision"] < event["revision"]:
                latest[event["series_instance_uid"]] = (msg, event)
        again: RetryableError | None = None
        for msg, event in latest.values():
            series = event["series_instance_uid"]
            if (series, event["revision"]) in self._given_up:
                continue  # left unwritten while the batch is tried again for another series
            try:
                self.prepare(event)
            except IndexBehind as exc:
                # Tried again with the batch; the batch's other series are prepared meanwhile, not
                # held behind it (up to index_wait_s each time).
                self._failing.pop(series, None)
                again = again or exc
            except ValueError as exc:
                self._failing.pop(series, None)
                dead.send(msg, f"metadata: {exc}")
            except (OSConnectionError, TransportError) as exc:
                raise RetryableError(f"the index does not answer: {exc}") from exc
            except OSError as exc:
                if store_wide(exc):  # the next series would meet it too
                    self._failing.pop(series, None)
                    raise RetryableError(f"metadata write failed: {exc.strerror or exc}") from exc
                if not self._give_up(event, exc):  # its own: the others are prepared meanwhile
                    again = again or RetryableError(f"metadata write failed: {exc.strerror or exc}")
            else:
                self._failing.pop(series, None)
        if again is not None:
            raise again
        self._given_up.clear()  # the batch is done: its offsets are committed next

    def _give_up(self, event: dict[str, Any], exc: OSError) -> bool:
        """Whether the series' file, failing with an error of its own, has been tried for long enough:
        then it is left unwritten (said once) and the batch goes on. A failure long after the last
        one (its batch was given away, or the store was down meanwhile) starts a new window."""
        series, revision = event["series_instance_uid"], event["revision"]
        now = time.monotonic()
        first, last = self._failing.get(series, (now, now))
        if now - last > self.write_retry_s:
            first = now
        self._failing[series] = (first, now)
        error = error_kind(exc)
        if first == now:  # said when it starts, whatever else holds the batch (an index behind)
            log.warning("metadata.write_failed", series_instance_uid=series, revision=revision, error=error)
        if now - first < self.write_retry_s:
            return False
        del self._failing[series]
        self._given_up.add((series, revision))
        NOT_WRITTEN.inc()
        log.warning(
            "metadata.not_written",
            series_instance_uid=series,
            revision=revision,
            error=error,
            retried_s=self.write_retry_s,
            fix="once the cause is fixed, `diana replay --to-beginning diana-sink-metadata` (the sink stopped) writes it",
        )
        return True

    def prepare(self, event: dict[str, Any]) -> str:
        """Write the series' metadata file for this revision; 'written', 'unchanged'. Raises
        IndexBehind while the index is behind the revision (for at most ``index_wait_s``)."""
        study, series, revision = event["study_instance_uid"], event["series_instance_uid"], event["revision"]
        target = series_metadata_path(study, series)
        count, last = series_state(self.client, self.index, study).get(series, (0, None))
        if count < event["instance_count"]:
            first = self._behind_since.setdefault((series, revision), time.monotonic())
            if time.monotonic() - first < self.index_wait_s:
                raise IndexBehind(f"the index holds {count} of the series' {event['instance_count']} instances")
            log.warning(
                "metadata.index_behind", series_instance_uid=series, indexed=count, expected=event["instance_count"]
            )
        self._behind_since.pop((series, revision), None)
        if self._current(target, count, last):
            UNCHANGED.inc()
            return "unchanged"
        entries, state = self._entries(study, series)
        if state != (count, last):
            raise IndexBehind("instances were indexed while the metadata was read; read again")
        header = PreparedHeader(study, series, revision, count, last)
        body = header.encode() + b"".join(entries)
        self.archive.put_stream(target, io.BytesIO(body), sha256=hashlib.sha256(body).hexdigest())
        PREPARED.labels(event["status"]).inc()
        log.info("metadata.prepared", series_instance_uid=series, revision=revision, instances=count)
        return "written"

    def _current(self, target: str, count: int, last: float | None) -> bool:
        try:
            with self.archive.open(target) as fh:
                return read_header(fh).same_index_state(count, last)
        except (FileNotFoundError, ValueError):
            return False

    def _entries(self, study: str, series: str) -> tuple[list[bytes], tuple[int, float | None]]:
        """Every instance line of the series (SOP Instance UID order, as WADO-RS sorts), and the index
        state read again after them (a different one means the series changed meanwhile)."""
        query = {
            "bool": {"filter": [{"term": {"study_instance_uid": study}}, {"term": {"series_instance_uid": series}}]}
        }
        entries: list[bytes] = []
        after = None
        while True:
            body: dict[str, Any] = {
                "size": PAGE,
                "query": query,
                "sort": [{"sop_instance_uid": "asc"}],
                "_source": ["sop_instance_uid", "dicom"],
            }
            if after:
                body["search_after"] = after
            hits = self.client.search(index=self.index, body=body)["hits"]["hits"]
            if not hits:
                break
            for hit in hits:
                doc = hit["_source"]
                if doc.get("dicom"):  # WADO-RS skips an instance without a header the same way
                    entries.append(encode_entry(doc["sop_instance_uid"], absolute_bulk_uris(doc["dicom"], BASE_MARKER)))
            after = hits[-1]["sort"]
        state = series_state(self.client, self.index, study).get(series, (0, None))
        return entries, state
