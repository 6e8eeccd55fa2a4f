"""OpenSearch sink: bulk-indexes instances, series, studies and dose records with deterministic ids.

Document ids are the SOP / Series / Study Instance UIDs, so a re-delivered event overwrites
its own document. A record with ``superseded_by`` set (a dose event a dose report superseded,
stream_apps/dose/study.py) deletes its document: replayed, it deletes it again, or finds none.
Aggregates carry a revision used as an external version: an older revision arriving late never
replaces a newer one. Indices are versioned behind aliases
(``diana-series`` → ``diana-series-v1``) and the sink writes through the alias.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
import structlog
from confluent_kafka import Message
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import RequestError, TransportError
from prometheus_client import Counter

from diana.schemas.codec import Codec, DecodeError, default_codec
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import DEADLETTER, DOSE_ALERTS, DOSE_EVENTS, DOSE_STUDIES, INSTANCES, SERIES, STUDIES
from diana.sinks.consumer import DeadLetters, RetryableError

__all__ = [
    "OpenSearchSink",
    "PreparedBatch",
    "IndexLayout",
    "REFUSED_WHOLE_FIX",
    "ensure_indices",
    "install_template",
    "refused_whole_status",
]

log = structlog.get_logger("diana.sink.opensearch")

INDEXED = Counter("diana_opensearch_indexed_total", "Documents written to OpenSearch", ["index"])
INDEXED_WITHOUT_HEADER = Counter(
    "diana_opensearch_indexed_without_header_total",
    "Instance documents OpenSearch refused, indexed again by their identifiers (dead-lettered too)",
)
REFUSED_REQUESTS = Counter(
    "diana_opensearch_requests_refused_total",
    "Bulk requests refused as a whole (413: too large for a proxy or OpenSearch; 429: over the node's indexing "
    "pressure limit on its own; 400: malformed), sent again in halves",
    ["status"],
)
REVISION_CONFLICTS = Counter(
    "diana_opensearch_revision_conflicts_total",
    "Revisions not written because the index holds a higher one (409), by what the stored document says: "
    "replayed (it is as new: a replay or re-delivery, normal), restarted (the event is newer: the revision "
    "line started again, the document is stale), not_compared",
    ["index", "cause"],
)

# Package data (importlib.resources): found the same in a checkout and in an installed wheel.
_TEMPLATES = resources.files("diana.sinks") / "templates"


def install_template(
    client: OpenSearch, layout: IndexLayout, kind: str, replicas: int = 0, refresh_interval: str | None = None
) -> dict[str, Any]:
    """Put the project's template for ``kind``; it applies to every version ``<alias>-vN``. Return the
    template (its index ``settings`` and ``mappings``).

    ``replicas`` ([opensearch] number_of_replicas) replaces the template's own: 0 on one node, 1 on a
    cluster, where a node can stop and every shard still has a copy on another. ``refresh_interval``
    ([opensearch] refresh_interval), when given, replaces the template's (indices created from now on).
    """
    body = json.loads((_TEMPLATES / f"{kind}.json").read_text())
    body.setdefault("settings", {})["number_of_replicas"] = replicas
    if refresh_interval:
        body["settings"]["refresh_interval"] = refresh_interval
    client.indices.put_index_template(
        name=layout.alias(kind),
        body={"index_patterns": [f"{layout.alias(kind)}-v*"], "template": body, "priority": 100},
    )
    return body


def ensure_indices(
    client: OpenSearch, layout: IndexLayout, replicas: int = 0, refresh_interval: str | None = None
) -> None:
    """Install the index templates and create each versioned index with its alias, if missing; an index
    that exists is given the fields its template mapped since it was created."""
    for kind in layout.id_fields:
        template = install_template(client, layout, kind, replicas, refresh_interval)
        if client.indices.exists_alias(name=layout.alias(kind)):
            _map_new_fields(client, layout.alias(kind), kind, template["mappings"]["properties"])
        else:
            index = layout.index(kind)
            if not client.indices.exists(index=index):
                try:
                    client.indices.create(index=index)
                except RequestError as exc:  # made meanwhile by the sink's other consumer: fine
                    if exc.error != "resource_already_exists_exception":
                        raise
            client.indices.put_alias(index=index, name=layout.alias(kind))


def _map_new_fields(client: OpenSearch, alias: str, kind: str, properties: dict[str, Any]) -> None:
    """Put the template's fields on the index behind ``alias``. A template applies to indices created
    after it, and the indices are ``dynamic: false``: a field added to the template in an upgrade stayed
    unmapped, so unsearchable, in the index already there. Adding fields to a live index is allowed;
    changing a field's type is not (400): that needs a new version, which must not stop the sink."""
    try:
        client.indices.put_mapping(index=alias, body={"properties": properties})
    except RequestError as exc:
        error = exc.info.get("error") if isinstance(exc.info, dict) else None
        log.warning(
            "opensearch.mapping_not_updated",
            kind=kind,
            reason=rejection_reason(error) if isinstance(error, dict) else str(exc.error),
            fix=f"diana reindex --kinds {kind}",
        )


def deadletter_document(msg: Message) -> dict[str, Any]:
    """A dead letter as a document: where it came from, why, when; its bytes stay in Kafka."""
    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}
    origin = headers.get("origin") or f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
    reason = headers.get("reason", "")
    _, ts = msg.timestamp()
    return {
        "origin": origin,
        "origin_topic": origin.split("/", 1)[0],
        "reason": reason,
        "stage": headers.get("sink") or reason.split(":", 1)[0],
        "size_bytes": len(msg.value() or b""),
        "received_at": datetime.fromtimestamp(ts / 1000, tz=UTC).isoformat() if ts > 0 else None,
        "deadletter_offset": f"{msg.partition()}/{msg.offset()}",
    }


def _json_default(value: Any) -> str:
    """A value JSON has no type for (a Decimal, bytes...) as its text; orjson writes datetimes itself."""
    return str(value)


def _json(value: Any) -> bytes:
    """Compact UTF-8 JSON. orjson, not the standard library: a document took 12 µs there and 2.7 µs
    here, a quarter of the sink's Python work per event at reindex speed (docs/PERFORMANCE.md, issue
    19, stop 31). Datetimes come out in ISO 8601 as ``isoformat()`` writes them; NaN as null."""
    return orjson.dumps(value, default=_json_default)


# ReferringPhysicianName (0008,0090) with a value, as the receiver writes a header (keys sorted: "Value"
# before "vr"); an empty one is `{"vr":"PN"}`.
_REFERRING_WITH_VALUE = '"00080090":{"Value":['
_REFERRING = '"00080090":'
_JSON = json.JSONDecoder()


def referring_physician_from_header(header: str) -> str | None:
    """ReferringPhysicianName read from an event's header, for events written before InstanceArrived v5
    carried it as a field: a reindex of older events then makes it searchable too. The header is parsed
    only when it holds such an element with a value somewhere (a substring search: events of v5 on that
    leave the field empty mostly have none), and only its top-level element counts. The text is the
    receiver's: the name's groups joined by "=" (Alphabetic=Ideographic=Phonetic); None for none, and for
    several names (the attribute's VM is 1; the receiver writes such a list as pydicom prints it)."""
    if _REFERRING_WITH_VALUE not in header:
        return None
    at = header.find(_REFERRING)
    try:
        # Top-level members come in tag order: what precedes a top-level (0008,0090) is a few group 0008
        # elements, which parse as an object's members; before a copy inside a sequence (Original
        # Attributes, a referenced study's item) they do not. Only then is the whole header parsed
        # (seconds and a hundred MB for a 5 MB enhanced multi-frame header).
        orjson.loads(header[:at].rstrip().rstrip(",") + "}")
        element, _ = _JSON.raw_decode(header, at + len(_REFERRING))
    except ValueError:
        try:
            element = orjson.loads(header).get("00080090")
        except (ValueError, AttributeError):
            return None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], dict):
        return None
    groups = [values[0].get(name) or "" for name in ("Alphabetic", "Ideographic", "Phonetic")]
    text = "=".join(str(group) for group in groups).rstrip("=").strip()
    return text or None


def _document(record: dict[str, Any]) -> bytes:
    """The document's JSON, written once: the sizing of bulk requests and the request body use it.

    The event's header is already DICOM JSON (the receiver wrote it): it goes into the document as
    it is, never parsed and serialised again (the sink's main cost per instance at reindex speed).
    It is stored with the document but not mapped: arbitrary tags cannot explode the mapping; the
    typed fields are what is searchable.
    """
    doc = dict(record)
    header = doc.pop("header_json", None)
    if header and "referring_physician_name" in doc and doc["referring_physician_name"] is None:
        doc["referring_physician_name"] = referring_physician_from_header(header)
    text = _json(doc)
    if not header:
        return text
    if "\n" in header or "\r" in header:
        # A raw line break would end the bulk request's NDJSON line early (and what follows could pass
        # for an action): such a header (the receiver never writes one) is parsed and written compact.
        # Not JSON: the error dead-letters the event. Other JSON errors fail its document alone.
        member = orjson.dumps(orjson.loads(header))
    else:
        member = header.encode()
    # Spliced as the last member: `{...}` becomes `{...,"dicom":<header>}` (or `{"dicom":...}`).
    return b"".join((text[:-1], b"," if doc else b"", b'"dicom":', member, b"}"))


# OpenSearch's reasons for refusing a document quote the value they refused ("Preview of field's value:
# '1980-13-45'", "The prefix of the first immense term is: '[83, 69, ...]'"): a patient's data, which the
# dead letter's reason would carry into the log, the dead-letter topic and its index.
_QUOTED_VALUE = re.compile(r"\s*(Preview of field's value|The prefix of the first immense term is):.*", re.S)
_QUOTED = re.compile(r"'[^']*'")
_REASON_CHARS = 300


def rejection_reason(error: dict[str, Any]) -> str:
    """OpenSearch's error for one document as ``type: reason``, without any value it quotes.

    The field's name and type stay (what an operator needs to fix a mapping); the values go, and
    with them any other quoted text of a reason this code does not know.
    """
    reason = _QUOTED_VALUE.sub(" (value withheld)", str(error.get("reason") or ""))
    reason = _QUOTED.sub("'…'", reason).strip()
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS] + "…"
    return f"{error.get('type') or 'error'}: {reason}" if reason else str(error.get("type") or "error")


# An instance document OpenSearch refuses is indexed again by what cannot be refused: the event's strings
# (keyword and text fields take any) and the receiver's own numbers, without the header and without the
# numbers and dates read from it (a type or range the mapping does not take). Without it the archived
# instance was invisible to queries, and the metadata sink waited `metadata_index_wait_s` for it, every
# other series behind it. Derived from the template, so a typed field added there is covered.
_TYPED = {"integer", "long", "float", "double", "date", "short", "byte"}
_RECEIVER_MADE = {"received_at", "size_bytes"}
_HEADER_TYPED = frozenset(
    name
    for name, mapping in json.loads((_TEMPLATES / "instances.json").read_text())["mappings"]["properties"].items()
    if mapping.get("type") in _TYPED and name not in _RECEIVER_MADE
)


def identifiers_only(record: dict[str, Any], reason: str) -> dict[str, Any]:
    """An instance's record as indexed after OpenSearch refused it: no header, none of the header's numbers
    and dates; ``header_omitted`` says why (the refusal, its values withheld)."""
    kept = {k: v for k, v in record.items() if k not in _HEADER_TYPED and k != "header_json"}
    kept["header_omitted"] = [
        *(record.get("header_omitted") or []),
        {"path": "", "reason": f"refused by the index: {reason}"},
    ]
    return kept


def _refused_before(source: dict[str, Any]) -> bool:
    """A stored instance document written by ``identifiers_only``."""
    return any(
        not o.get("path") and str(o.get("reason", "")).startswith("refused by the index")
        for o in source.get("header_omitted") or []
    )


# What a bulk response is cut down to (``filter_path``): one entry per item, in order, as sent.
_BULK_ANSWER = "items.*.status,items.*.error.type,items.*.error.reason"


# What an aggregate's document says of its time: when its latest instance came. A later one with a lower
# revision than the index holds is a revision line started again (``_note_revision_conflicts``).
_EVENT_TIME = {"series": "last_received_at", "studies": "last_received_at"}


def _instant(value: Any) -> datetime | None:
    """A time as the event holds it (a datetime) or as the document stores it (ISO 8601); naive is UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class _CountsSaidPerMinute:
    """Counts said at most once a minute per key, each line with the count since the last one: the first of a
    key is said at once; what comes within the minute after waits, and is said by the first ``add`` or
    ``flush`` (each batch's end) once the minute has passed, never dropped. ``details`` (e.g. an example id)
    are the first given since the key's last line. Before, the failed reads of stored times had their own
    minute whose waiting count was said only by a later failed read: never, if none came."""

    WINDOW_S = 60.0

    def __init__(self, say: Callable[[Any, int, dict[str, Any]], None], clock: Callable[[], float] = time.monotonic):
        self._say = say  # (key, count since the last line, details) -> writes the line
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Any, int] = {}  # key -> count not said yet
        self._details: dict[Any, dict[str, Any]] = {}  # key -> details not said yet
        self._said_at: dict[Any, float] = {}  # key -> when its last line was written

    def add(self, key: Any, count: int, **details: Any) -> None:
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + count
            kept = self._details.setdefault(key, {})
            for name, value in details.items():
                if value is not None:
                    kept.setdefault(name, value)
        self.flush()

    def flush(self) -> None:
        """Say what waits whose minute has passed."""
        with self._lock:
            now = self._clock()
            due = [
                key for key in self._pending if key not in self._said_at or now - self._said_at[key] >= self.WINDOW_S
            ]
            lines = []
            for key in due:
                self._said_at[key] = now
                lines.append((key, self._pending.pop(key), self._details.pop(key, {})))
        for key, count, details in lines:
            self._say(key, count, details)


class _ConflictLog:
    """Revision conflicts said at most once a minute per index and cause (``_CountsSaidPerMinute``), with the
    documents counted since that line (the metric has every one). A replay refuses thousands of revisions:
    said at info, as normal; a revision line restarted is a warning, naming one of its ids as the sink's
    other lines name theirs. Before, the minute was per cause: a restarted line of another index within it
    waited for a later one of the same cause, maybe never said."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._counts = _CountsSaidPerMinute(self._say, clock)

    def add(self, index: str, cause: str, documents: int, example: str | None = None) -> None:
        self._counts.add((index, cause), documents, example=example if cause == "restarted" else None)

    def flush(self) -> None:
        self._counts.flush()

    @staticmethod
    def _say(key: tuple[str, str], count: int, details: dict[str, Any]) -> None:
        alias, cause = key
        if cause == "restarted":
            log.warning(
                "opensearch.revision_line_restarted",
                index=alias,
                documents=count,
                example_id=details.get("example"),
                meaning="events newer than their stored documents came with lower revisions: the aggregates "
                "started their revision line again, and these documents stay stale until it passes them",
                fix="docs/OPERATIONS.md, 'Revisions the index refuses'",
            )
        elif cause == "replayed":
            log.info(
                "opensearch.older_revisions_skipped",
                index=alias,
                documents=count,
                meaning="revisions older than the indexed ones (a replay or re-delivery): normal",
            )
        else:
            log.info(
                "opensearch.lower_revisions_skipped",
                index=alias,
                documents=count,
                meaning="revisions lower than the indexed ones; their times not compared",
            )


def _say_unread(_key: str, count: int, details: dict[str, Any]) -> None:
    """Reads of the stored times that failed (``_CountsSaidPerMinute``): the index and error of the first since
    the last line."""
    log.warning(
        "opensearch.revision_conflicts_unread",
        index=details.get("index"),
        documents=count,
        error=details.get("error"),
        meaning="the times of the documents holding higher revisions were not read: counted not_compared",
    )


@dataclass
class _BulkRequest:
    items: list[tuple[Message, dict, bytes]]  # (message, action metadata, the document's JSON)
    body: bytes  # the NDJSON request body


@dataclass
class PreparedBatch:
    """A batch decoded and cut into bulk requests; nothing sent yet."""

    messages: list[Message]
    requests: list[_BulkRequest] = field(default_factory=list)
    undecodable: list[tuple[Message, str]] = field(default_factory=list)  # (message, dead-letter reason)


def _request(items: list[tuple[Message, dict, bytes]]) -> _BulkRequest:
    """The NDJSON body of one bulk request: built here, the documents are JSON already (``_document``)."""
    lines: list[bytes] = []
    for _, meta, doc in items:
        action = {k: v for k, v in meta.items() if k != "op_type"}
        lines.append(orjson.dumps({meta.get("op_type", "index"): action}))
        if meta.get("op_type") != "delete":  # a delete is its action line alone
            lines.append(doc)
    lines.append(b"")
    return _BulkRequest(items, b"\n".join(lines))


# A bulk request refused as a whole: nothing of it was written, and sending it again unchanged is refused
# again (it was retried for ever, every partition of the consumer held, logged "OpenSearch unavailable").
# 413: over a proxy's limit (nginx's client_max_body_size, 1 MB by default) or OpenSearch's
# http.max_content_length (100 MB); 400: a request OpenSearch finds malformed (a validation error such as
# a version it does not take); 429 only when its own bytes exceed the node's indexing pressure limit
# (``over_pressure_limit``). Any other 429, 5xx and connection errors pass: retried as before.
_REFUSED_WHOLE = (400, 413)
REFUSED_WHOLE_FIX = {
    413: "raise the limit on a request's size (the proxy's client_max_body_size, OpenSearch's "
    "http.max_content_length) above [sinks] bulk_max_bytes, or lower [sinks] bulk_max_bytes",
    400: "the documents OpenSearch refuses alone are dead-lettered with its reason; replay them once fixed",
    429: "raise the OpenSearch node's heap (indexing_pressure.memory.limit is 10 % of it) until a request of "
    "[sinks] bulk_max_bytes fits, or lower [sinks] bulk_max_bytes",
}
# OpenSearch's indexing pressure rejections (IndexingPressure, and ShardIndexingPressure's node part: its
# shard limits move, the node's does not) name the operation's own bytes and the node's limit:
#   rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0,
#     all_bytes=0, coordinating_operation_bytes=104035178, max_coordinating_and_primary_bytes=80530636]
#   ... primary operation [..., primary_operation_bytes=N, max_coordinating_and_primary_bytes=M]
#   ... [shard_detail=[index][0], ..., shard_operation_bytes=N, ...] OR [..., node_operation_bytes=N,
#     node_max_coordinating_and_primary_bytes=M, ...]
# A node counts every bytes in flight against M: an operation of N > M bytes is refused however idle it is.
_PRESSURE = re.compile(
    r"rejected execution of (?:coordinating|primary) operation \[.*?"
    r"\b(?:coordinating_operation_bytes|primary_operation_bytes|node_operation_bytes)=(\d+)\b.*?"
    r"\b(?:max_coordinating_and_primary_bytes|node_max_coordinating_and_primary_bytes)=(\d+)\b"
)


def over_pressure_limit(reason: object) -> tuple[int, int] | None:
    """(the operation's bytes, the node's limit) if ``reason`` is OpenSearch's indexing pressure rejection
    of an operation larger than the limit itself: refused again however often it is sent. Else None (a
    node busy with other requests: transient)."""
    found = _PRESSURE.search(reason) if isinstance(reason, str) else None
    if found is None:
        return None
    operation, limit = int(found.group(1)), int(found.group(2))
    return (operation, limit) if operation > limit else None


def _reasons(exc: TransportError) -> list[object]:
    """The reasons of an OpenSearch error answer: its error's and its root causes'."""
    error = exc.info.get("error") if isinstance(exc.info, dict) else None
    if not isinstance(error, dict):
        return []
    causes = error.get("root_cause")
    causes = causes if isinstance(causes, list) else []
    return [error.get("reason"), *(cause.get("reason") for cause in causes if isinstance(cause, dict))]


def _pressure_of(exc: TransportError) -> tuple[int, int] | None:
    return next(filter(None, map(over_pressure_limit, _reasons(exc))), None)


def _opensearch_error(exc: TransportError) -> dict[str, Any] | None:
    """OpenSearch's own error answer (JSON, ``error.type``), or None: a proxy's page, plain text."""
    error = exc.info.get("error") if isinstance(exc.info, dict) else None
    return error if isinstance(error, dict) and error.get("type") else None


def refused_whole_status(exc: TransportError) -> int | None:
    """413, 400 or 429 if OpenSearch (or a proxy before it) refused the request as a whole, sending it
    again unchanged is refused again; else None. A 400 counts only in OpenSearch's words (its JSON error):
    a proxy's 400 page (nginx's "Request Header Or Cookie Too Large", a reload gone wrong) says nothing of
    the documents and is retried."""
    if isinstance(exc, OSConnectionError):
        return None
    if exc.status_code == 429:
        return 429 if _pressure_of(exc) is not None else None
    if exc.status_code == 400:
        return 400 if _opensearch_error(exc) is not None else None
    return int(exc.status_code) if exc.status_code in _REFUSED_WHOLE else None


def _described(exc: TransportError) -> str:
    """An error for the log: OpenSearch's type and reason, or the status alone (not a proxy's page)."""
    error = _opensearch_error(exc) if not isinstance(exc, OSConnectionError) else None
    if error is not None or isinstance(exc, OSConnectionError) or not isinstance(exc.status_code, int):
        return str(exc)
    return f"HTTP {exc.status_code}, not in the words of OpenSearch (a proxy before it?)"


def _pressure_refusal(body_bytes: int, operation: int, limit: int) -> dict[str, str]:
    return {
        "type": "request_too_large",
        "reason": f"HTTP 429 for a bulk request of this document alone ({body_bytes} bytes): OpenSearch counts "
        f"{operation} bytes, over the indexing pressure limit of the node, {limit} bytes: the document is too "
        "large for this node; raise its heap (indexing_pressure.memory.limit is 10 % of it) and replay it",
    }


def _refusal(exc: TransportError, body_bytes: int) -> dict[str, str]:
    """The error of a document whose bulk request, holding it alone, was refused as a whole: an item's
    error as ``_outcomes`` reads it. No text of a proxy's answer; OpenSearch's goes through
    ``rejection_reason`` as a document's does (quoted values withheld)."""
    # The sink's own words carry no apostrophe: ``rejection_reason`` withholds any text between two of them.
    if exc.status_code == 413:
        return {
            "type": "request_too_large",
            "reason": f"HTTP 413 for a bulk request of this document alone ({body_bytes} bytes): over the "
            "client_max_body_size of a proxy or the http.max_content_length of OpenSearch",
        }
    pressure = _pressure_of(exc) if exc.status_code == 429 else None
    if pressure is not None:
        return _pressure_refusal(body_bytes, *pressure)
    error = _opensearch_error(exc) or {}  # a 400 reaches here only in OpenSearch's words (refused_whole_status)
    return {
        "type": str(error.get("type") or "bad_request"),
        "reason": f"bulk request refused as a whole (HTTP 400): {error.get('reason') or ''}",
    }


class _RequestSizes:
    """What the sink knows of the size of request a proxy or OpenSearch takes, shared by its threads.

    ``split_at``: a request at least this large (of more than one document) is cut in halves before it is
    sent. It is the smallest request of several documents refused whole (413, 429 over the indexing pressure
    limit), taken only from a split in which some request was accepted (a proxy refusing everything for a
    while says nothing of sizes), never at or below the largest body accepted lately, cleared by a body of
    its size accepted, and forgotten after ``FORGET_S``: the next request goes at [sinks] bulk_max_bytes
    again (one refused request then sets it again). Before, the smallest size refused stayed until a restart.

    ``largest_accepted``: the largest body accepted in the last ``ACCEPTED_WINDOW_S`` to 2x that. A document
    alone no larger than it, refused with 413, is not refused for its size (``_send_parts``)."""

    FORGET_S = 600.0
    ACCEPTED_WINDOW_S = 300.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._split_at = float("inf")
        self._split_set_at = 0.0
        # the largest body accepted in this window and in the one before (a limit lowered meanwhile is
        # believed within two windows)
        self._accepted = (0, 0)
        self._window_started = clock()

    def _roll(self, now: float) -> None:
        passed = int((now - self._window_started) // self.ACCEPTED_WINDOW_S)
        if passed >= 1:
            self._accepted = (0, self._accepted[0]) if passed == 1 else (0, 0)
            self._window_started += passed * self.ACCEPTED_WINDOW_S

    def _forget(self, now: float) -> None:
        if self._split_at != float("inf") and now - self._split_set_at >= self.FORGET_S:
            self._split_at = float("inf")

    def split_at(self) -> float:
        with self._lock:
            self._forget(self._clock())
            return self._split_at

    def largest_accepted(self) -> int:
        with self._lock:
            self._roll(self._clock())
            return max(self._accepted)

    def accepted(self, body_bytes: int) -> None:
        with self._lock:
            self._roll(self._clock())
            self._accepted = (max(self._accepted[0], body_bytes), self._accepted[1])
            if body_bytes >= self._split_at:  # taken after all (a single document, sent whatever its size)
                self._split_at = float("inf")

    def refused(self, body_bytes: int) -> None:
        """A request of several documents refused whole, in a split where some request was accepted."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            self._forget(now)
            if body_bytes > max(self._accepted) and body_bytes < self._split_at:
                self._split_at, self._split_set_at = body_bytes, now


@dataclass
class _Split:
    """One request sent, and the halves it was cut into, as they went."""

    split_at: float  # the sink's split_at when it started, lowered by the refusals of this split
    accepted: int = 0  # requests answered
    refused: list[int] = field(default_factory=list)  # sizes of the requests of several documents refused
    unproven: int = 0  # documents refused alone, with no proof the refusal is theirs (413, 400)
    status: int | None = None  # the status of the last refusal


class OpenSearchSink:
    name = "opensearch"
    CONFLICTS_READ = 200  # stored times read per batch and index on revision conflicts (the rest not compared)
    topics: tuple[str, ...] = (
        INSTANCES.name,
        SERIES.name,
        STUDIES.name,
        DOSE_EVENTS.name,
        DOSE_STUDIES.name,
        DOSE_ALERTS.name,
        DEADLETTER.name,
    )

    def __init__(
        self,
        client: OpenSearch,
        layout: IndexLayout,
        codec: Codec | None = None,
        max_bytes: int = 5_000_000,
        index_version: int | None = None,
        conflict_policy: str = "KEEP_FIRST",
        topics: tuple[str, ...] | None = None,
        parallel_requests: int = 1,
        number_of_replicas: int = 0,
        refresh_interval: str | None = None,
        refresh_on_write: bool = False,
        clock: Callable[[], float] = time.monotonic,  # of the lines said at most once a minute
    ):
        self.client = client
        self.number_of_replicas = number_of_replicas  # of the indices it creates ([opensearch])
        self.refresh_interval = refresh_interval
        # [opensearch] refresh_on_write: the refresh runs inside the bulk request, on OpenSearch's write
        # thread, instead of waiting for the next scheduled one on the (one-thread) refresh pool.
        self._bulk_params = {"refresh": "true"} if refresh_on_write else {}
        # A subset of the topics (the live sink runs instances apart from the aggregates: the
        # aggregator's revisions never wait in front of instance documents).
        if topics is not None:
            unknown = set(topics) - set(OpenSearchSink.topics)
            if unknown:
                raise ValueError(f"not topics of the OpenSearch sink: {sorted(unknown)}")
            self.topics = tuple(topics)
        # Bulk requests of one batch sent at once (reindex: the cluster indexes on every core).
        self.parallel_requests = max(1, parallel_requests)
        # Same SOP Instance UID, different bytes: the index describes the version the archive keeps
        # ([sinks] archive_conflict_policy). KEEP_FIRST and KEEP_BOTH: the first event creates the
        # document and later ones are refused (409); REPLACE: the latest event overwrites it.
        self.first_wins = conflict_policy in ("KEEP_FIRST", "KEEP_BOTH")
        self.max_bytes = max_bytes
        # None: write through the aliases (the live sink); a number: into that version (reindex).
        self.index_version = index_version
        self.layout = layout
        self.codec = codec or default_codec()
        self._indices_ready = False
        # The size of request taken (``_RequestSizes``): a request larger than one refused is split before it
        # is sent (with a proxy's 1 MB against 5 MB requests, every request went up 7 times, 3 of them refused).
        self._sizes = _RequestSizes()
        self._refusals_said: set[int] = set()  # statuses of whole-request refusals logged (once each)
        self._conflicts = _ConflictLog(clock)
        # Conflicts left not compared by failed reads of the stored times: one minute for all indices.
        self._unread = _CountsSaidPerMinute(_say_unread, clock)

    def prepare_indices(self) -> bool:
        """Install the templates and create the indices now, before consuming: done with the first batch
        instead, it held that batch's events seconds (index creation) behind a pipeline's start (issue 19).
        False if OpenSearch does not answer: the first batch tries again (and retries until it does)."""
        if self._indices_ready or self.index_version is not None:
            return True
        try:
            ensure_indices(self.client, self.layout, self.number_of_replicas, self.refresh_interval)
        except (OSConnectionError, TransportError) as exc:
            log.warning("opensearch.indices_later", error=str(exc))
            return False
        self._indices_ready = True
        return True

    def write(self, batch: list[Message], dead: DeadLetters) -> None:
        self.write_prepared(self.prepare(batch), dead)

    def prepare(self, batch: list[Message]) -> PreparedBatch:
        """Decode a batch and build its bulk requests, touching neither OpenSearch nor the dead letters:
        reindex prepares the next batch while this one's requests are in flight."""
        prepared = PreparedBatch(batch)
        # (message, action metadata, the document's JSON)
        actions: list[tuple[Message, dict, bytes]] = []
        for msg in batch:
            kind = self.layout.kinds[msg.topic()]  # subscribed to those topics only
            if msg.topic() == DEADLETTER.name:
                record = deadletter_document(msg)
            else:
                try:
                    _, record = self.codec.decode(msg.value())
                except DecodeError as exc:
                    prepared.undecodable.append((msg, f"opensearch: {exc}"))
                    continue
            index = (
                self.layout.alias(kind) if self.index_version is None else self.layout.index(kind, self.index_version)
            )
            meta: dict[str, Any] = {"_index": index, "_id": record[self.layout.id_fields[kind]]}
            if record.get("superseded_by"):
                # Kept in the topic's order behind the event it retracts (the same study key, one
                # partition), and the latest action of a batch per id wins: never undone by the event.
                actions.append((msg, {**meta, "op_type": "delete"}, b""))
                continue
            if "revision" in record:
                meta.update(version=record["revision"], version_type="external_gte")
            if kind == "instances" and self.first_wins:
                meta["op_type"] = "create"
            actions.append((msg, meta, _json(record) if kind == "deadletters" else _document(record)))
        # Within one bulk request, later events for the same document supersede earlier ones; for
        # documents only ever created (first wins), the earliest stays.
        latest: dict[tuple[str, str], tuple[Message, dict, bytes]] = {}
        for item in actions:
            key = (item[1]["_index"], item[1]["_id"])
            if not (item[1].get("op_type") == "create" and key in latest):
                latest[key] = item
        pending = list(latest.values())
        # Requests stay under max_bytes (roughly: the documents' JSON size), and a batch is cut into
        # parallel_requests of them at least: one bulk request into one shard is indexed by one of
        # OpenSearch's write threads, so a batch sent whole used one core (issue 19, docs/PERFORMANCE.md).
        per_request = -(-len(pending) // self.parallel_requests)
        chunk: list[tuple[Message, dict, bytes]] = []
        size = 0
        for item in pending:
            item_size = len(item[2])
            if chunk and (size + item_size > self.max_bytes or len(chunk) == per_request):
                prepared.requests.append(_request(chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += item_size
        if chunk:
            prepared.requests.append(_request(chunk))
        return prepared

    def write_prepared(self, prepared: PreparedBatch, dead: DeadLetters) -> None:
        """Send a prepared batch's requests (up to ``parallel_requests`` at once) and park what cannot be indexed."""
        for msg, reason in prepared.undecodable:
            dead.send(msg, reason)
        requests = prepared.requests
        conflicts: list[tuple[Message, dict]] = []
        if self.parallel_requests == 1 or len(requests) == 1:
            for each in requests:
                conflicts += self._bulk(each, dead)
        else:
            with ThreadPoolExecutor(self.parallel_requests) as pool:
                # Every request runs to its end; the first RetryableError is raised after all of them.
                futures = [pool.submit(self._bulk, each, dead) for each in requests]
                errors = [f.exception() for f in futures]
            for error in errors:
                if error is not None:
                    raise error
            for future in futures:
                conflicts += future.result()
        # Counted once the batch is written: a batch that raised is written again and refused again (before,
        # its conflicts were counted at each try).
        if conflicts:
            self._note_revision_conflicts(conflicts)
        self._conflicts.flush()
        self._unread.flush()

    def _bulk(self, request: _BulkRequest, dead: DeadLetters) -> list[tuple[Message, dict]]:
        """Send one request, park what cannot be indexed; return its revision conflicts (not counted yet)."""
        try:
            if not self._indices_ready and self.index_version is None:
                ensure_indices(self.client, self.layout, self.number_of_replicas, self.refresh_interval)
                self._indices_ready = True
        except (OSConnectionError, TransportError) as exc:
            raise RetryableError(f"OpenSearch unavailable: {exc}") from exc
        result = self._send_retryable(request.items, request.body)
        created_before: list[tuple[Message, dict, bytes]] = []
        conflicts: list[tuple[Message, dict]] = []
        refused = self._outcomes(
            request.items, result, dead, created_before=created_before, revision_conflicts=conflicts
        )
        if refused:
            self._index_identifiers_only(refused, dead)
        if created_before:
            self._complete_identifiers_only(created_before, dead)
        return conflicts

    def _send(self, body: bytes) -> dict[str, Any]:
        """One bulk request. Only each item's status and error come back: the rest of an answer (index,
        id, version, shards, sequence numbers: ~200 bytes per document) would be parsed for nothing."""
        return self.client.bulk(body=body, filter_path=_BULK_ANSWER, params=self._bulk_params)

    def _send_retryable(self, items: list[tuple[Message, dict, bytes]], body: bytes) -> dict[str, Any]:
        """``_send``; OpenSearch not answering is a RetryableError (the batch is written again). A request
        refused as a whole (413, 400 in OpenSearch's words, a 429 over the node's indexing pressure limit) is
        sent again in halves, down to its documents: one refused alone gets that refusal as its item's answer
        (``_refusal``), dead-lettered as any document OpenSearch refuses. But not when the refusal hit every
        request of the split: no request accepted and a document refused alone with a 413 or 400 (a proxy
        refusing everything, OpenSearch refusing every request) is a RetryableError, the batch written again
        with the consumer's backoff; before, the whole batch was dead-lettered and its offsets committed."""
        split = _Split(self._sizes.split_at())
        answers = self._send_parts(items, body, split)
        if split.unproven and not split.accepted:
            raise RetryableError(
                f"every bulk request refused as a whole (HTTP {split.status}), none accepted, down to single "
                f"documents: not the documents, retried; fix: {REFUSED_WHOLE_FIX[split.status or 413]}"
            )
        if split.accepted:  # sizes refused while requests went through: a limit on size
            for refused_bytes in split.refused:
                self._sizes.refused(refused_bytes)
        return {"items": answers}

    def _send_parts(self, items: list[tuple[Message, dict, bytes]], body: bytes, split: _Split) -> list[dict[str, Any]]:
        if len(items) > 1 and len(body) >= split.split_at:
            return self._send_halves(items, split)
        try:
            answers = list(self._send(body)["items"])
        except (OSConnectionError, TransportError) as exc:
            status = refused_whole_status(exc)
            if status is None:
                raise RetryableError(f"OpenSearch unavailable: {_described(exc)}") from exc
            refused = exc
        else:
            split.accepted += 1
            self._sizes.accepted(len(body))
            return self._items_over_pressure_in_parts(items, body, answers, split)
        self._say_refused(status, len(items), len(body))
        split.status = status
        if len(items) == 1:
            if status == 413 and len(body) <= (largest := self._sizes.largest_accepted()):
                raise RetryableError(
                    f"HTTP 413 for a document alone of {len(body)} bytes, no larger than a request accepted "
                    f"lately ({largest} bytes): not its size, retried"
                ) from refused
            if status != 429:  # a 429 names the operation's bytes over the node's limit: the document's own
                split.unproven += 1
            # A document over the node's indexing pressure limit alone is refused as too large (a 429 item is
            # retried, ``_outcomes``): the same answer as a 413's.
            item_status = 413 if status == 429 else status
            return [
                {items[0][1].get("op_type", "index"): {"status": item_status, "error": _refusal(refused, len(body))}}
            ]
        if status in (413, 429):
            split.refused.append(len(body))
            split.split_at = min(split.split_at, len(body))
        return self._send_halves(items, split)

    def _items_over_pressure_in_parts(
        self, items: list[tuple[Message, dict, bytes]], body: bytes, answers: list[dict[str, Any]], split: _Split
    ) -> list[dict[str, Any]]:
        """The items a shard's request held, refused with a 429 for that request's own size (a primary on
        another node, or shard indexing pressure, refuse per shard, the rest of the request written): sent
        again in halves; one refused alone is refused as too large."""
        over: dict[int, tuple[int, int]] = {}
        for i, answer in enumerate(answers):
            outcome = next(iter(answer.values()))
            error = outcome.get("error")
            pressure = over_pressure_limit(error.get("reason")) if isinstance(error, dict) else None
            if outcome.get("status") == 429 and pressure is not None:
                over[i] = pressure
        if not over:
            return answers
        self._say_refused(429, len(over), len(body))
        if len(items) == 1:
            return [
                {items[0][1].get("op_type", "index"): {"status": 413, "error": _pressure_refusal(len(body), *over[0])}}
            ]
        again = [items[i] for i in over]
        redone = iter(
            self._send_halves(again, split) if len(again) > 1 else self._send_parts(again, _request(again).body, split)
        )
        return [next(redone) if i in over else answer for i, answer in enumerate(answers)]

    def _say_refused(self, status: int, documents: int, body_bytes: int) -> None:
        REFUSED_REQUESTS.labels(str(status)).inc()
        if status in self._refusals_said:
            return
        self._refusals_said.add(status)
        log.warning(
            "opensearch.request_refused",
            status=status,
            documents=documents,
            bytes=body_bytes,
            action="sent again in halves; a document refused alone is dead-lettered, unless none was accepted "
            "(then retried)",
            fix=REFUSED_WHOLE_FIX[status],
        )

    def _send_halves(self, items: list[tuple[Message, dict, bytes]], split: _Split) -> list[dict[str, Any]]:
        half = len(items) // 2
        first, second = items[:half], items[half:]
        return [
            *self._send_parts(first, _request(first).body, split),
            *self._send_parts(second, _request(second).body, split),
        ]

    def _outcomes(
        self,
        items: list[tuple[Message, dict, bytes]],
        result: dict[str, Any],
        dead: DeadLetters,
        written: set[int] | None = None,
        created_before: list[tuple[Message, dict, bytes]] | None = None,
        revision_conflicts: list[tuple[Message, dict]] | None = None,
    ) -> list[tuple[Message, dict, str]]:
        """Count what was written (into ``written``, by ``id`` of the message, if given), park what was
        refused but instances; return the refused instances (message, action metadata, reason) and
        raise RetryableError if any document was not accepted for now. ``created_before``: the items
        whose ``create`` found a document there (first wins); ``revision_conflicts``: the revisions
        (external versions) refused because the index holds a higher one (message, action metadata)."""
        refused: list[tuple[Message, dict, str]] = []
        retry = []
        indexed: dict[str, int] = {}  # topic -> documents written (one metric update per topic)
        for (msg, meta, doc), item in zip(items, result["items"], strict=True):
            outcome = next(iter(item.values()))
            status = outcome.get("status", 500)
            if 200 <= status < 300:
                indexed[msg.topic()] = indexed.get(msg.topic(), 0) + 1
                if written is not None:
                    written.add(id(msg))
            elif status == 409:
                # a newer revision is already indexed, or (first wins) the instance already is
                if created_before is not None and meta.get("op_type") == "create":
                    created_before.append((msg, meta, doc))
                elif revision_conflicts is not None and "version" in meta:
                    revision_conflicts.append((msg, meta))
            elif status == 404 and meta.get("op_type") == "delete":
                pass  # a retracted document that was never indexed (a new index version), or is gone already
            elif status == 429 or status >= 500:
                retry.append(outcome.get("error", {}).get("type", str(status)))
            elif msg.topic() == DEADLETTER.name:  # never dead-letter a dead letter: that could loop
                log.error(
                    "deadletter.not_indexed", origin=meta["_id"], error=rejection_reason(outcome.get("error", {}))
                )
            elif self.layout.kinds[msg.topic()] == "instances":
                refused.append((msg, meta, rejection_reason(outcome.get("error", {}))))
            else:
                dead.send(msg, f"opensearch rejected {meta['_id']}: {rejection_reason(outcome.get('error', {}))}")
        for topic, count in indexed.items():
            INDEXED.labels(self.layout.alias(self.layout.kinds[topic])).inc(count)
        if retry:
            # Successful items are rewritten with the same id next time: idempotent.
            raise RetryableError(f"{len(retry)} documents not accepted ({retry[0]})")
        return refused

    def _note_revision_conflicts(self, conflicts: list[tuple[Message, dict]]) -> None:
        """Count and say the revisions the index refused for a higher one it holds (409). Mostly a replay or
        a re-delivery of revisions written before: normal. But a revision line that started again at 1 (the
        aggregates' changelog made anew, another [stream] app_id) is refused the same way, and its documents
        stayed stale without a sign. Told apart by time: a series' or study's event whose latest instance
        (``last_received_at``) came after the stored document's, with a lower revision, is a line restarted.
        One read of the stored times per batch and index with such conflicts, of at most ``CONFLICTS_READ``
        ids (the rest not compared), from the last refresh (``realtime=False``: a real-time read refreshes
        the index, which a reindex runs with refresh off); a document written since then is not compared
        either. A read that fails leaves them not compared (the batch goes on), said at most once a minute."""
        groups: dict[tuple[str, str], list[tuple[Message, dict]]] = {}
        for msg, meta in conflicts:
            groups.setdefault((self.layout.kinds[msg.topic()], meta["_index"]), []).append((msg, meta))
        for (kind, index), items in groups.items():
            alias = self.layout.alias(kind)
            field_name = _EVENT_TIME.get(kind)
            stored: dict[str, Any] = {}
            if field_name is not None:
                ids = list(dict.fromkeys(meta["_id"] for _, meta in items))[: self.CONFLICTS_READ]
                try:
                    found = self.client.mget(
                        index=index, body={"ids": ids}, _source_includes=[field_name], realtime=False
                    )
                    stored = {d["_id"]: d["_source"].get(field_name) for d in found["docs"] if d.get("found")}
                except (OSConnectionError, TransportError) as exc:
                    self._unread.add("reads", len(items), index=alias, error=type(exc).__name__)
            counts = {"replayed": 0, "restarted": 0, "not_compared": 0}
            example = None
            for msg, meta in items:
                stored_at = _instant(stored.get(meta["_id"]))
                event_at = None
                if field_name is not None and stored_at is not None:
                    event_at = _instant(self.codec.decode(msg.value())[1].get(field_name))  # decoded before
                if stored_at is None or event_at is None:
                    counts["not_compared"] += 1
                elif event_at > stored_at:
                    counts["restarted"] += 1
                    example = example or meta["_id"]
                else:
                    counts["replayed"] += 1
            for cause, count in counts.items():
                if count:
                    REVISION_CONFLICTS.labels(alias, cause).inc(count)
                    self._conflicts.add(alias, cause, count, example if cause == "restarted" else None)

    def _complete_identifiers_only(self, created_before: list[tuple[Message, dict, bytes]], dead: DeadLetters) -> None:
        """First wins, and the index holds an identifiers-only document of these very bytes (refused
        before, sent again once the cause is fixed, e.g. by a receiver that now leaves a value out): the
        whole document replaces it, provided nothing wrote it meanwhile. Any other 409 is first wins
        keeping the first copy (a copy of other bytes never replaces it, as the archive keeps the first)."""
        try:
            # Real time (a search would miss a document written since the last refresh: a reindex fills
            # with refresh off); read only on a 409, which a running sink rarely gets.
            found = self.client.mget(
                index=created_before[0][1]["_index"],
                body={"ids": [meta["_id"] for _, meta, _ in created_before]},
                _source_includes=["sha256", "header_omitted"],
            )
        except (OSConnectionError, TransportError) as exc:
            raise RetryableError(f"OpenSearch unavailable: {exc}") from exc
        unread = sum(1 for d in found["docs"] if "error" in d)
        if unread:  # a shard that failed: those documents keep what they hold, said
            log.warning("opensearch.restore_unread", documents=unread)
        stored = {d["_id"]: d for d in found["docs"] if d.get("found")}
        items = []
        for msg, meta, doc in created_before:
            hit = stored.get(meta["_id"])
            if hit is None or not _refused_before(hit["_source"]):
                continue
            _, record = self.codec.decode(msg.value())  # decoded before: it cannot fail now
            if record.get("sha256") == hit["_source"].get("sha256"):
                # The index that holds it, not the alias: a reindex swapping it meanwhile makes the
                # condition fail there instead of writing the new version with the old one's number.
                when = {"if_seq_no": hit["_seq_no"], "if_primary_term": hit["_primary_term"]}
                items.append((msg, {"_index": hit["_index"], "_id": meta["_id"], **when}, doc))
        if not items:
            return
        result = self._send_retryable(items, _request(items).body)
        written: set[int] = set()
        for msg, meta, reason in self._outcomes(items, result, dead, written):
            dead.send(msg, f"opensearch rejected {meta['_id']}: {reason}")
        if written:
            log.info("opensearch.header_restored", documents=len(written))
        if len(written) < len(items):  # written meanwhile (409): what is there stays
            log.warning("opensearch.restore_not_written", documents=len(items) - len(written))

    def _index_identifiers_only(self, refused: list[tuple[Message, dict, str]], dead: DeadLetters) -> None:
        """Index refused instances by their identifiers (``identifiers_only``); each is also dead-lettered
        with OpenSearch's reason, for the operator to see and replay once the cause is fixed."""
        items = []
        for msg, meta, reason in refused:
            _, record = self.codec.decode(msg.value())  # decoded before: it cannot fail now
            items.append((msg, meta, _document(identifiers_only(record, reason))))
        result = self._send_retryable(items, _request(items).body)
        written: set[int] = set()
        there: list[tuple[Message, dict, bytes]] = []
        self._outcomes(items, result, dead, written, created_before=there)
        indexed_before = {id(msg) for msg, _, _ in there}
        for msg, meta, reason in refused:
            if id(msg) in indexed_before:  # first wins: a document was there (or this one, by a try before)
                dead.send(msg, f"opensearch rejected {meta['_id']} (indexed before, or without its header): {reason}")
            elif id(msg) not in written:
                dead.send(msg, f"opensearch rejected {meta['_id']}: {reason}")
            else:
                INDEXED_WITHOUT_HEADER.inc()
                log.warning("opensearch.indexed_without_header", sop_instance_uid=meta["_id"], reason=reason)
                dead.send(msg, f"opensearch rejected {meta['_id']} (indexed without its header): {reason}")
