"""Who may query and retrieve: C-FIND, C-MOVE and C-GET from peers off this host need to be allowed.

As Orthanc since 1.9 (C-FIND/C-GET/C-MOVE from an AE it does not know are refused unless
``DicomAlwaysAllowFind/Get/Move``), storage stays open and query/retrieve does not: the receiver
listens on 0.0.0.0 by default, and anything on the network could otherwise list the patients and
retrieve the archive. A peer on loopback is allowed (local tools, the integration tests) unless
``[query_retrieve] allow_loopback`` is false: a proxy on the same host (a TLS terminator, ``ssh -L``,
``kubectl port-forward``, a TCP load balancer) makes every peer it forwards look like loopback.
Any other peer is allowed when ``[query_retrieve] allow_any_peer`` is true, or when at least one of
``allowed_calling_aes`` / ``allowed_hosts`` is set and every list that is set admits it (as the
receiver's own ``[receiver]`` lists combine: a calling AE title is easily claimed, a host with it
is the stronger rule). C-ECHO and C-STORE are never affected.
"""

from __future__ import annotations

from dataclasses import dataclass

from diana.config import AllowedHosts, QueryRetrieveConfig, ip_address_of, parse_allowed_hosts

__all__ = ["PeerPolicy", "is_loopback", "REFUSED_COMMENT"]

# ErrorComment of a refused request (LO: at most 64 characters); no patient data, says the fix.
REFUSED_COMMENT = "not authorised: add AE to [query_retrieve] allowed_calling_aes"


def is_loopback(host: str) -> bool:
    """``host`` (an address as a socket gives it, or "localhost") is this machine's loopback."""
    if host.strip().lower() == "localhost":
        return True
    address = ip_address_of(host)
    return address is not None and address.is_loopback


@dataclass(frozen=True)
class PeerPolicy:
    calling_aes: frozenset[str] = frozenset()
    hosts: AllowedHosts = AllowedHosts()
    any_peer: bool = False
    loopback: bool = True  # [query_retrieve] allow_loopback

    @classmethod
    def from_config(cls, qr: QueryRetrieveConfig) -> PeerPolicy:
        return cls(
            frozenset(str(ae).strip() for ae in qr.allowed_calling_aes),
            parse_allowed_hosts(qr.allowed_hosts),
            qr.allow_any_peer,
            qr.allow_loopback,
        )

    @property
    def listed(self) -> bool:
        """An allow-list is set: some peers off this host may query and retrieve."""
        return bool(self.calling_aes or self.hosts)

    def allows(self, calling_ae: str, address: str) -> bool:
        """May the peer ``address`` calling as ``calling_ae`` query and retrieve?"""
        if self.any_peer or (self.loopback and is_loopback(address)):
            return True
        if not self.listed:
            return False
        if self.calling_aes and calling_ae.strip() not in self.calling_aes:
            return False
        return not self.hosts or self.hosts.admits(address)

    def start_warning(self, host: str) -> str | None:
        """What to log once at start when peers off this host will be refused and nothing says who may ask."""
        if self.any_peer or self.listed:
            return None
        if not self.loopback:
            return (
                "query/retrieve (C-FIND, C-MOVE, C-GET) is refused to every peer, loopback included "
                "([query_retrieve] allow_loopback = false), until [query_retrieve] allowed_calling_aes or "
                "allowed_hosts is set (or allow_any_peer = true); C-STORE and C-ECHO are not affected"
            )
        if is_loopback(host):
            return None
        return (
            f"query/retrieve (C-FIND, C-MOVE, C-GET) is refused to peers off this host (listening on {host}) "
            "until [query_retrieve] allowed_calling_aes or allowed_hosts is set (or allow_any_peer = true); "
            "C-STORE and C-ECHO are not affected"
        )
