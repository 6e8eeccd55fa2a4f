"""Structured logging for every diana-star process (structlog over the standard library).

Log lines carry identifiers (association, SOP Instance UID, topic/partition/offset), never
patient names: callers pass only validated identifiers as fields.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from diana.credentials import redact

__all__ = ["configure_logging", "KAFKA_CLIENT_LOGGER", "RepeatedLines"]

# librdkafka's own messages (connection refused during an outage, ...) go through this logger,
# so they are structured like everything else instead of raw lines on stderr.
KAFKA_CLIENT_LOGGER = logging.getLogger("diana.kafka")

# What differs between two lines of the same kind: durations ("after 12ms", "request:0.004s") and
# librdkafka's own counts ("3 identical error(s) suppressed", "2 request(s) timed out").
_VARYING = re.compile(r"(?<![\w.-])(?:\d+(?:\.\d+)?(?=m?s\b)|\d+(?= identical| request))")


@dataclass
class _Kind:
    opened: float  # when its window opened: a line let through, or a summary written
    held: int = 0  # lines held back since
    first_held: float = 0.0  # the first of them (time.time())
    last: logging.LogRecord | None = None  # the last of them, the summary's model


def _start_timer(delay_s: float, callback: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay_s, callback)
    timer.daemon = True
    timer.start()
    return timer


class RepeatedLines(logging.Filter):
    """Lets the first line of a kind through, holds back the same kind for ``window_s``, then writes one
    line saying how many were held back since when (and opens a new window), so that no line is lost
    without a count, and a flood comes out as one line a window.

    librdkafka logs every failed connection attempt: while a broker was down each client logged
    "Connection refused" about 20 times a second (issue 19 stop 30), 72,000 lines an hour per client,
    burying everything else; opensearch-py logs every failed request. A kind is the message with its
    durations and counts left out, so that each broker's, client's and request's failures stay visible.
    The summary is written by a timer when the window ends (one thread, only while a count is pending),
    or by ``flush`` at exit. Lines under warning level pass untouched: they come only when asked for
    (librdkafka's debug lines, [kafka] debug), and each is wanted."""

    def __init__(
        self,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        start_timer: Callable[[float, Callable[[], None]], Any] = _start_timer,
        max_kinds: int = 1000,
    ):
        super().__init__()
        self.window_s, self.clock, self.start_timer, self.max_kinds = window_s, clock, start_timer, max_kinds
        self._lock = threading.Lock()
        self._kinds: dict[str, _Kind] = {}
        self._timer: Any = None
        self._timer_due: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        # Debug and info lines come only when asked for ([kafka] debug): every one of them is wanted.
        if getattr(record, "diana_summary", False) or record.levelno < logging.WARNING:
            return True
        try:
            return self._let_through(record)
        except Exception:  # a filter that raises reaches the code that logged: better a line too many
            return True

    def _let_through(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = _VARYING.sub("#", message)
        now = self.clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen.opened < self.window_s:
                if not seen.held:
                    seen.first_held = record.created
                    self._arm(seen.opened + self.window_s)
                seen.held, seen.last = seen.held + 1, record
                return False
            if seen is not None and seen.held:  # its window ended before the timer wrote the count
                record.msg, record.args = f"{message} ({self._held_text(seen)} before this)", None
            elif seen is None and len(self._kinds) >= self.max_kinds:
                self._kinds = {k: v for k, v in self._kinds.items() if v.held}  # the counts pending stay
                if len(self._kinds) >= self.max_kinds:
                    return True  # let through, not remembered
            self._kinds[kind] = _Kind(opened=now)
        return True

    @staticmethod
    def _held_text(seen: _Kind) -> str:
        since = time.strftime("%H:%M:%S", time.gmtime(seen.first_held))
        return f"{seen.held} like it held back since {since} UTC"

    def _arm(self, due: float) -> None:
        """The timer set for ``due`` unless it is set for earlier already (under the lock). Recorded only
        once started: a timer that could not start leaves the next line to try again."""
        if self._timer_due is not None and self._timer_due <= due:
            return
        timer = self.start_timer(max(0.0, due - self.clock()), lambda: self._on_timer(due))
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = timer, due

    def _on_timer(self, due: float) -> None:
        with self._lock:
            if self._timer_due != due:  # replaced by an earlier one after it had fired: that one writes
                return
            self._timer = self._timer_due = None
        self.flush(only_due=True)

    def flush(self, only_due: bool = False) -> None:
        """Write the count of every kind with lines held back (``only_due``: whose window has ended)."""
        summaries = []
        with self._lock:
            now = self.clock()
            next_due: float | None = None
            for seen in self._kinds.values():
                if not seen.held or seen.last is None:
                    continue
                due = seen.opened + self.window_s
                if only_due and now < due:
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                summary = logging.makeLogRecord(seen.last.__dict__)
                summary.msg, summary.args = f"{seen.last.getMessage()} ({self._held_text(seen)})", None
                summary.diana_summary = True
                summaries.append(summary)
                seen.opened, seen.held, seen.last = now, 0, None
            if next_due is not None:
                try:
                    self._arm(next_due)
                except Exception:  # no thread to be had: the next line of a kind tries again
                    pass
        for summary in summaries:
            logging.getLogger(summary.name).handle(summary)

    def reset(self) -> None:
        """Forget every kind and count (a process configuring its logging anew)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._kinds, self._timer, self._timer_due = {}, None, None


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


def _value_withheld(text: str) -> str:
    """A pydicom line without the value it quotes (``Invalid value for VR DA: '1980.01.01'``): a birth
    date or a name, read back from the index (C-FIND, QIDO-RS) or from a dose report, on every match.
    The text up to the value is kept."""
    cut = min((i for i in (text.find(":"), text.find("'"), text.find('"')) if i >= 0), default=-1)
    return text if cut < 0 else f"{text[:cut].rstrip()}: (the value is withheld from the log)"


class _ValueWithheld(logging.Filter):
    """The record's text without the value it quotes, whichever handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        record.msg, record.args = _value_withheld(text), None
        return True


def _pydicom_value_withheld(_logger: Any, _name: str, event_dict: Any) -> Any:
    """The same for the lines of pydicom's other loggers (``pydicom.pixels...``), which its filter does not see."""
    record = event_dict.get("_record")
    if record is not None and record.name.startswith("pydicom."):
        event_dict["event"] = _value_withheld(str(event_dict.get("event", "")))
    return event_dict


_CLIENT_REPEATS = (RepeatedLines(), RepeatedLines(), RepeatedLines())
KAFKA_CLIENT_LOGGER.addFilter(_CLIENT_REPEATS[0])
_OPENSEARCH_CLIENT_LOGGER = logging.getLogger("opensearch")
_OPENSEARCH_CLIENT_LOGGER.addFilter(_OneLineTraceback())  # first: the kind is the one-line message
_OPENSEARCH_CLIENT_LOGGER.addFilter(_CLIENT_REPEATS[1])
_PYDICOM_LOGGER = logging.getLogger("pydicom")  # its warnings' logger (misc.warn_and_log)
_PYDICOM_LOGGER.addFilter(_ValueWithheld())  # first: without their values, lines are of a few kinds
_PYDICOM_LOGGER.addFilter(_CLIENT_REPEATS[2])
for _repeats in _CLIENT_REPEATS:
    atexit.register(_repeats.flush)  # before logging's own shutdown (atexit runs the last registered first)


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
    for repeats in _CLIENT_REPEATS:
        repeats.reset()
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
            foreign_pre_chain=[*shared, _pydicom_value_withheld],
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
    # pydicom sends each warning to its logger (above: the value withheld) and to warnings.warn as well,
    # which would print it to stderr whole, once per distinct text: once per distinct bad value.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
