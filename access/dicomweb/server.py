"""Running DICOMweb from the configuration (`diana serve`): uvicorn, HTTPS when configured."""

from __future__ import annotations

from urllib.parse import urlsplit

import structlog
import uvicorn
from starlette.applications import Starlette

from diana.access.dicomweb.app import build_app
from diana.access.dicomweb.auth import check_exposure, credentials_from
from diana.access.qr.index_reader import IndexReader
from diana.clients import opensearch_client
from diana.config import Config, ConfigError
from diana.producers.ingest import Ingest
from diana.producers.landing import open_landing
from diana.producers.publisher import EventPublisher
from diana.schemas.codec import default_codec
from diana.storage import open_store

__all__ = ["dicomweb_app", "base_url", "public_url", "run_dicomweb"]

log = structlog.get_logger("diana.dicomweb")


def base_url(config: Config) -> str:
    web = config.dicomweb
    scheme = "https" if web.tls_cert_file else "http"
    return f"{scheme}://{web.host}:{web.port}"


def public_url(value: str) -> str:
    """``[dicomweb] public_url`` checked (an absolute http(s) URL without query, fragment or credentials),
    without its trailing slash; "" when unset. ConfigError saying what is wrong."""
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError when it is no port
    except ValueError:
        port, parts = -1, None
    if (
        parts is None
        or port == -1
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or "?" in value
        or "#" in value
        or parts.username is not None
        or any(c.isspace() for c in value)
    ):
        raise ConfigError(
            f"[dicomweb] public_url = {value!r}: use the absolute http(s) URL clients reach this service at, "
            'without query, fragment or credentials, e.g. "https://pacs.example.org/dicom-web"'
        )
    return value.rstrip("/")


def dicomweb_app(config: Config) -> tuple[Starlette, bool]:
    """The application and whether it requires authentication; ConfigError when it must not start."""
    web = config.dicomweb
    if bool(web.tls_cert_file) != bool(web.tls_key_file):
        raise ConfigError("[dicomweb] HTTPS needs both tls_cert_file and tls_key_file")
    public = public_url(web.public_url)
    credentials = credentials_from(web)
    warning = check_exposure(web, credentials)
    if warning:
        log.warning("dicomweb.plain_http", detail=warning)
    client = opensearch_client(config.opensearch, timeout=30)
    # STOW-RS lands and publishes exactly as the receiver does.
    landing = open_landing(config)
    publisher = EventPublisher(config.kafka, client_id="diana-stow")
    ingest = Ingest(landing, publisher, default_codec(), max_inflated_bytes=config.receiver.max_inflated_bytes)
    app = build_app(
        IndexReader(client, config.opensearch.index_prefix),
        open_store(config, "archive"),
        config.receiver.ae_title,
        credentials,
        cors_origins=web.cors_origins,
        max_results=web.max_results,
        ingest=ingest,
        max_stow_bytes=web.max_stow_bytes,
        max_retrieve=config.query_retrieve.max_retrieve,
        public_url=public,
    )
    return app, credentials.required


def run_dicomweb(config: Config, app: Starlette, authenticated: bool) -> None:
    """Serve ``app`` (from dicomweb_app) until SIGINT/SIGTERM (uvicorn handles them)."""
    web = config.dicomweb
    log.info("dicomweb.listening", url=base_url(config), authentication=authenticated, cors=list(web.cors_origins))
    # HTTP parser and event loop left to uvicorn's "auto": httptools and uvloop, installed with diana-star
    # (setup.cfg), where the platform has them; its pure-Python h11 and asyncio elsewhere.
    uvicorn.run(
        app,
        host=web.host,
        port=web.port,
        log_level="warning",
        access_log=False,  # URLs hold UIDs and query values (names): not for the logs
        # uvicorn reads X-Forwarded-Proto/-For from 127.0.0.1 by default: off, so the base of the URLs
        # answers carry is [dicomweb] public_url or the request itself, never a header (docs/DICOMWEB.md).
        proxy_headers=False,
        ssl_certfile=web.tls_cert_file or None,
        ssl_keyfile=web.tls_key_file or None,
    )
