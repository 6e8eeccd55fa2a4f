"""What every command shares: stopping on signals, starting a metrics endpoint, saying what went wrong."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import threading
from datetime import date
from typing import Any, TextIO

from diana.config import Config
from diana.credentials import redact

__all__ = [
    "stop_on_signals",
    "start_metrics",
    "fail",
    "progress_bar",
    "service_error",
    "whole_number",
    "calendar_day",
    "os_error",
    "open_private",
]


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, for services that stop cleanly between two units of work."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def start_metrics(cfg: Config, port: int) -> None:
    """Serve Prometheus /metrics on ``port`` (0: none)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=cfg.metrics.host)


def open_private(path: str) -> TextIO:
    """``path`` opened for writing text (``newline=""``, for csv), readable by its owner only: a file the
    command writes patient data into (a cohort's patient IDs, a collect job's accession numbers). Mode 600
    from creation, and 600 also over a file of ours there before; a device (``/dev/stdout``) keeps its mode
    (not ours to change), as the import report (producers/bulk_import.py). Another user's file that others
    may read is refused before anything in it is touched (emptied, then refused its mode change, it lost
    its content for nothing); a filesystem without modes (vfat) keeps its own."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_mode & 0o077 and st.st_uid != os.geteuid():
                raise PermissionError(
                    errno.EPERM, "it belongs to another user and others may read it: remove it or write elsewhere", path
                )
            if st.st_mode & 0o077:
                try:
                    os.fchmod(fd, 0o600)
                except PermissionError:  # a filesystem without per-file modes (vfat, some CIFS mounts)
                    pass
            os.ftruncate(fd, 0)
        return open(fd, "w", newline="", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def whole_number(minimum: int):
    """An argparse type: a whole number of at least ``minimum``, or argparse's usage error saying so."""
    import argparse

    def parse(text: str) -> int:
        value = int(text)  # ValueError: argparse says "invalid whole number value: 'x'"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum}, not {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its message
    return parse


def calendar_day(text: str) -> date:
    """An argparse type: a date written YYYY-MM-DD, or argparse's usage error naming the form."""
    return date.fromisoformat(text)  # ValueError: argparse says "invalid YYYY-MM-DD date value: 'x'"


calendar_day.__name__ = "YYYY-MM-DD date"  # argparse names the type in its message


def os_error(exc: OSError) -> str:
    """An operating system's refusal as one line: what, and the file(s) it was about."""
    what = exc.strerror or str(exc) or type(exc).__name__
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what}: {' -> '.join(files)}" if files else what


def fail(command: str, message: str, code: int = 2) -> int:
    """Print ``diana COMMAND: MESSAGE`` on stderr and return the exit status (2: usage, 1: the world)."""
    print(f"diana {command}: {redact(message)}", file=sys.stderr)
    return code


class _NoBar:
    """What a command does with a tqdm bar (update, total, refresh), doing nothing."""

    total: int | None = None

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def refresh(self) -> None:
        pass


def progress_bar(disabled: bool, **options: Any) -> Any:
    """A tqdm bar with ``options``; with ``disabled`` (--no-progress) a stand-in, without importing tqdm:
    20 ms of a command's start, most of it tqdm looking its own version up in the installed packages."""
    if disabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(**options)


def service_error(exc: BaseException, cfg: Config) -> str | None:
    """What to tell a person when ``exc`` says Kafka or OpenSearch did not answer, failed TLS or refused
    the credentials: which service, at which address, what it said, and where that is set. None for any
    other error (a bug's traceback is what its report needs). Only the clients already imported are
    looked at. The caller redacts the text."""
    kafka = sys.modules.get("confluent_kafka")
    if kafka is not None and isinstance(exc, kafka.KafkaException) and exc.args:
        error = exc.args[0]
        if isinstance(error, kafka.KafkaError):
            return _kafka_error(kafka.KafkaError, error, cfg)
    opensearch = sys.modules.get("opensearchpy.exceptions")
    if opensearch is not None:
        return _opensearch_error(opensearch, exc, cfg)
    return None


def _kafka_error(codes: Any, error: Any, cfg: Config) -> str | None:
    at, said, where = f"Kafka at {cfg.kafka.bootstrap}", error.str(), "[kafka] bootstrap (DIANA_KAFKA_BOOTSTRAP)"
    code = error.code()
    if code == codes._SSL:
        return f"{at}: TLS failed ({said}). The broker's CA is [kafka] ssl_ca_file; its address is {where}."
    if code in (codes._AUTHENTICATION, codes.SASL_AUTHENTICATION_FAILED):
        return f"{at} refused the credentials ({said}): [kafka] sasl_username, and DIANA_KAFKA_SASL_PASSWORD or sasl_password_file."
    if code in (codes._TRANSPORT, codes._ALL_BROKERS_DOWN, codes._RESOLVE):
        # librdkafka says _TRANSPORT for a failed TLS or SASL handshake too: its text says which.
        return f"{at} did not answer ({said}). Is it running? (`diana stack status` for the local stack.) Its address is {where}."
    if code == codes._TIMED_OUT:
        return f"{at} did not answer in time ({said}); its address is {where}."
    return None


def _opensearch_error(exceptions: Any, exc: BaseException, cfg: Config) -> str | None:
    at, where = f"OpenSearch at {cfg.opensearch.url}", "[opensearch] url (DIANA_OPENSEARCH_URL)"
    if isinstance(exc, exceptions.SSLError):  # before ConnectionError, its base: the server did answer
        return f"{at}: TLS failed ({exc.info or exc.error}). Its CA is [opensearch] ca_file; its address is {where}."
    if isinstance(exc, exceptions.ConnectionTimeout):
        return f"{at} did not answer in time ({exc.info or exc.error}); its address is {where}."
    if isinstance(exc, exceptions.ConnectionError):  # refused, unresolvable
        return (
            f"{at} did not answer ({exc.info or exc.error}). Is it running? (`diana stack status` for the local "
            f"stack.) Its address is {where}."
        )
    if isinstance(exc, exceptions.AuthenticationException):
        return (
            f"{at} refused the credentials (HTTP 401): [opensearch] username, and DIANA_OPENSEARCH_PASSWORD or "
            "password_file."
        )
    return None
