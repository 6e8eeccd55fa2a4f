"""Structured logging for every diana-star process (structlog over the standard library).

Log lines carry identifiers (association, SOP Instance UID, topic/partition/offset), never
patient names: callers pass only validated identifiers as fields.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog

from diana.credentials import redact

__all__ = ["configure_logging", "KAFKA_CLIENT_LOGGER"]

# librdkafka's own messages (connection refused during an outage, ...) go through this logger,
# so they are structured like everything else instead of raw lines on stderr.
KAFKA_CLIENT_LOGGER = logging.getLogger("diana.kafka")


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
