"""Structured logging for every diana-star process (structlog over the standard library).

Log lines carry identifiers (association, SOP Instance UID, topic/partition/offset), never
patient names: callers pass only validated identifiers as fields.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from diana.credentials import redact

__all__ = ["configure_logging", "KAFKA_CLIENT_LOGGER", "RepeatedLines"]

# librdkafka's own messages (connection refused during an outage, ...) go through this logger,
# so they are structured like everything else instead of raw lines on stderr.
KAFKA_CLIENT_LOGGER = logging.getLogger("diana.kafka")

# What differs between two lines of the same kind: durations ("after 12ms", "request:0.004s") and
# librdkafka's own counts ("3 identical error(s) suppressed", "2 request(s) timed out").
_VARYING = re.compile(r"\d+(?:\.\d+)?(?=m?s\b)|\d+(?= identical| request)")


class RepeatedLines(logging.Filter):
    """Lets the first line of a kind through, then one a ``window_s`` saying how many were held back.

    librdkafka logs every failed connection attempt: while a broker was down each client logged
    "Connection refused" about 20 times a second (docs/faults, issue 19 stop 30), 72,000 lines an
    hour per client, burying everything else; opensearch-py logs every failed request. A kind is the
    message with its durations and counts left out, so that each broker's, client's and request's
    failures stay visible."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic, max_kinds: int = 1000):
        super().__init__()
        self.window_s, self.clock, self.max_kinds = window_s, clock, max_kinds
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (when one was let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = _VARYING.sub("#", message)
        now = self.clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                self._kinds[kind] = (seen[0], seen[1] + 1)
                return False
            if seen is None and len(self._kinds) >= self.max_kinds:
                self._kinds.clear()  # bounded: at worst a kind is let through once more
            self._kinds[kind] = (now, 0)
        held = seen[1] if seen is not None else 0
        if held:
            record.msg, record.args = f"{message} ({held} more like it in the last {self.window_s:.0f} s)", None
        return True


class _OneLineTraceback(logging.Filter):
    """The exception's type and text at the end of the line instead of its traceback.

    opensearch-py logs each failed request as a warning with a 60-line traceback through urllib3
    (27 of them for one `diana status` while OpenSearch was down); the caller reports the failure
    in its own words, and the library's frames say nothing an operator can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__}: {exc})", None
            record.exc_info, record.exc_text = None, None
        return True


KAFKA_CLIENT_LOGGER.addFilter(RepeatedLines())
_OPENSEARCH_CLIENT_LOGGER = logging.getLogger("opensearch")
_OPENSEARCH_CLIENT_LOGGER.addFilter(_OneLineTraceback())
_OPENSEARCH_CLIENT_LOGGER.addFilter(RepeatedLines())


class _Redacting:
    """A renderer whose output goes through ``redact``: no credential in any log line."""

    def __init__(self, renderer: Callable[..., Any]):
        self.renderer = renderer

    def __call__(self, logger: Any, name: str, event_dict: Any) -> str:
        return redact(str(self.renderer(logger, name, event_dict)))


class _RedactedRecord(logging.LogRecord):
    """A log record whose message is redacted, whichever handler formats it (Faust installs its own)."""

    def getMessage(self) -> str:
        return redact(super().getMessage())


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks name files and lines only: a traceback with local variables (rich's default when
    # it is installed) would print whatever a frame held, a data set or a document with a patient's name.
    renderer: Callable[..., Any]
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    # Redaction runs over the rendered line, so that a password in any field, an exception's text
    # or a library's own message is hidden as well (diana/credentials.py).
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _Redacting(renderer)],
        )
    )
    logging.setLogRecordFactory(_RedactedRecord)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Library chatter below warning is noise for operators.
    for noisy in ("pynetdicom", "aiokafka", "kafka", "opensearch", "urllib3", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
