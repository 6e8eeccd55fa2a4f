"""Who may query and retrieve, and the statuses the Q/R SCP ends with: real pynetdicom associations to the
QueryRetrieve handlers in this process (the index an in-memory reader, the archive a folder).

An off-host peer is this machine's own non-loopback address: the SCP listens on it and the requester
connects to it, so the SCP sees that address, as it would a peer on the network (the test fails on a
machine without one: it never passes without having tested)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

import diana.access.qr.retrieve as retrieve
from diana.access.qr.index_reader import Match
from diana.access.qr.peers import REFUSED_COMMENT, PeerPolicy, is_loopback
from diana.access.qr.server import QueryRetrieveServer, build_query_retrieve
from diana.access.qr.service import QueryRetrieve
from diana.config import PRIVATE_STORAGE_SOP_CLASSES, ConfigError, MoveDestination, load_config
from diana.schemas.layout import archive_path
from diana.storage.filesystem import FilesystemStore

CT = Path(get_testdata_file("CT_small.dcm"))
STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
DOC = {
    "study_instance_uid": STUDY,
    "series_instance_uid": SERIES,
    "sop_instance_uid": SOP,
    "sop_class_uid": CTImageStorage,
    "transfer_syntax_uid": ExplicitVRLittleEndian,
}


# ---------------------------------------------------------------------------------------- the decision
def test_loopback_peers_always_may_and_others_only_when_listed():
    closed = PeerPolicy()
    for loopback in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(loopback) and closed.allows("ANY", loopback), loopback
    for off_host in ("10.1.2.3", "192.0.2.2", "fd00::5", "::ffff:10.1.2.3", "0.0.0.0", "not-an-address"):
        assert not closed.allows("ANY", off_host), off_host

    by_ae = PeerPolicy(calling_aes=frozenset({"VIEWER"}))
    assert by_ae.allows("VIEWER", "10.1.2.3") and by_ae.allows("VIEWER  ", "10.9.9.9")
    assert not by_ae.allows("OTHER", "10.1.2.3")

    qr = load_config(environ={"DIANA_QUERY_RETRIEVE_ALLOWED_HOSTS": "10.1.2.3,fd00::5"}).query_retrieve
    by_host = PeerPolicy.from_config(qr)
    assert by_host.allows("ANY", "10.1.2.3") and by_host.allows("ANY", "::ffff:10.1.2.3")
    assert by_host.allows("ANY", "fd00:0::5") and not by_host.allows("ANY", "10.1.2.4")

    both = PeerPolicy(frozenset({"VIEWER"}), by_host.hosts)  # each list set must admit the peer
    assert both.allows("VIEWER", "10.1.2.3")
    assert not both.allows("OTHER", "10.1.2.3") and not both.allows("VIEWER", "10.1.2.4")

    anyone = PeerPolicy(any_peer=True)
    assert anyone.allows("ANY", "203.0.113.7")


def test_settings_from_the_file_or_the_environment_and_a_name_in_allowed_hosts_refused(tmp_path):
    assert load_config(environ={}).query_retrieve.allow_any_peer is False  # refused off-host by default
    qr = load_config(
        environ={
            "DIANA_QUERY_RETRIEVE_ALLOWED_CALLING_AES": "VIEWER, PACS",
            "DIANA_QUERY_RETRIEVE_ALLOWED_HOSTS": "10.1.2.3",
            "DIANA_QUERY_RETRIEVE_ALLOW_ANY_PEER": "true",
        }
    ).query_retrieve
    assert (qr.allowed_calling_aes, qr.allowed_hosts, qr.allow_any_peer) == (("VIEWER", "PACS"), ("10.1.2.3",), True)
    path = tmp_path / "diana.toml"
    path.write_text('[query_retrieve]\nallowed_calling_aes = ["VIEWER"]\nallowed_hosts = ["pacs.example.org"]\n')
    with pytest.raises(ConfigError, match=r"\[query_retrieve\] allowed_hosts: 'pacs.example.org' is neither an IP"):
        load_config(path, environ={})
    # A network in CIDR form is a range of addresses.
    ranged = load_config(environ={"DIANA_QUERY_RETRIEVE_ALLOWED_HOSTS": "10.0.0.0/8"}).query_retrieve
    assert PeerPolicy.from_config(ranged).allows("ANY", "10.200.1.2")
    assert not PeerPolicy.from_config(ranged).allows("ANY", "11.0.0.1")


def test_one_warning_at_start_only_when_off_host_peers_will_be_refused():
    warning = PeerPolicy().start_warning("0.0.0.0")
    assert warning is not None and "allowed_calling_aes or allowed_hosts" in warning
    assert PeerPolicy().start_warning("127.0.0.1") is None
    assert PeerPolicy().start_warning("::1") is None
    assert PeerPolicy(calling_aes=frozenset({"VIEWER"})).start_warning("0.0.0.0") is None
    assert PeerPolicy(any_peer=True).start_warning("0.0.0.0") is None


def test_allow_loopback_false_refuses_loopback_peers_unless_listed_proxies_on_this_host():
    """A TLS terminator, ssh -L, kubectl port-forward or a TCP load balancer on this host makes every peer
    it forwards arrive from loopback: [query_retrieve] allow_loopback = false stops admitting them all."""
    assert load_config(environ={}).query_retrieve.allow_loopback is True
    qr = load_config(environ={"DIANA_QUERY_RETRIEVE_ALLOW_LOOPBACK": "false"}).query_retrieve
    closed = PeerPolicy.from_config(qr)
    for loopback in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "localhost"):
        assert not closed.allows("ANY", loopback), loopback
    by_ae = PeerPolicy(calling_aes=frozenset({"VIEWER"}), loopback=False)
    assert by_ae.allows("VIEWER", "127.0.0.1") and not by_ae.allows("OTHER", "127.0.0.1")
    assert PeerPolicy(any_peer=True, loopback=False).allows("ANY", "127.0.0.1")
    # Refused to everyone, wherever it listens: said once at start.
    for host in ("127.0.0.1", "0.0.0.0"):
        warning = PeerPolicy(loopback=False).start_warning(host)
        assert warning is not None and "allow_loopback = false" in warning and "allowed_calling_aes" in warning
    assert by_ae.start_warning("127.0.0.1") is None


def test_a_loopback_requester_is_refused_with_0124_when_allow_loopback_is_false(archive):
    reader = _Reader()
    service = QueryRetrieve(reader, archive, {}, "DIANA", peers=PeerPolicy(loopback=False))
    with _scp(service) as (host, port):
        assoc = _requester("BEHIND_PROXY").associate(host, port, ae_title="DIANA")
        try:
            status, pending, final = _find(assoc, _study())
            get = _final(assoc.send_c_get(_study(STUDY), StudyRootQueryRetrieveInformationModelGet))
        finally:
            assoc.release()
    assert (status, pending, final.ErrorComment) == (0x0124, [], REFUSED_COMMENT)
    assert get.Status == 0x0124 and reader.calls == 0


# ---------------------------------------------------------------------------------------- the SCP
class _Reader:
    """The index: ``matches`` C-FIND matches, DOC as the one instance to retrieve; counts its calls."""

    def __init__(self, matches: int = 1):
        self.matches = matches
        self.calls = 0

    def find(self, query: Any, limit: int, cancelled: Any = None, header: Any = None) -> Iterator[Match]:
        self.calls += 1
        for number in range(min(self.matches, limit)):
            yield Match({**DOC, "study_instance_uid": f"1.2.3.{number + 1}"}, {})

    def instances(self, query: Any, limit: int) -> list[dict[str, Any]]:
        self.calls += 1
        return [dict(DOC)]


def _off_host_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: the route's source address is read
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if is_loopback(address) or address == "0.0.0.0" else address


@pytest.fixture
def archive(tmp_path: Path) -> FilesystemStore:
    store = FilesystemStore(tmp_path / "archive")
    target = store.root / archive_path(STUDY, SERIES, SOP)
    target.parent.mkdir(parents=True)
    shutil.copyfile(CT, target)
    return store


@contextmanager
def _scp(service: QueryRetrieve, host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    ae = AE("DIANA")
    for abstract_syntax, options in service.contexts():
        ae.add_supported_context(abstract_syntax, **options)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_ECHO, lambda _event: 0x0000), *service.handlers()]
    server = ae.start_server((host, 0), block=False, evt_handlers=handlers)
    try:
        yield host, server.server_address[1]
    finally:
        server.shutdown()


@contextmanager
def _destination() -> Iterator[tuple[int, list[str]]]:
    """A storage SCP on loopback; lists the connections it saw and the SOP Instance UIDs it stored."""
    seen: list[str] = []
    ae = AE("VIEWER")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)

    def store(event):
        seen.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    handlers = [(evt.EVT_CONN_OPEN, lambda _event: seen.append("connection")), (evt.EVT_C_STORE, store)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _study(uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


def _requester(title: str = "REQUESTER") -> AE:
    ae = AE(title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in (
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_requested_context(sop_class)
    return ae


def _find(assoc, identifier: Dataset) -> tuple[int, list[Dataset], Dataset]:
    pending: list[Dataset] = []
    for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if status.Status == 0xFF00:
            pending.append(found)
        else:
            return status.Status, pending, status
    raise AssertionError("no final C-FIND response")


def _final(responses) -> Dataset:
    last = None
    for status, _identifier in responses:
        last = status
    assert last is not None and "Status" in last, "no final response"
    return last


def test_off_host_peer_is_refused_qr_with_0124_once_logged_and_echo_still_answered(archive):
    address = _off_host_address()
    assert address is not None, "this test needs a non-loopback address to be an off-host peer from (none found)"
    reader = _Reader()
    with _destination() as (viewer_port, seen):
        destinations = {"VIEWER": MoveDestination("VIEWER", "127.0.0.1", viewer_port)}
        service = QueryRetrieve(reader, archive, destinations, "DIANA")  # the default: nobody off-host is listed
        with _scp(service, address) as (host, port), structlog.testing.capture_logs() as logs:
            assoc = _requester("INTRUDER").associate(host, port, ae_title="DIANA")
            assert assoc.is_established
            try:
                assert assoc.send_c_echo().Status == 0x0000
                status, pending, final = _find(assoc, _study())
                assert (status, pending, final.ErrorComment) == (0x0124, [], REFUSED_COMMENT)
                get = _final(assoc.send_c_get(_study(STUDY), StudyRootQueryRetrieveInformationModelGet))
                move = _final(assoc.send_c_move(_study(STUDY), "VIEWER", StudyRootQueryRetrieveInformationModelMove))
                assert (get.Status, get.ErrorComment) == (0x0124, REFUSED_COMMENT)
                assert (move.Status, move.ErrorComment) == (0x0124, REFUSED_COMMENT)
            finally:
                assoc.release()
    assert reader.calls == 0 and seen == []  # neither the index read nor the destination connected to
    refusals = [line for line in logs if line["event"] == "qr.refused"]
    assert len(refusals) == 1, refusals  # once per association, with the calling AE and the address only
    assert (refusals[0]["calling_ae"], refusals[0]["peer"]) == ("INTRUDER", address)


def test_an_allowed_off_host_requester_queries_and_moves_to_a_configured_destination(archive):
    address = _off_host_address()
    assert address is not None, "this test needs a non-loopback address to be an off-host peer from (none found)"
    with _destination() as (viewer_port, seen):
        destinations = {"VIEWER": MoveDestination("VIEWER", "127.0.0.1", viewer_port)}
        service = QueryRetrieve(
            _Reader(2), archive, destinations, "DIANA", peers=PeerPolicy(calling_aes=frozenset({"WORKSTATION"}))
        )
        with _scp(service, address) as (host, port):
            assoc = _requester("WORKSTATION").associate(host, port, ae_title="DIANA")
            try:
                status, pending, _ = _find(assoc, _study())
                move = _final(assoc.send_c_move(_study(STUDY), "VIEWER", StudyRootQueryRetrieveInformationModelMove))
            finally:
                assoc.release()
    assert (status, len(pending)) == (0x0000, 2)
    assert (move.Status, move.NumberOfCompletedSuboperations) == (0x0000, 1)
    assert seen == ["connection", SOP]  # the destination is not the requester: it needs no listing


def test_loopback_requesters_are_answered_with_the_default_settings(archive):
    service = QueryRetrieve(_Reader(3), archive, {}, "DIANA")
    with _scp(service) as (host, port):
        assoc = _requester().associate(host, port, ae_title="DIANA")
        try:
            status, pending, _ = _find(assoc, _study())
        finally:
            assoc.release()
    assert (status, len(pending)) == (0x0000, 3)


def test_a_find_with_more_matches_than_max_matches_ends_with_a700_not_success(archive):
    with _scp(QueryRetrieve(_Reader(3), archive, {}, "DIANA", max_matches=2)) as (host, port):
        assoc = _requester().associate(host, port, ae_title="DIANA")
        try:
            over = _find(assoc, _study())
        finally:
            assoc.release()
    with _scp(QueryRetrieve(_Reader(2), archive, {}, "DIANA", max_matches=2)) as (host, port):
        assoc = _requester().associate(host, port, ae_title="DIANA")
        try:
            exact = _find(assoc, _study())
        finally:
            assoc.release()
    assert (over[0], len(over[1]), over[2].ErrorComment) == (0xA700, 2, "more than 2 matches: narrow the query")
    assert (exact[0], len(exact[1])) == (0x0000, 2)  # max_matches matches and no more: complete


def test_a_move_refused_for_its_identifier_connects_nowhere_and_says_why(archive):
    with _destination() as (viewer_port, seen):
        destinations = {
            "DOWN": MoveDestination("DOWN", "127.0.0.1", _closed_port()),
            "TLSPEER": MoveDestination("TLSPEER", "127.0.0.1", viewer_port, tls=True),  # a plain SCP: TLS fails
        }
        with _scp(QueryRetrieve(_Reader(), archive, destinations, "DIANA")) as (host, port):
            assoc = _requester().associate(host, port, ae_title="DIANA")
            try:
                no_level = Dataset()
                no_level.StudyInstanceUID = STUDY
                results = {
                    name: _final(assoc.send_c_move(no_level, name, StudyRootQueryRetrieveInformationModelMove))
                    for name in destinations
                }
                unknown = _final(assoc.send_c_move(_study(STUDY), "NOBODY", StudyRootQueryRetrieveInformationModelMove))
            finally:
                assoc.release()
    for name, result in results.items():
        assert result.Status == 0xA900, (name, hex(result.Status))  # not 0xA801: the destination is not asked
    assert unknown.Status == 0xA801
    assert seen == []


def _get(archive: FilesystemStore, transfer_syntax: str, sop_class: str = CTImageStorage) -> tuple[Dataset, list]:
    received: list[str] = []

    def store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    requester = AE("GETTER")
    requester.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    requester.add_requested_context(sop_class, [transfer_syntax])
    with _scp(QueryRetrieve(_Reader(), archive, {}, "DIANA")) as (host, port):
        assoc = requester.associate(
            host,
            port,
            ae_title="DIANA",
            ext_neg=[build_role(sop_class, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, store)],
        )
        try:
            final = _final(assoc.send_c_get(_study(STUDY), StudyRootQueryRetrieveInformationModelGet))
        finally:
            assoc.release()
    return final, received


def test_a_get_fails_an_object_the_requester_did_not_negotiate_without_reading_it(archive, monkeypatch):
    reads: list[str] = []
    real_dcmread = retrieve.dcmread

    def dcmread(path, *args, **kwargs):
        reads.append(str(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(retrieve, "dcmread", dcmread)
    final, received = _get(archive, ExplicitVRLittleEndian, sop_class=MRImageStorage)  # a CT is archived
    assert (final.Status, final.NumberOfFailedSuboperations, received, reads) == (0xA702, 1, [], [])

    final, received = _get(archive, ExplicitVRLittleEndian)  # its own syntax: sent from the file, not read
    assert (final.Status, received, reads) == (0x0000, [SOP], [])
    final, received = _get(archive, ImplicitVRLittleEndian)  # converted: read, as before
    assert (final.Status, received) == (0x0000, [SOP]) and len(reads) == 1


# ---------------------------------------------------------------------------------------- private classes
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # in [receiver] extra_storage_sop_classes by default


class _PrivateReader(_Reader):
    def __init__(self, doc: dict[str, Any]):
        super().__init__()
        self.doc = doc

    def instances(self, query: Any, limit: int) -> list[dict[str, Any]]:
        return [dict(self.doc)]


def _private_object(tmp_path: Path) -> tuple[FilesystemStore, dict[str, Any]]:
    """An archive holding one object of a private storage class, and its index document."""
    ds = dcmread(CT)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SIEMENS_CSA_NON_IMAGE
    del ds.PixelData
    store = FilesystemStore(tmp_path / "private-archive")
    target = store.root / archive_path(STUDY, SERIES, SOP)
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)
    return store, {**DOC, "sop_class_uid": SIEMENS_CSA_NON_IMAGE, "transfer_syntax_uid": ExplicitVRLittleEndian}


def test_a_get_fetches_an_object_of_an_extra_private_storage_class(tmp_path):
    """C-GET sub-operations need the class negotiated with the SCP/SCU role selection: before, only
    pynetdicom's standard classes were, and objects of private classes stored thanks to [receiver]
    extra_storage_sop_classes could be moved but not fetched with C-GET."""
    store, doc = _private_object(tmp_path)
    received: list[tuple[str, str]] = []

    def on_store(event):
        received.append((str(event.context.abstract_syntax), str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    requester = AE("GETTER")
    requester.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    requester.add_requested_context(SIEMENS_CSA_NON_IMAGE, [ExplicitVRLittleEndian])
    service = QueryRetrieve(_PrivateReader(doc), store, {}, "DIANA", storage_sop_classes=PRIVATE_STORAGE_SOP_CLASSES)
    with _scp(service) as (host, port):
        assoc = requester.associate(
            host,
            port,
            ae_title="DIANA",
            ext_neg=[build_role(SIEMENS_CSA_NON_IMAGE, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        try:
            accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == SIEMENS_CSA_NON_IMAGE]
            assert accepted and accepted[0].as_scp  # the requester takes the SCP role
            final = _final(assoc.send_c_get(_study(STUDY), StudyRootQueryRetrieveInformationModelGet))
        finally:
            assoc.release()
    assert (final.Status, received) == (0x0000, [(SIEMENS_CSA_NON_IMAGE, SOP)])


def test_role_contexts_for_every_storage_class_and_the_extra_ones_on_the_receiver_and_diana_serve(tmp_path):
    """The acceptor supports any number of contexts (128 is the requester's limit on what it proposes):
    every standard storage class and every extra one, once, with the roles; a UID of another service is
    refused at start as on the receiver."""
    extra = (SIEMENS_CSA_NON_IMAGE, "1.2.3.4.5", CTImageStorage, SIEMENS_CSA_NON_IMAGE)
    service = QueryRetrieve(_Reader(), FilesystemStore(tmp_path / "a"), {}, "DIANA", storage_sop_classes=extra)
    roles = {uid: options for uid, options in service.contexts() if options.get("scp_role")}
    assert len(roles) == len(AllStoragePresentationContexts) + 2
    assert roles[SIEMENS_CSA_NON_IMAGE]["scu_role"] and "1.2.3.4.5" in roles
    with pytest.raises(ValueError, match="not a storage one"):
        QueryRetrieve(
            _Reader(), FilesystemStore(tmp_path / "a"), {}, "DIANA", storage_sop_classes=(Verification,)
        ).contexts()

    # The configuration reaches diana serve's Q/R and the receiver's (both built by build_query_retrieve).
    cfg = load_config(environ={"DIANA_STORAGE_ARCHIVE_DIR": str(tmp_path / "archive")})
    assert build_query_retrieve(cfg, warn=False).storage_sop_classes == PRIVATE_STORAGE_SOP_CLASSES
    server = QueryRetrieveServer(cfg)
    supported = {cx.abstract_syntax: cx for cx in server.ae.supported_contexts}
    for uid in PRIVATE_STORAGE_SOP_CLASSES:
        assert supported[uid].scp_role and supported[uid].scu_role, uid
