"""Prometheus metrics of the receiver (served on [receiver] metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("diana_instances_received_total", "Instances stored and acknowledged")
REJECTED = Counter("diana_instances_rejected_total", "C-STOREs answered with a failure", ["reason"])
BYTES = Counter("diana_received_bytes_total", "Bytes of acknowledged instances")
ASSOCIATIONS = Gauge("diana_associations_open", "Associations currently open")
PUBLISH_LATENCY = Histogram(
    "diana_publish_latency_seconds",
    "Time from produce to broker acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REJECTED_ASSOCIATIONS = Counter("diana_associations_rejected_total", "A-ASSOCIATE-RJ sent", ["reason"])
PUBLISH_REFUSED = Counter(
    "diana_publish_refused_total", "Events the broker refused for good (answered 0xC212, not retried)", ["code"]
)
NONCONFORMANT_UIDS = Counter(
    "diana_nonconformant_uids_total",
    "Identifying UIDs accepted with a leading zero in a component (not PS3.5 9.1 conformant)",
    ["field"],
)
HEADER_OMITTED = Counter(
    "diana_header_elements_omitted_total",
    "Header elements left out of an event (kept in the archived object)",
    ["reason"],
)
# 1 while anyone on the network may store under any AE title: bound off loopback with neither an
# allow-list nor client certificates ([receiver] tls_ca_file). "livemax": one value whatever the workers.
OPEN_TO_ANY_PEER = Gauge(
    "diana_receiver_open_to_any_peer",
    "1 when any host on the network may store (no allowed_hosts, allowed_calling_aes or tls_ca_file off loopback)",
    multiprocess_mode="livemax",
)
