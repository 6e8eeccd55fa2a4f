"""The one configuration object of diana-star.

Read once, in one place: defaults, then a TOML file, then environment variables
``DIANA_<SECTION>_<KEY>`` (e.g. ``DIANA_KAFKA_BOOTSTRAP``). Unknown sections, keys and
``DIANA_*`` variables are rejected at start-up, so a typo is an error, not a silent default.
Nothing else in the code base reads ``os.environ`` for settings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from diana.credentials import remember_secret

__all__ = [
    "Config",
    "ConfigError",
    "ConflictPolicy",
    "AllowedHosts",
    "IPAddress",
    "MoveDestination",
    "ip_address_of",
    "load_config",
    "opensearch_urls",
    "parse_allowed_hosts",
    "parse_destinations",
    "parse_per_modality",
    "ENV_CONFIG_FILE",
    "DEFAULT_MAX_STOW_BYTES",
]

ENV_CONFIG_FILE = "DIANA_CONFIG"
_ENV_PREFIX = "DIANA_"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and how to fix it."""


class ConflictPolicy:
    """``[sinks] archive_conflict_policy``: what the archive does when a SOP Instance UID arrives again
    with different bytes (reported on dicom.archive-conflicts whatever the policy)."""

    KEEP_FIRST = "KEEP_FIRST"  # the archive keeps the first bytes; the newcomer is reported and quarantined
    REPLACE = "REPLACE"  # the newcomer replaces the archived bytes, which go to quarantine
    KEEP_BOTH = "KEEP_BOTH"  # the first stays as <SOP>.dcm, the newcomer beside it as <SOP>.<sha12>.dcm
    ALL = (KEEP_FIRST, REPLACE, KEEP_BOTH)
    # Policies under which the first bytes stay the instance: the index and aggregates keep the first event.
    FIRST_WINS = (KEEP_FIRST, KEEP_BOTH)


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = "127.0.0.1:9092"
    # Partitions of dicom.instances; Faust tables and their changelogs must match it.
    partitions: int = 3
    # How long a C-STORE waits for the broker's acknowledgement before answering failure.
    publish_timeout_s: float = 10.0
    # Producer linger: 0 suits one association waiting for each ack (see docs/PERFORMANCE.md).
    linger_ms: int = 0
    # A consumer's fetch waits at the broker until fetch_min_bytes have gathered or fetch_wait_max_ms
    # have passed. librdkafka's 1 byte has every consumer (aggregator, sinks) fetch again for each
    # event: under load the pipeline's requests, not its events, took the cores the receiver needed.
    fetch_min_bytes: int = 65536
    fetch_wait_max_ms: int = 50
    # Largest event (uncompressed) a producer sends; the topics get the same max.message.bytes and
    # the local broker the same message.max.bytes. An event's DICOM header is cut to fit under it.
    max_message_bytes: int = 8388608
    # Replicas of each topic diana creates; 0: automatic (3 on a cluster of 3 brokers or more, else
    # one per broker). min_insync_replicas 0: automatic (replication factor - 1, at least 1).
    replication_factor: int = 0
    min_insync_replicas: int = 0
    # Security toward the brokers (docs/SECURITY.md): PLAINTEXT, SSL or SASL_SSL. With SASL_SSL the
    # clients log in as sasl_username with sasl_mechanism; the password comes from
    # DIANA_KAFKA_SASL_PASSWORD or sasl_password_file, never from the file itself. ssl_ca_file: the
    # (private) CA the brokers' certificates are verified against; empty: the system's CAs.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    sasl_password_file: str = ""
    ssl_ca_file: str = ""
    # librdkafka's debug contexts for every Kafka client diana makes ("cgrp,fetch" follows a consumer
    # group; "all" is very verbose), logged at debug level through diana.kafka; empty: off. For
    # finding out why a client misbehaves (docs/OPERATIONS.md), not for everyday running.
    debug: str = ""


# The least [kafka] max_message_bytes: a part of a completed series' digest (stream_apps/digest.py:
# PART_ENTRIES 8,192 instances, 218,458 bytes as JSON, plus its key and the framing) must fit,
# with room. tests/unit/test_aggregates_record_size.py checks the floor against the digest's size.
MIN_MAX_MESSAGE_BYTES = 262_144

# librdkafka's debug contexts (2.x; an unknown one would fail every client at its creation).
KAFKA_DEBUG_CONTEXTS = (
    *("generic", "broker", "topic", "metadata", "feature", "queue", "msg", "protocol", "cgrp", "security"),
    *("fetch", "interceptor", "plugin", "consumer", "admin", "eos", "mock", "assignor", "conf", "telemetry", "all"),
)


def kafka_debug_contexts(value: str) -> list[str]:
    """[kafka] debug as librdkafka reads it: comma-separated, blanks around each ignored, any case."""
    return [c.strip().lower() for c in value.split(",") if c.strip()]


@dataclass(frozen=True)
class OpenSearchConfig:
    # One node's url, or several separated by commas (the nodes of one cluster): the client spreads
    # its requests over them and moves on to the next when one does not answer.
    url: str = "http://127.0.0.1:9200"
    index_prefix: str = "diana"
    bulk_max_docs: int = 500
    # Replicas of every index diana creates (its index templates): 0 on one node (a replica
    # there could never be allocated), 1 on a cluster of two nodes or more (`diana stack start --cluster`).
    number_of_replicas: int = 0
    # How often new documents become searchable (every index diana creates; its templates). Each refresh
    # writes a small segment, merged later: shorter costs OpenSearch CPU (docs/PERFORMANCE.md, issue 19).
    refresh_interval: str = "1s"
    # The live sink asks each bulk request to refresh the shards it wrote (`refresh=true`): its documents
    # are searchable when the write returns instead of at the next scheduled refresh. Off: the runs of
    # issue 19 did not agree on whether it helps (docs/PERFORMANCE.md).
    refresh_on_write: bool = False
    # HTTP basic authentication (with an https url): the user, and its password from
    # DIANA_OPENSEARCH_PASSWORD or password_file. ca_file: the (private) CA of the server's
    # certificate; empty: the system's CAs. Credentials in the url itself are refused.
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    ca_file: str = ""


# Vendors' private Storage SOP Classes that modalities and PACS send (pynetdicom's storage contexts are
# the standard ones only, so these were refused at negotiation and whole jobs marked failed). From the
# storage SOP classes dcm4chee-arc accepts by default (its conformance statement, dcm4che/dcm4chee-arc-cs
# docs/networking/specs/storage/sop-classes.csv); the same UIDs are in PixelMed's SOPClass.java.
PRIVATE_STORAGE_SOP_CLASSES = (
    "1.3.12.2.1107.5.9.1",  # Private Siemens CSA Non Image Storage (spectroscopy, raw, protocols)
    "1.3.12.2.1107.5.99.3.10",  # Private Siemens CT MR Volume Storage
    "1.3.12.2.1107.5.99.3.11",  # Private Siemens AX Frame Sets Storage
    "1.2.840.113619.4.2",  # Private GE Dicom MR Image Info Object
    "1.2.840.113619.4.3",  # Private GE Dicom CT Image Info Object
    "1.2.840.113619.4.4",  # Private GE Dicom Display Image Info Object
    "1.2.840.113619.4.26",  # Private GE 3D Model Storage
    "1.2.840.113619.4.27",  # Private GE eNTEGRA Protocol or NM Genie Storage
    "1.2.840.113619.4.30",  # Private GE PET Raw Data Storage
    "1.2.528.1.1001.5.1.1.1",  # Private GE Collage Storage
    "1.3.46.670589.2.3.1.1",  # Private Philips Specialised XA Storage
    "1.3.46.670589.2.4.1.1",  # Private Philips CX Image Storage
    "1.3.46.670589.11.0.0.12.1",  # Private Philips MR Spectrum Storage
    "1.3.46.670589.11.0.0.12.2",  # Private Philips MR Series Data Storage
    "1.3.46.670589.11.0.0.12.4",  # Private Philips MR Examcard Storage
    "1.3.46.670589.5.0.1.1",  # Private Philips Volume Storage
    "1.2.392.200036.9125.1.1.2",  # Private Fuji CR Image Storage
    "1.2.392.200036.9116.7.8.1.1.1",  # Private Toshiba US Image Storage
)
# The UID rules of diana.schemas.uid (which config may not import: the import contracts in setup.cfg):
# is_valid_uid, digits and dots; is_conformant_uid, no leading zero in a component either (PS3.5 9.1),
# what pydicom's UID.is_valid, checked when a SOP class is registered, requires. Both at most 64
# characters; tests/unit/test_private_storage_classes.py checks that they agree with schemas/uid.py.
_UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")
_CONFORMANT_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _is_conformant_uid(value: str) -> bool:
    """diana.schemas.uid.is_conformant_uid: a PS3.5 9.1 UID, at most 64 characters."""
    return 0 < len(value) <= 64 and _CONFORMANT_UID_SYNTAX.fullmatch(value) is not None


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str = "DIANA"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    metrics_port: int = 9464
    # Receiver processes sharing the port (each connection to the one with the fewest; producers/workers.py), at least 1.
    # Each has its own max_associations and max_associations_per_host; metrics_port serves the
    # sum of all of them.
    processes: int = 1
    # Largest PDU we accept; bounds the memory each association may hold at once.
    max_pdu_bytes: int = 1048576
    # A deflated data set is inflated (as a stream, to disk) up to this many bytes; past it the
    # object is refused with 0xC210, so a deflate bomb cannot fill memory or disk.
    max_inflated_bytes: int = 1073741824
    # Hostile and slow peers (producers/transport_guard.py): connections from one address at once
    # (TLS handshakes included); time for a TLS handshake; time for one PDU from its first byte;
    # a peer sending fewer bytes per second than min_bytes_per_s, measured only while a PDU (or a
    # DIMSE message) is partly received, is ended once it has been sending for min_rate_after_s.
    max_associations_per_host: int = 8
    tls_handshake_timeout_s: float = 10.0
    pdu_read_timeout_s: float = 60.0
    min_bytes_per_s: float = 256.0
    min_rate_after_s: float = 120.0
    # Every reconcile_interval_s, objects still in the landing store reconcile_after_s after they
    # landed are republished (once per run): the start-up outbox step, also while running.
    reconcile_interval_s: float = 300.0
    reconcile_after_s: float = 3600.0
    # Storage SOP Classes accepted beyond the standard ones (pynetdicom's), with the same transfer
    # syntaxes: vendors' private classes, refused at negotiation otherwise. Empty: standard ones only.
    extra_storage_sop_classes: tuple = PRIVATE_STORAGE_SOP_CLASSES
    # Empty: any calling AE title / any host. Otherwise only these may associate.
    allowed_calling_aes: tuple = ()
    allowed_hosts: tuple = ()
    # DICOM over TLS when both are set (PEM files); tls_ca_file also requires client certificates.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""


@dataclass(frozen=True)
class StorageConfig:
    landing_dir: Path = Path("var/landing")
    # Where the archive and quarantine live: "filesystem" (archive_dir, quarantine_dir) or "s3"
    # (the bucket below, under the prefixes archive/ and quarantine/); the landing store too
    # (landing/; landing_dir then holds only the receiver's scratch folder .incoming/).
    backend: str = "filesystem"
    archive_dir: Path = Path("var/archive")
    # Bytes the archive conflict policy does not keep (KEEP_FIRST: the newcomer; REPLACE: the
    # former copy) are moved here, never deleted.
    quarantine_dir: Path = Path("var/quarantine")
    # S3-compatible object storage. Empty endpoint: AWS's own. https endpoints are verified against
    # s3_ca_file when set (a private CA), else the system's CAs.
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "diana-star"
    s3_ca_file: str = ""
    # Objects larger than this are uploaded in parts of this size (S3's minimum part is 5 MiB).
    s3_part_size_mb: int = 16
    # Credentials: a file in the AWS credentials format ([default] aws_access_key_id = ...,
    # aws_secret_access_key = ...), or the two keys below (best set through DIANA_STORAGE_S3_ACCESS_KEY_ID
    # and DIANA_STORAGE_S3_SECRET_ACCESS_KEY); with neither, boto3's own chain (AWS_* variables, a role).
    # Never printed: the keys are left out of repr and logs.
    s3_credentials_file: str = ""
    s3_access_key_id: str = field(default="", repr=False)
    s3_secret_access_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class SinksConfig:
    archive_group: str = "diana-sink-archive"
    opensearch_group: str = "diana-sink-opensearch"
    # 0 turns a metrics endpoint off.
    archive_metrics_port: int = 9465
    opensearch_metrics_port: int = 9466
    # The metadata sink (prepared WADO-RS metadata per series, docs/DICOMWEB.md).
    metadata_group: str = "diana-sink-metadata"
    metadata_metrics_port: int = 9469
    # How long the metadata sink waits for the index to hold a completed series' instances.
    metadata_index_wait_s: float = 300.0
    # How long the metadata sink retries a series' file that fails with an error of its own (a folder's
    # permission, an I/O error, the store refusing that key) before leaving it unwritten: WADO-RS then
    # answers that series from the index. The store's trouble (unreachable, disk full) is retried for as
    # long as it lasts. Floor 60 s.
    metadata_write_retry_s: float = 300.0
    # Same SOP Instance UID, different bytes: KEEP_FIRST, REPLACE or KEEP_BOTH (reported either way).
    archive_conflict_policy: str = ConflictPolicy.KEEP_FIRST
    # A bulk request holds at most this many documents and about this many bytes.
    bulk_max_bytes: int = 5_000_000
    # A sink writes at once what its consumer has already fetched; a batch that starts on an empty
    # queue waits this long after its first message for more (fewer, larger bulk requests under a
    # trickle): the bound a quiet moment adds to receipt-to-searchable.
    max_wait_s: float = 0.05
    # A killed sink's partitions go to another member (or its restart) after this long; Kafka's
    # default is 45 s. The dose worker uses 10 s too (stream_apps/app.py).
    session_timeout_s: float = 10.0
    # The archive sink's safety net (sinks/README.md): an instance that keeps failing with an error that
    # looks like its own (access refused, an I/O error on its archived copy, an unknown error), not the
    # store's (unreachable, disk full: retried for as long as it lasts), is dead-lettered (its landing
    # copy kept) after this many failed tries or this many seconds of them, whichever comes first, and
    # the partition goes on. Floors: 3 tries, 60 s (a passing fault must not dead-letter at once).
    archive_object_max_tries: int = 50
    archive_object_max_retry_s: float = 600.0

    def __post_init__(self) -> None:
        if self.archive_object_max_tries < 3:
            raise ConfigError(f"[sinks] archive_object_max_tries = {self.archive_object_max_tries}: use 3 or more")
        if self.archive_object_max_retry_s < 60:
            raise ConfigError(
                f"[sinks] archive_object_max_retry_s = {self.archive_object_max_retry_s}: use 60 or more (seconds)"
            )
        if self.metadata_write_retry_s < 60:
            raise ConfigError(
                f"[sinks] metadata_write_retry_s = {self.metadata_write_retry_s}: use 60 or more (seconds)"
            )


@dataclass(frozen=True)
class StreamConfig:
    """The aggregates worker (`diana aggregate`: Kafka transactions, exactly once) and Faust settings of the dose worker."""

    # Consumer group, transactional id prefix and state topic prefix of the aggregates worker.
    app_id: str = "diana-aggregates"
    # The aggregates worker's Prometheus /metrics port (0: no metrics).
    web_port: int = 6066
    # The aggregates worker's stable id: its static group member id and transactional id. Empty:
    # made once and kept in data_dir (per app_id and web_port), so a restart on the same disk keeps
    # it. Set it (e.g. to a StatefulSet pod name) where a worker moves between disks; never give
    # two workers the same id.
    worker_id: str = ""
    # A worker silent this long leaves the group and its partitions move. Restarted within it under
    # its worker_id, it gets them back with no rebalance, so it must cover a restart (start-up
    # took up to 11 s on a loaded machine here); a dead worker's partitions wait this long.
    session_timeout_s: float = 30.0
    # A study whose series are all complete is dropped from the aggregates worker's state this many
    # days (event time) after its last completion; a later instance of it is dead-lettered, never
    # counted twice (stream_apps/README.md, "Bounded state"). 0: kept (compacted) for ever.
    state_retention_days: float = 30.0
    # Input events per Kafka transaction of the aggregates worker at most. Each transaction waits
    # for two broker round trips; bigger ones let a worker that catches up keep its core (1 M
    # events: +12-40 % at 2000 against 500, docs/PERFORMANCE.md issue 20). A trickle is not held
    # back: a batch ends after 0.2 s with what has come. An aborted transaction redoes this many.
    transaction_max_events: int = 2000
    # Transactions of the aggregates worker failing this long with none committed (each batch
    # aborted and done again) stop the worker with exit status 1, naming the Kafka error and the
    # fix: a cause that lasts (an output topic it may not write, a deleted topic) is not retried
    # for ever. A passing fault (a broker restart, a coordinator move) commits again well within
    # it. The loop's recovery steps (120 s limits of their own) are not counted, and 10 failures at
    # least are needed; any commit, revocation or assignment starts the count again. Floor 120 s.
    transaction_max_retry_s: float = 300.0
    # The aggregates worker's local state: a folder per worker (<app_id>-<worker_id>) of one SQLite
    # file per partition with the changelog position it reflects, so a restart reads only the
    # changelog's tail (stream_apps/README.md, "Local state"). Relative to the config file's folder.
    state_dir: Path = Path("var/aggregates-state")
    # Faust's local data (the dose worker).
    data_dir: Path = Path("var/faust")
    # A series is complete after this long without a new instance (event time), per modality.
    quiet_seconds: str = "CT=30,MR=60,PT=60,NM=60,CR=10,DX=10,MG=10,*=30"
    # The dose worker (Faust): at_least_once with idempotent folding. Faust's exactly_once
    # crashed on a rebalance here (faust-streaming 0.15). The aggregates worker always uses transactions.
    processing_guarantee: str = "at_least_once"


@dataclass(frozen=True)
class DoseConfig:
    """The dose worker (`diana dose`): a Faust app of its own, so dose and aggregates fail apart."""

    app_id: str = "diana-dose"
    web_port: int = 6067
    # YAML reference levels and cumulative rules (docs/DOSE.md); empty: Dose Check alerts only.
    alert_rules: str = ""
    # Every N-th CT image (by Instance Number) is read from the landing store or archive for its
    # water-equivalent diameter (SSDE, docs/DOSE.md); 0 turns this off.
    size_sample_every: int = 10
    # YAML mapping of free-text protocols to standard names and body regions (docs/DOSE.md).
    standard_names: str = ""
    # YAML local and national diagnostic reference levels by standard name (docs/DOSE.md).
    reference_levels: str = ""


@dataclass(frozen=True)
class AlertsConfig:
    """`diana alerts deliver`: dose alerts to people by e-mail and webhook, once (docs/DOSE.md)."""

    # YAML recipients and their routing by station/room and rule type; empty: nothing is sent.
    routing: str = ""
    consumer_group: str = "diana-alert-delivery"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_from: str = "diana-star@localhost"
    # How the mail travels to smtp_host (an alert carries the accession number):
    # "none", plain SMTP, for a relay on this host or a trusted network; "starttls", upgraded to TLS
    # before anything is sent (port 587; a server that does not offer it gets nothing); "tls", TLS from
    # the first byte (port 465). The server's certificate is verified against smtp_ca_file when set,
    # else the system's CAs.
    smtp_security: str = "none"
    smtp_ca_file: str = ""
    # A relay that wants a login (over TLS only): the user, and its password from
    # DIANA_ALERTS_SMTP_PASSWORD or smtp_password_file.
    smtp_username: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_password_file: str = ""
    # Attempts per delivery before it is recorded as DELIVERY_FAILED; the wait doubles from 1 s.
    attempts: int = 5
    timeout_s: float = 10.0
    # A delivery that failed all its attempts is tried again this often (and at the next start), once per
    # round, when no new alert waits; an SMTP 5xx refusal of the recipient or the message is final.
    retry_interval_s: float = 300.0
    # A retry round stops after this long (the send under way finished); the next goes on from there.
    retry_budget_s: float = 30.0
    # Prometheus /metrics of the delivery worker (diana_alert_deliveries_total); 0 turns it off. Not 9467
    # ([dicomweb] metrics_port, `diana serve`, on the same host under `diana run`).
    metrics_port: int = 9470
    # Sent besides rule, values, study UID, accession, station, model and protocol (docs/DOSE.md):
    # any of study_date, study_description, institution_name. Empty: none (the description is free text).
    message_extra_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportConfig:
    """`diana cohort export`."""

    # A file holding the site secret (at least 16 bytes) that keys the pseudonyms of de-identified
    # exports: the same patient gets the same pseudonym in every export made with it. Keep it private.
    site_secret_file: str = ""


@dataclass(frozen=True)
class ReportConfig:
    """`diana report`."""

    # The zone whose midnight starts a report's day: an IANA name ("Europe/Zurich") or a UTC offset
    # ("+01:00"). Empty: this host's zone.
    time_zone: str = ""


@dataclass(frozen=True)
class QueryRetrieveConfig:
    """The Query/Retrieve SCP (C-FIND, C-MOVE, C-GET), answered from the index and the archive."""

    # The receiver's AE (same title and port) also answers query/retrieve: configure diana-star once.
    on_receiver: bool = True
    # `diana serve` alone listens here, with the receiver's AE title, allow-lists and TLS settings.
    port: int = 11113
    # C-MOVE destinations: "AE=host:port", or "AE=host:port:tls" for DICOM over TLS (verified
    # against [receiver] tls_ca_file when set, else the system's CAs). An unknown AE gets 0xA801.
    destinations: tuple = ()
    # A C-FIND answers at most this many matches (then stops with a warning in the log).
    max_matches: int = 10000
    # A C-MOVE or C-GET sends at most this many objects (a DIMSE counter holds 65535).
    max_retrieve: int = 65535
    # Who may query and retrieve (access/qr/peers.py). A peer on loopback may while allow_loopback; any
    # other only when allow_any_peer, or when a list is set and every list set admits it (calling AE
    # title; IP address). Otherwise C-FIND/C-MOVE/C-GET are refused with 0x0124; C-STORE and C-ECHO are
    # never affected.
    allowed_calling_aes: tuple = ()
    allowed_hosts: tuple = ()
    allow_any_peer: bool = False
    # False when a proxy on this host (a TLS terminator, ssh -L, kubectl port-forward, a TCP load
    # balancer) forwards remote peers: they all arrive from loopback and would all be allowed.
    allow_loopback: bool = True
    # `diana serve`'s port: associations from one address at once (0: [receiver]'s). Behind a proxy on
    # this host every viewer arrives from its address and they share this limit.
    max_associations_per_host: int = 0


@dataclass(frozen=True)
class CollectConfig:
    """`diana collect`: pulls studies from a PACS into diana-star (docs/COLLECT.md)."""

    # The PACS queried (C-FIND, Study Root) and asked to send (C-MOVE).
    pacs_ae_title: str = "PACS"
    pacs_host: str = "127.0.0.1"
    pacs_port: int = 104
    # Our calling AE title towards the PACS.
    ae_title: str = "DIANA-COLLECT"
    # Where the PACS sends the studies: the AE title it knows diana-star's receiver by; empty: the
    # receiver's own [receiver] ae_title (the PACS must know it as a move destination).
    move_destination: str = ""
    # At most this many retrieves at once, at most this many started per hour (0: no hourly limit).
    concurrency: int = 2
    studies_per_hour: int = 0
    # When retrieves may start, local time, e.g. "22:00-06:00" or "12:00-13:00,20:00-23:59"; empty: always.
    windows: str = ""
    # A study short of the PACS's instance count is retrieved again this many times, waiting
    # backoff_s, then twice as long each time; then it is reported partial. Also the most pauses a
    # study's retrieves answered "out of resources" (0xA7xx) get before those count as tries.
    retries: int = 3
    backoff_s: float = 30.0
    # After a retrieve, how long the pulled objects may take to appear in the index.
    verify_timeout_s: float = 120.0
    # A PACS that does not answer or is out of resources, or our receiver not answering a C-ECHO
    # (asked at most once per pause_s): the job pauses and tries again after this many seconds.
    pause_s: float = 60.0
    # DIMSE and network timeouts towards the PACS.
    timeout_s: float = 60.0
    # The longest a retrieve (C-MOVE) may go without an answer from the PACS: most answer after each
    # instance sent, some only once at the end of the study.
    move_timeout_s: float = 3600.0
    # The most matches the PACS answers to one C-FIND (Orthanc's LimitFindResults, dcm4chee's query
    # limits); 0: none known. A line answered this many is asked again by halves of its date range,
    # down to one day (producers/pacs_pull/narrowing.py), or fails saying so.
    find_limit: int = 0
    # A study whose STUDY-level C-FIND answer has no NumberOfStudyRelatedInstances (dcmqrscp) is
    # counted by an IMAGE-level C-FIND before its retrieve (one answer per instance); false: not.
    count_instances: bool = True


DEFAULT_MAX_STOW_BYTES = 4 << 30


@dataclass(frozen=True)
class DicomWebConfig:
    """DICOMweb (QIDO-RS, WADO-RS) on `diana serve`: docs/DICOMWEB.md."""

    # Loopback by default: on any other address it refuses to start without authentication.
    host: str = "127.0.0.1"
    port: int = 8088
    # A file holding the bearer token clients send (Authorization: Bearer TOKEN).
    bearer_token_file: str = ""
    # HTTP basic: the user name, and a file holding the password.
    basic_user: str = ""
    basic_password_file: str = ""
    # Origins browser viewers may call from (CORS), e.g. ["https://viewer.example.org"]; "*" for any.
    cors_origins: tuple = ()
    # HTTPS when both are set (PEM files). Off loopback they are required (the token or password and every
    # answer would travel in clear) unless allow_plain_http: TLS ends at a proxy on this host or network.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    allow_plain_http: bool = False
    # A QIDO-RS answer holds at most this many matches (`limit` may ask for fewer).
    max_results: int = 1000
    # A STOW-RS request body larger than this is refused (413) as it arrives, and nothing of it kept:
    # one client cannot fill the landing disk the receiver writes to.
    max_stow_bytes: int = DEFAULT_MAX_STOW_BYTES
    # Prometheus /metrics of `diana serve` (DICOMweb and Q/R alone); 0: none.
    metrics_port: int = 9467
    # The service's URL as clients reach it, e.g. "https://pacs.example.org/dicom-web" behind a reverse
    # proxy: the base of every RetrieveURL and BulkDataURI. Empty: the Host header of each request.
    public_url: str = ""


@dataclass(frozen=True)
class RoutingConfig:
    """`diana route`: forward arriving instances and studies to other systems by rules (docs/ROUTING.md)."""

    # YAML file of destinations and rules; empty: no routing (`diana run` starts `diana route` when set).
    rules: str = ""
    # Each destination's consumer group is <group_prefix>-<destination name>.
    group_prefix: str = "diana-route"
    # The calling AE title of C-STORE to DICOM destinations; empty: [receiver] ae_title.
    ae_title: str = ""
    # Refusals of one instance by a destination before it is dead-lettered (a destination may override).
    max_attempts: int = 5
    # The wait between attempts doubles from 0.5 s up to this.
    max_backoff_s: float = 60.0
    # Where a destination starts the first time its group sees a topic: "now" (what arrives from then
    # on; `diana replay` of its group backfills) or "earliest" (the whole history: every archived match).
    new_destination_start: str = "now"
    # An event whose instance the archive sink has not written yet is waited for this long, then dead-lettered.
    archive_wait_s: float = 600.0
    # Network timeout of an association or HTTP request.
    timeout_s: float = 30.0
    # Each destination's record of what it was sent of each study, kept by a destination with a
    # whole_study or dose_alert rule and shared by its plain rules (a folder per destination, a file
    # per study appended once a batch, ~135 bytes an instance), so that an amended study sends only
    # its late instances, a study's several (or replayed) alerts send it once, and an instance goes
    # once whichever rule matched. Relative to the config file's folder; a record removed makes the
    # study's next completion or alert send it whole.
    state_dir: Path = Path("var/routing-state")
    # A study's record not written for this many days is removed (at start, then hourly): a later
    # alert or completion of that study sends its matching instances again, once. 0: kept for ever.
    sent_record_retention_days: float = 30.0
    # Prometheus /metrics of `diana route` (diana_route_*); 0 turns it off.
    metrics_port: int = 9468


@dataclass(frozen=True)
class StackConfig:
    """The no-Docker local stack (compose/local): where it lives and its ports."""

    home: Path = Path("var/stack")
    cache_dir: Path = Path("~/.cache/diana-star")
    kafka_version: str = "4.1.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap_mb: int = 512
    opensearch_version: str = "2.19.4"
    opensearch_port: int = 9200
    opensearch_transport_port: int = 9300
    opensearch_heap_mb: int = 1024
    # OpenSearch refuses to run as root; when we are root it runs as this system user.
    opensearch_user: str = "diana-star"
    # S3Proxy (filesystem backend), started with the rest when [storage] backend = "s3"; its
    # endpoint is then http://127.0.0.1:<s3proxy_port> and its identity [storage]'s credentials.
    s3proxy_version: str = "2.6.0"
    s3proxy_port: int = 9000
    s3proxy_heap_mb: int = 256
    # The secured variant (compose/local/secured.py): Kafka on SASL_SSL with SCRAM and OpenSearch
    # with its security plugin (TLS and basic authentication), certificates from a private CA made
    # under <home>/pki. The users and passwords are [kafka]'s and [opensearch]'s.
    secured: bool = False
    opensearch_security_version: str = "2.19.4.0"
    # The local cluster mode (compose/local/cluster.py): three Kafka brokers in KRaft combined mode
    # (broker n on kafka_port + 2(n-1), its controller on kafka_controller_port + 2(n-1)) and two
    # OpenSearch nodes (node n on opensearch_port + n-1, transport opensearch_transport_port + n-1),
    # each with its own folder under home and these smaller heaps.
    cluster: bool = False
    cluster_kafka_heap_mb: int = 320
    cluster_opensearch_heap_mb: int = 512


@dataclass(frozen=True)
class MetricsConfig:
    # Where the Prometheus endpoints listen; 0.0.0.0 in a container so they can be scraped.
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    # "console" for people, "json" for log shippers.
    format: str = "console"


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    opensearch: OpenSearchConfig = field(default_factory=OpenSearchConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    dose: DoseConfig = field(default_factory=DoseConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    query_retrieve: QueryRetrieveConfig = field(default_factory=QueryRetrieveConfig)
    dicomweb: DicomWebConfig = field(default_factory=DicomWebConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Relative paths in the file are resolved against this directory.
    base_dir: Path = Path(".")

    def path(self, value: Path) -> Path:
        """Absolute form of a configured path (``~`` expanded, relative to base_dir)."""
        value = Path(value).expanduser()
        return value if value.is_absolute() else (self.base_dir / value).resolve()


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "base_dir"}


def _section_class(name: str) -> type:
    # Each section field of Config has its section's class as default_factory.
    factories = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "base_dir"}
    factory = factories[name]
    assert isinstance(factory, type), f"Config.{name} needs default_factory=<its section class>"
    return factory


def _coerce(section: str, key: str, target: Any, raw: Any) -> Any:
    kind = type(target)
    where = f"[{section}] {key}"
    try:
        if isinstance(target, bool):
            if isinstance(raw, str):
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if isinstance(target, Path):
            return Path(str(raw))
        if isinstance(target, tuple):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError(raw)
        if kind is str and isinstance(raw, list | dict):
            # Said, not turned into the text "['a', 'b']": several nodes are one comma-separated text.
            raise ConfigError(
                f"{where}: expected text, got a {type(raw).__name__}, {_shown(key, raw)}; "
                "several values go comma-separated in one text"
            )
        return kind(raw)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {_shown(key, raw)}") from None


def _shown(key: str, raw: Any) -> str:
    """The value as an error shows it; not a secret's: it is refused before redaction knows it."""
    if any(word in key for word in ("password", "secret", "token")):
        return "a value not shown (a secret)"
    return repr(raw)


def _build_section(section: str, values: Mapping[str, Any], source: str) -> Any:
    default = _section_class(section)()
    known = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} in [{section}]; valid keys: {', '.join(sorted(known))}"
        )
    coerced = {k: _coerce(section, k, getattr(default, k), v) for k, v in values.items()}
    return dataclasses.replace(default, **coerced)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    names: dict[str, tuple[str, str]] = {}
    for section in _SECTIONS:
        for f in dataclasses.fields(_section_class(section)()):
            names[f"{_ENV_PREFIX}{section}_{f.name}".upper()] = (section, f.name)
    overrides: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(_ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        if name not in names:
            raise ConfigError(
                f"environment variable {name} is not a diana-star setting; "
                f"use DIANA_<SECTION>_<KEY> with a key listed in diana.example.toml"
            )
        section, key = names[name]
        overrides.setdefault(section, {})[key] = value
    return overrides


# Settings with a fixed set of values, checked at start-up.
_CHOICES = {
    ("sinks", "archive_conflict_policy"): ConflictPolicy.ALL,
    ("storage", "backend"): ("filesystem", "s3"),
    ("log", "format"): ("console", "json"),
    ("stream", "processing_guarantee"): ("exactly_once", "at_least_once"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("routing", "new_destination_start"): ("now", "earliest"),
    ("kafka", "security_protocol"): ("PLAINTEXT", "SSL", "SASL_SSL"),
    ("kafka", "sasl_mechanism"): ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"),
    ("alerts", "smtp_security"): ("none", "starttls", "tls"),
}


@dataclass(frozen=True)
class MoveDestination:
    ae_title: str
    host: str
    port: int
    tls: bool = False


def parse_destinations(entries: tuple) -> dict[str, MoveDestination]:
    """``("AE=host:port", "AE=host:port:tls")`` -> AE title -> destination; a bad entry says how to write it."""
    out: dict[str, MoveDestination] = {}
    for entry in entries:
        ae, _, where = str(entry).partition("=")
        parts = where.rsplit(":", 2) if where.endswith(":tls") else where.rsplit(":", 1)
        ae = ae.strip()
        ok = bool(ae) and len(ae) <= 16 and len(parts) >= 2 and parts[0] and parts[1].isdigit()
        if not ok or not 0 < int(parts[1]) < 65536:
            raise ConfigError(
                f"[query_retrieve] destinations: {entry!r} is not AE=host:port or AE=host:port:tls "
                f'(e.g. "VIEWER=10.0.0.5:11112"; AE titles have at most 16 characters)'
            )
        if ae in out:
            raise ConfigError(f"[query_retrieve] destinations: AE title {ae!r} is listed twice")
        out[ae] = MoveDestination(ae, parts[0], int(parts[1]), len(parts) == 3)
    return out


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_address_of(text: str) -> IPAddress | None:
    """The IP address written in ``text`` (an IPv4-mapped IPv6 address as its IPv4 one), None if it is none."""
    try:
        address = ipaddress.ip_address(str(text).strip().split("%", 1)[0])  # an IPv6 zone is not the address
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's ::ffff:10.0.0.5 is 10.0.0.5
    return address


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowedHosts:
    """An ``allowed_hosts`` list: addresses and networks (a range in CIDR form); empty admits every host."""

    networks: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.networks)

    def admits(self, host: str) -> bool:
        """Whether the peer at ``host`` (its address as the socket reports it) is listed."""
        address = ip_address_of(host)
        return address is not None and any(address in network for network in self.networks)


def parse_allowed_hosts(entries: tuple, section: str = "query_retrieve") -> AllowedHosts:
    """``[section] allowed_hosts``: each entry an IP address or a network in CIDR form (``10.1.2.0/24``,
    ``fd00::/64``); a name is an error: the peer's address is what is compared, so it would never match."""
    networks = []
    for entry in entries:
        text = str(entry).strip()
        if "%" in text and "/" in text:
            raise ConfigError(
                f"[{section}] allowed_hosts: {entry!r}: a network with a zone id is not matched; list it without "
                "the zone (e.g. fe80::/64)"
            )
        address = ip_address_of(text)
        try:
            network = ipaddress.ip_network(address if address is not None else text, strict=False)
        except ValueError:
            raise ConfigError(
                f"[{section}] allowed_hosts: {entry!r} is neither an IP address nor a network; list each peer's "
                'address or its network in CIDR form (e.g. ["10.1.2.3", "10.1.3.0/24", "fd00::5"]): names are '
                "not matched, the peer's address is"
            ) from None
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
            mapped = network.network_address.ipv4_mapped  # a range of IPv4-mapped addresses: as IPv4
            if mapped is not None:
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
        networks.append(network)
    return AllowedHosts(tuple(networks))


def _check_choices(sections: dict[str, Any]) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(sections[section], key)
        if value not in allowed:
            raise ConfigError(f"[{section}] {key} = {value!r}: use one of {', '.join(allowed)}")
    try:
        parse_per_modality(sections["stream"].quiet_seconds)
    except ValueError as exc:
        raise ConfigError(f"[stream] quiet_seconds: {exc}") from None
    parse_destinations(sections["query_retrieve"].destinations)
    parse_allowed_hosts(sections["query_retrieve"].allowed_hosts)
    parse_allowed_hosts(sections["receiver"].allowed_hosts, "receiver")
    if sections["report"].time_zone:
        try:
            time_zone_info(sections["report"].time_zone)
        except ValueError as exc:
            raise ConfigError(
                f"[report] time_zone = {sections['report'].time_zone!r}: {exc}; use an IANA name such as "
                '"Europe/Zurich" or a UTC offset from -18:00 to +18:00 such as "+01:00" (empty: this host\'s zone)'
            ) from None
    stream = sections["stream"]
    if not 1 <= stream.transaction_max_events <= 100_000:
        raise ConfigError(
            f"[stream] transaction_max_events = {stream.transaction_max_events}: use 1 to 100000 (default 2000)"
        )
    # At least the loop's own recovery limits (120 s, LoopSettings.give_up_after_s); nan compared
    # False with the floor and inf never stopped: both refused.
    if not math.isfinite(stream.transaction_max_retry_s) or stream.transaction_max_retry_s < 120:
        raise ConfigError(
            f"[stream] transaction_max_retry_s = {stream.transaction_max_retry_s}: use 120 or more (seconds, default 300)"
        )
    kafka = sections["kafka"]
    # At most one partition's fetch (librdkafka's max.partition.fetch.bytes, 1 MiB): more might never
    # gather, and every fetch would wait fetch_wait_max_ms even behind a backlog.
    if not 1 <= kafka.fetch_min_bytes <= 1_048_576:
        raise ConfigError(f"[kafka] fetch_min_bytes = {kafka.fetch_min_bytes}: use 1 to 1048576 (default 65536)")
    if kafka.max_message_bytes < MIN_MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"[kafka] max_message_bytes = {kafka.max_message_bytes}: use {MIN_MAX_MESSAGE_BYTES} (256 KiB) or more "
            "(default 8388608): the aggregates worker's largest own record, a part of a completed series' "
            "digest (8,192 instances, about 220,000 bytes), must fit"
        )
    # Under librdkafka's socket.timeout.ms (60 s) by a second, or a fetch that waits times out.
    if not 0 <= kafka.fetch_wait_max_ms <= 59_000:
        raise ConfigError(f"[kafka] fetch_wait_max_ms = {kafka.fetch_wait_max_ms}: use 0 to 59000 (default 50)")
    unknown = [c for c in kafka_debug_contexts(kafka.debug) if c not in KAFKA_DEBUG_CONTEXTS]
    if unknown:
        raise ConfigError(
            f"[kafka] debug = {kafka.debug!r}: {', '.join(unknown)} is not a librdkafka debug context; "
            f'use a comma-separated list of {", ".join(KAFKA_DEBUG_CONTEXTS)} (e.g. "cgrp,fetch"), or "" for none'
        )
    for uid in sections["receiver"].extra_storage_sop_classes:
        if len(uid) > 64 or not _UID_SYNTAX.fullmatch(uid):
            raise ConfigError(
                f"[receiver] extra_storage_sop_classes: {uid!r} is not a UID (digits and dots, at most 64 "
                'characters), e.g. "1.3.12.2.1107.5.9.1"; give a list of SOP Class UIDs, or [] for none'
            )
        # Objects whose own UIDs have leading zeros are accepted (schemas/uid.py), but a SOP class is
        # registered with pydicom/pynetdicom at start-up, whose UID check refuses them (PS3.5 9.1).
        if not _is_conformant_uid(uid):
            raise ConfigError(
                f"[receiver] extra_storage_sop_classes: {uid!r} has a component with a leading zero, which "
                "DICOM forbids (PS3.5 9.1) and pydicom refuses when the class is registered; write the UID "
                "exactly as the vendor's conformance statement gives it"
            )
    storage = sections["storage"]
    if storage.s3_part_size_mb < 5:
        raise ConfigError(f"[storage] s3_part_size_mb = {storage.s3_part_size_mb}: S3 parts are at least 5 MiB")
    if bool(storage.s3_access_key_id) != bool(storage.s3_secret_access_key):
        raise ConfigError(
            "[storage] s3_access_key_id and s3_secret_access_key are set together (or neither); only one is set"
        )


# Counts and durations that only make sense above a floor: (section, key) -> the least value.
_AT_LEAST = {
    ("kafka", "partitions"): 1,
    ("receiver", "max_associations"): 1,
    ("receiver", "max_associations_per_host"): 1,
    ("query_retrieve", "max_associations_per_host"): 0,
    # 0 is pynetdicom's "no limit" (transport_guard still refuses a PDU announcing more than 64 MiB).
    ("receiver", "max_pdu_bytes"): 0,
    # A deflated data set's header must fit in it; below 1 MiB hardly any would.
    ("receiver", "max_inflated_bytes"): 1048576,
    ("collect", "concurrency"): 1,
    ("collect", "find_limit"): 0,
}
_ABOVE_ZERO = (
    ("kafka", "publish_timeout_s"),
    ("collect", "timeout_s"),
    ("collect", "move_timeout_s"),
    ("receiver", "pdu_read_timeout_s"),
    ("receiver", "tls_handshake_timeout_s"),
    # 0 made the reconcile task list the landing store (S3 too) in a loop with no wait.
    ("receiver", "reconcile_interval_s"),
    # 0 ended every retry round before its first delivery: nothing failed was ever sent again.
    ("alerts", "retry_budget_s"),
)
# What a floor's message adds: the meaning of a boundary value, the default.
_FLOOR_NOTES = {
    ("receiver", "max_pdu_bytes"): " (0: no limit of ours, the guard still refuses a PDU over 64 MiB; default 1048576)",
    ("receiver", "max_inflated_bytes"): " (default 1073741824)",
    ("receiver", "max_associations_per_host"): " (default 8)",
    ("query_retrieve", "max_associations_per_host"): " (0, the default: [receiver] max_associations_per_host)",
    ("collect", "find_limit"): " (0: the PACS's limit of C-FIND matches is not known)",
}


def _check_ranges(sections: dict[str, Any]) -> None:
    """Values a service would only refuse later, with a traceback, once it binds or connects."""
    for section, values in sections.items():
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.name.endswith("port") and isinstance(value, int) and not 0 <= value <= 65535:
                raise ConfigError(f"[{section}] {f.name} = {value}: a TCP port is 0 to 65535")
            if f.name.endswith("ae_title") and isinstance(value, str) and value:
                if len(value) > 16 or "\\" in value or not value.strip() or not value.isascii():
                    raise ConfigError(
                        f"[{section}] {f.name} = {value!r}: an AE title is 1 to 16 ASCII characters, "
                        "not only spaces, without a backslash"
                    )
    for (section, key), least in _AT_LEAST.items():
        if getattr(sections[section], key) < least:
            note = _FLOOR_NOTES.get((section, key), "")
            raise ConfigError(f"[{section}] {key} = {getattr(sections[section], key)}: use {least} or more{note}")
    for section, key in _ABOVE_ZERO:
        value = getattr(sections[section], key)
        if not value > 0:  # NaN too
            raise ConfigError(f"[{section}] {key} = {value}: use a value above 0 (seconds)")
    if sections["stream"].state_retention_days < 0:
        raise ConfigError(
            f"[stream] state_retention_days = {sections['stream'].state_retention_days}: use 0 (kept for ever) or more"
        )
    if sections["routing"].sent_record_retention_days < 0:
        raise ConfigError(
            f"[routing] sent_record_retention_days = {sections['routing'].sent_record_retention_days}: "
            "use 0 (kept for ever) or more"
        )
    if not sections["kafka"].bootstrap.strip():
        raise ConfigError(
            '[kafka] bootstrap is empty: give the brokers as host:port[,host:port], e.g. "127.0.0.1:9092"'
        )


def _password_with_user(section: str, values: Any, user: str, password: str) -> None:
    """A login needs its password, from the environment or a file: said naming both."""
    if getattr(values, user) and not (getattr(values, password) or getattr(values, f"{password}_file")):
        raise ConfigError(
            f"[{section}] {user} is set without a password: set DIANA_{section.upper()}_{password.upper()} "
            f"or {password}_file"
        )


def _check_security(sections: dict[str, Any]) -> None:
    """Security settings that cannot work together fail at start-up, never fall back to plain traffic."""
    kafka, search = sections["kafka"], sections["opensearch"]
    if kafka.security_protocol == "SASL_SSL" and not kafka.sasl_username:
        raise ConfigError("[kafka] security_protocol SASL_SSL needs sasl_username (and DIANA_KAFKA_SASL_PASSWORD)")
    if kafka.security_protocol == "SASL_SSL" and not (kafka.sasl_password or kafka.sasl_password_file):
        raise ConfigError(
            "[kafka] security_protocol SASL_SSL needs a password: set DIANA_KAFKA_SASL_PASSWORD or sasl_password_file"
        )
    if kafka.security_protocol == "PLAINTEXT" and (kafka.sasl_username or kafka.ssl_ca_file):
        raise ConfigError(
            "[kafka] sasl_username or ssl_ca_file is set but security_protocol is PLAINTEXT, which would send "
            'them nowhere and the traffic in the clear: set security_protocol = "SASL_SSL" (or remove them)'
        )
    urls = opensearch_urls(search)
    if not urls:
        raise ConfigError('[opensearch] url is empty: give a node\'s url, e.g. "http://127.0.0.1:9200"')
    if any("@" in url.split("://", 1)[-1].split("/", 1)[0] for url in urls):
        raise ConfigError(
            "[opensearch] url must not carry credentials: set username, and the password through "
            "DIANA_OPENSEARCH_PASSWORD or password_file"
        )
    _password_with_user("opensearch", search, "username", "password")
    plain = [url for url in urls if not url.startswith("https://")]
    if (search.username or search.ca_file) and plain:
        raise ConfigError(
            f"[opensearch] username or ca_file is set but url {plain[0]} is not https: the password would "
            f"travel in the clear; use an https:// url"
        )
    if len({url.startswith("https://") for url in urls}) > 1:
        raise ConfigError("[opensearch] url: the nodes of one cluster are all https:// or all http://, not a mix")
    if search.number_of_replicas < 0:
        raise ConfigError(f"[opensearch] number_of_replicas = {search.number_of_replicas}: use 0 or more")
    if not re.fullmatch(r"\d+(ms|s|m)", search.refresh_interval):
        raise ConfigError(
            f'[opensearch] refresh_interval = {search.refresh_interval!r}: use a duration such as "1s" or "500ms"'
        )
    storage = sections["storage"]
    if storage.s3_ca_file and storage.s3_endpoint.startswith("http://"):
        raise ConfigError(
            f"[storage] s3_ca_file is set but s3_endpoint {storage.s3_endpoint} is not https: the keys' "
            "signatures and every object would travel in the clear; use an https:// endpoint (or remove s3_ca_file)"
        )
    alerts = sections["alerts"]
    if alerts.smtp_security == "none" and (alerts.smtp_username or alerts.smtp_ca_file):
        raise ConfigError(
            '[alerts] smtp_username or smtp_ca_file is set but smtp_security is "none", which would send the '
            'password and every alert in the clear: set smtp_security = "starttls" (port 587) or "tls" (port 465)'
        )
    _password_with_user("alerts", alerts, "smtp_username", "smtp_password")
    receiver = sections["receiver"]
    if receiver.tls_ca_file and not (receiver.tls_cert_file and receiver.tls_key_file):
        raise ConfigError(
            "[receiver] tls_ca_file is set without tls_cert_file and tls_key_file: DICOM over TLS needs the "
            "receiver's certificate and key; set both (or remove tls_ca_file to receive without TLS)"
        )


def opensearch_urls(search: OpenSearchConfig) -> list[str]:
    """The node urls of ``[opensearch] url`` (one, or several separated by commas)."""
    return [url.strip().rstrip("/") for url in search.url.split(",") if url.strip()]


def is_loopback_host(host: str) -> bool:
    """``host`` (a name or an address) is this machine: "localhost" or a loopback address."""
    text = host.strip().strip("[]").lower()
    address = ip_address_of(text)
    return text == "localhost" or (address is not None and address.is_loopback)


def _url_host(url: str) -> str:
    """The host of ``url``, nothing else of it (no user, password, path or query: a webhook's path may be
    its secret)."""
    try:
        return urlsplit(url.strip()).hostname or ""
    except ValueError:
        return ""


def _kafka_hosts(bootstrap: str) -> list[str]:
    """The hosts of ``[kafka] bootstrap`` ("host:port,[v6]:port", a "PROTOCOL://" prefix allowed)."""
    hosts = []
    for entry in filter(None, (e.strip() for e in bootstrap.split(","))):
        entry = entry.split("://", 1)[-1]
        hosts.append(entry[1 : entry.index("]")] if entry.startswith("[") and "]" in entry else entry.rsplit(":", 1)[0])
    return hosts


def remote_plain_http_hosts(urls: Iterable[str]) -> list[str]:
    """The hosts off this machine that the ``http://`` ones among ``urls`` reach in clear, once each."""
    hosts = (_url_host(u) for u in urls if u.strip().lower().startswith("http://"))
    return list(dict.fromkeys(h for h in hosts if h and not is_loopback_host(h)))


def clear_text_endpoints(config: Config) -> dict[str, list[str]]:
    """Each setting of ``config`` that sends in clear to hosts off this machine, and those hosts. Accepted
    (a trusted network may carry it), but said: warn_clear_text."""
    found: dict[str, list[str]] = {}
    kafka = config.kafka
    if kafka.security_protocol == "PLAINTEXT":
        found["[kafka] bootstrap (security_protocol PLAINTEXT)"] = [
            h for h in dict.fromkeys(_kafka_hosts(kafka.bootstrap)) if not is_loopback_host(h)
        ]
    found["[opensearch] url"] = remote_plain_http_hosts(opensearch_urls(config.opensearch))
    if config.storage.backend == "s3":
        found["[storage] s3_endpoint"] = remote_plain_http_hosts([config.storage.s3_endpoint])
    alerts = config.alerts
    if alerts.smtp_security == "none" and not is_loopback_host(alerts.smtp_host):
        found['[alerts] smtp_host (smtp_security "none")'] = [alerts.smtp_host.strip()]
    return {setting: hosts for setting, hosts in found.items() if hosts}


_clear_text_said: set[str] = set()


def warn_clear_text(endpoints: Mapping[str, Iterable[str]]) -> None:
    """One warning per setting and process (``config.clear_text``) for traffic that leaves this machine in
    clear: the setting and the hosts (never a user, password, path or query)."""
    import structlog

    log = structlog.get_logger("diana.config")
    for setting, hosts in endpoints.items():
        hosts = list(hosts)
        if not hosts or setting in _clear_text_said:
            continue
        _clear_text_said.add(setting)
        log.warning(
            "config.clear_text",
            setting=setting,
            hosts=hosts,
            detail="sent unencrypted to hosts off this machine: fine on a trusted network only; see docs/SECURITY.md",
        )


_UTC_OFFSET = re.compile(r"([+-])(\d{2}):([0-5]\d)")
# OpenSearch reads an offset with Java's ZoneOffset, which takes -18:00 to +18:00; Python's timezone
# takes up to 23:59, so a wider offset would pass start-up and be refused with the first search.
_MAX_UTC_OFFSET = timedelta(hours=18)


def time_zone_info(name: str) -> tzinfo:
    """A zone named as OpenSearch takes it, an IANA name or a UTC offset "+HH:MM" within ±18:00; ValueError
    if neither."""
    offset = _UTC_OFFSET.fullmatch(name)
    if offset:
        sign, hours, minutes = offset.groups()
        size = timedelta(hours=int(hours), minutes=int(minutes))
        if size > _MAX_UTC_OFFSET:
            raise ValueError(f"beyond {sign}18:00, the widest UTC offset OpenSearch takes")
        return timezone(-size if sign == "-" else size)
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: a path-like name ("../x")
        raise ValueError("no such zone") from None


def parse_per_modality(spec: str) -> tuple[dict[str, float], float]:
    """``"CT=30,MR=60,*=20"`` → ({"CT": 30.0, "MR": 60.0}, 20.0): positive seconds per modality and a default."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        modality, sep, seconds = part.partition("=")
        try:
            number = float(seconds)
        except ValueError:
            number = -1.0
        if not sep or not modality.strip() or number <= 0:
            raise ValueError(f"quiet time {part!r}: write MODALITY=SECONDS, e.g. CT=30 (and *=30 for the rest)")
        values[modality.strip().upper()] = number
    if "*" not in values:
        raise ValueError("quiet times need a default for other modalities, e.g. *=30")
    default = values.pop("*")
    return values, default


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (``path`` or $DIANA_CONFIG), then DIANA_* variables."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_CONFIG_FILE)
    merged: dict[str, dict[str, Any]] = {}
    base_dir = Path.cwd()
    if path:
        path = Path(path).expanduser()
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing file with --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        base_dir = path.resolve().parent
        for section, values in data.items():
            if section not in _SECTIONS or not isinstance(values, dict):
                raise ConfigError(
                    f"{path}: unknown section [{section}]; valid sections: {', '.join(sorted(_SECTIONS))}"
                )
            merged[section] = dict(values)
    for section, values in _env_overrides(environ).items():
        merged.setdefault(section, {}).update(values)
    sections = {s: _build_section(s, merged.get(s, {}), str(path or "environment")) for s in _SECTIONS}
    _check_choices(sections)
    _check_ranges(sections)
    _check_security(sections)
    # Passwords given as values are known to redaction from the start (files: when they are read).
    for secret in (
        sections["kafka"].sasl_password,
        sections["opensearch"].password,
        sections["storage"].s3_secret_access_key,
    ):
        remember_secret(secret)
    return Config(base_dir=base_dir, **sections)
