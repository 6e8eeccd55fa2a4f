"""`diana route`: one worker thread per destination, built from the config and the rules file."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import KafkaException

from diana.access.deid import Deidentifier
from diana.access.keyfiles import read_site_secret
from diana.access.pseudonyms import ProjectKeys
from diana.access.qr.server import destination_tls
from diana.access.routing.rules import Destination, RoutingRules, RulesError, load_rules
from diana.access.routing.senders import make_sender
from diana.access.routing.sent import StudiesSent
from diana.access.routing.worker import IndexUnavailable, RouteWorker, WorkerSettings, rule_topics
from diana.clients import opensearch_client
from diana.config import Config, ConfigError, remote_plain_http_hosts, warn_clear_text
from diana.schemas.layout import IndexLayout
from diana.storage import open_store

__all__ = ["load_configured_rules", "group_id", "destination_topics", "build_workers", "run_routing", "stow_in_clear"]

log = structlog.get_logger("diana.route")


def load_configured_rules(cfg: Config, path: str | None = None) -> RoutingRules:
    """The rules of ``path`` or of ``[routing] rules``; RulesError with the fix when there are none."""
    where = path or cfg.routing.rules
    if not where:
        raise RulesError('no routing rules: set [routing] rules = "routing.yaml" (or pass --rules FILE)')
    return load_rules(cfg.path(Path(where)))


def group_id(cfg: Config, destination: str) -> str:
    return f"{cfg.routing.group_prefix}-{destination}"


def destination_topics(rules: RoutingRules) -> dict[str, list[str]]:
    """Destination name -> the topics its worker consumes (those its rules are triggered by)."""
    out = {}
    for name in rules.destinations:
        topics = rule_topics(rules.rules_for(name))
        if topics:
            out[name] = topics
    return out


def indexed_study(cfg: Config) -> Callable[[str], dict[str, Any] | None]:
    """A study's latest aggregate from the studies index (None: not indexed yet, or OpenSearch does not answer)."""
    from opensearchpy.exceptions import NotFoundError, OpenSearchException

    client = opensearch_client(cfg.opensearch, timeout=10)
    alias = IndexLayout(cfg.opensearch.index_prefix).alias("studies")

    def get(study_uid: str) -> dict[str, Any] | None:
        try:
            source: dict[str, Any] = client.get(index=alias, id=study_uid)["_source"]
            return source
        except NotFoundError:
            return None
        except OpenSearchException as exc:  # not "not complete yet": the alert would be given up on
            raise IndexUnavailable(type(exc).__name__) from exc

    return get


def _deidentifier(cfg: Config, destination: Destination) -> Deidentifier | None:
    if not destination.deidentify_project:
        return None
    if not cfg.export.site_secret_file:
        raise RulesError(
            f"destination {destination.name!r} de-identifies: set [export] site_secret_file (the pseudonyms' key)"
        )
    secret = read_site_secret(cfg.path(Path(cfg.export.site_secret_file)))
    return Deidentifier(ProjectKeys(secret, destination.deidentify_project))


def _check_sent_record(folder: Path, destination: str) -> None:
    """The folder of the destination's record of what it was sent (sent.py), made and writable; else
    ConfigError naming the setting and the fix."""
    try:
        StudiesSent(destination, folder).check_folder()
    except OSError as exc:
        raise ConfigError(
            f"[routing] state_dir: cannot write {folder} ({exc.strerror or type(exc).__name__}), where destination "
            f"{destination!r} records what it was sent of each study routed whole or on a dose alert: make it "
            "writable by the user running diana route, or set [routing] state_dir to a folder that is"
        ) from None


def build_workers(cfg: Config, rules: RoutingRules, stop: threading.Event) -> list[RouteWorker]:
    r = cfg.routing
    tls = destination_tls(cfg) if any(d.tls for d in rules.destinations.values()) else None
    workers = []
    for name, destination in rules.destinations.items():
        dest_rules = rules.rules_for(name)
        if not dest_rules:
            log.warning("route.destination_unused", destination=name)
            continue
        sender = make_sender(
            destination, r.ae_title or cfg.receiver.ae_title, r.timeout_s, tls, _deidentifier(cfg, destination)
        )
        sent_dir = cfg.path(r.state_dir) / name
        if any(rule.trigger in ("study", "alert") for rule in dest_rules):  # the rules the record serves
            _check_sent_record(sent_dir, name)
        settings = WorkerSettings(
            group_id(cfg, name),
            open_store(cfg, "archive"),
            r.max_attempts,
            r.max_backoff_s,
            r.archive_wait_s,
            start_from_earliest=r.new_destination_start == "earliest",
            sent_dir=sent_dir,
            sent_record_retention_s=r.sent_record_retention_days * 86400,
        )
        study_state = indexed_study(cfg) if any(r.trigger == "alert" for r in dest_rules) else None
        workers.append(RouteWorker(cfg.kafka, destination, dest_rules, sender, settings, stop, study_state))
    return workers


def _run_forever(worker: RouteWorker, stop: threading.Event) -> None:
    """A worker that fails unexpectedly starts again (from its last commit) instead of silently stopping."""
    while not stop.is_set():
        try:
            worker.run()
        except KafkaException as exc:
            # The broker down or refusing is no defect of ours: one line saying so, not a traceback each time.
            log.warning("route.kafka_unavailable", destination=worker.name, error=str(exc.args[0]) if exc.args else "")
            stop.wait(5.0)
        except Exception:
            log.exception("route.worker_failed", destination=worker.name)
            stop.wait(5.0)


def stow_in_clear(rules: RoutingRules) -> dict[str, list[str]]:
    """The hosts off this machine that http:// STOW-RS destinations reach in clear (every instance sent)."""
    urls = (d.stow_url for d in rules.destinations.values() if d.stow_url)
    return {"[routing] rules: stow_url": remote_plain_http_hosts(urls)}


def run_routing(cfg: Config, rules: RoutingRules, stop: threading.Event) -> None:
    warn_clear_text(stow_in_clear(rules))
    workers = build_workers(cfg, rules, stop)
    threads = [
        threading.Thread(target=_run_forever, args=(w, stop), name=f"route-{w.name}", daemon=True) for w in workers
    ]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(60)
