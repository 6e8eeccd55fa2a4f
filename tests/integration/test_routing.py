"""`diana route` on the real pipeline: dcmtk storescp and Orthanc (DICOM and STOW-RS) as destinations.

Instances go in with storescu; the router sends them from the archive. One destination is down for
60 s while another receives; one accepts MR only, so the CT it is sent is refused and dead-lettered;
one gets a whole study once the aggregates worker says it is complete.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from diana.config import load_config
from diana.operations.status import collect_status
from diana.schemas.topics import DEADLETTER, INSTANCES, STUDIES
from tests.integration.test_dose_stack import ct_study_with_report
from tests.support.dicomgen import make_instance
from tests.support.helpers import DCMTK_ENV, group_lag, read_messages, storescu, topic_records
from tests.support.orthanc import DICOM_PORT, HTTP_PORT, ORTHANC_AE, start_orthanc, stop_orthanc
from tests.support.paths import TEST_HOME, port
from tests.support.pki import make_certificates

DCMTK_PORT = port(11260)
MRONLY_PORT = port(11261)
WHOLE_PORT = port(11262)
QA_PORT = port(11263)
TLS_PORT = port(11264)
BULK_PORT = port(11265)
MIXED_PORT = port(11266)
MAINTENANCE_PORT = port(11267)
METRICS_PORT = port(19468)

RULES = f"""
destinations:
  - {{name: dcmtk, ae_title: ROUTEDCMTK, host: 127.0.0.1, port: {DCMTK_PORT}}}
  - {{name: orthanc, ae_title: {ORTHANC_AE}, host: 127.0.0.1, port: {DICOM_PORT}}}
  - {{name: orthanc-stow, stow_url: "http://127.0.0.1:{HTTP_PORT}/dicom-web/studies"}}
  - {{name: mr-only, ae_title: MRONLY, host: 127.0.0.1, port: {MRONLY_PORT}, max_attempts: 2}}
  - {{name: whole, ae_title: WHOLE, host: 127.0.0.1, port: {WHOLE_PORT}}}
  - {{name: qa, ae_title: DOSEQA, host: 127.0.0.1, port: {QA_PORT}}}
  - {{name: secure, ae_title: SECURE, host: 127.0.0.1, port: {TLS_PORT}, tls: true}}
  - {{name: bulk, ae_title: BULK, host: 127.0.0.1, port: {BULK_PORT}}}
  - {{name: research, stow_url: "http://127.0.0.1:{HTTP_PORT}/dicom-web/studies", deidentify_project: ROUTETEST}}
  - {{name: mixed, ae_title: MIXED, host: 127.0.0.1, port: {MIXED_PORT}}}
  - {{name: maintenance, ae_title: MAINTENANCE, host: 127.0.0.1, port: {MAINTENANCE_PORT}, max_attempts: 2}}
rules:
  - name: ct-chest
    match: {{modality: [CT], station: [ROUTESTATION], body_part: [chest]}}
    destinations: [dcmtk, orthanc, mr-only]
  - name: routed-mr
    match: {{modality: MR, study_description: "(?i)^routed mr"}}
    destinations: [orthanc-stow]
  - name: whole-studies
    match: {{station: [WHOLESTATION]}}
    whole_study: true
    destinations: [whole]
  - name: dose-alerted-ct
    match: {{dose_alert: true, modality: CT}}
    destinations: [qa]
  - name: over-tls
    match: {{station: TLSSTATION}}
    destinations: [secure]
  - name: bulk
    match: {{station: BULKSTATION}}
    destinations: [bulk]
  - name: research-deidentified
    match: {{station: DEIDSTATION}}
    destinations: [research]
  # A plain rule and a whole_study rule of one destination: they share its record (docs/ROUTING.md).
  # Each test's station goes to its own destination only: the maintenance destination has no listener
  # outside its test, so anything else sent there waits for it and is refused first in its test.
  - name: mixed-arriving
    match: {{station: [MIXEDSTATION]}}
    destinations: [mixed]
  - name: mixed-whole
    match: {{station: [MIXEDSTATION]}}
    whole_study: true
    destinations: [mixed]
  - name: maintenance-arriving
    match: {{station: [MAINTSTATION]}}
    destinations: [maintenance]
  - name: maintenance-whole
    match: {{station: [MAINTSTATION]}}
    whole_study: true
    destinations: [maintenance]
"""

# dcmtk's association profile for a destination that accepts MR images only (CT is refused).
MR_ONLY_PROFILE = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[MROnly]
PresentationContext1 = MRImageStorage\\Uncompressed
PresentationContext2 = VerificationSOPClass\\Uncompressed
[[Profiles]]
[MROnly]
PresentationContexts = MROnly
"""


def start_storescp(
    ae: str, listen: int, out: Path, extra: list[str] | None = None, echo: bool = True
) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", *(extra or ["+xa"]), "-aet", ae, "-od", str(out), str(listen)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    if not echo:  # over TLS: echoscu would need the certificates; wait for the port instead
        wait_for(f"storescp {ae} listening", lambda: proc.poll() is not None or _listening(listen), 15)
        assert proc.poll() is None, f"storescp {ae} did not start"
        return proc
    deadline = time.monotonic() + 15
    while subprocess.run(
        ["echoscu", "-aec", ae, "127.0.0.1", str(listen)], capture_output=True, env=DCMTK_ENV
    ).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, f"storescp {ae} did not start"
        time.sleep(0.2)
    return proc


def _listening(listen: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", listen), timeout=1):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


def received_sops(folder: Path) -> set[str]:
    out = set()
    for path in folder.glob("*"):
        try:
            out.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        except Exception:
            pass  # a file storescp is still writing: read at the next look
    return out


def orthanc_sops(url: str, study_uid: str) -> set[str]:
    response = requests.post(
        url + "/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        timeout=30,
    )
    response.raise_for_status()
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in response.json()}


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(1.0)


def write_instances(folder: Path, count: int, **fields: str) -> dict[str, Path]:
    """``count`` instances of one new study (one series), with header fields overridden; SOP UID -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = {}
    for number in range(1, count + 1):
        ds = make_instance(study, series, number, patient_id="ROUTE0001", study_date="20240601", rows=16)
        for key, value in fields.items():
            setattr(ds, key, value)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[str(ds.SOPInstanceUID)] = path
    return out


@pytest.fixture(scope="module")
def routing(pipeline):
    work = TEST_HOME / "routing"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    rules = work / "routing.yaml"
    rules.write_text(RULES)
    (work / "mr-only.cfg").write_text(MR_ONLY_PROFILE)
    orthanc = start_orthanc(work, {}, {})
    mr_only = start_storescp("MRONLY", MRONLY_PORT, work / "mr-only", ["-xf", str(work / "mr-only.cfg"), "MROnly"])
    whole = start_storescp("WHOLE", WHOLE_PORT, work / "whole")
    qa = start_storescp("DOSEQA", QA_PORT, work / "qa")
    mixed = start_storescp("MIXED", MIXED_PORT, work / "mixed")
    pki = work / "pki"
    pki.mkdir()
    c = make_certificates(pki)
    tls_server = ["+tls", str(c["server.key"]), str(c["server.pem"]), "+cf", str(c["ca.pem"]), "+xa"]
    secure = start_storescp("SECURE", TLS_PORT, work / "secure", tls_server, echo=False)
    secret = work / "site-secret"
    secret.write_bytes(b"routing-test-site-secret-0123456789")
    secret.chmod(0o600)
    settings = {
        # TLS toward destinations: verified against the receiver's CA, presenting its certificate
        "DIANA_RECEIVER_TLS_CERT_FILE": str(c["client.pem"]),
        "DIANA_RECEIVER_TLS_KEY_FILE": str(c["client.key"]),
        "DIANA_RECEIVER_TLS_CA_FILE": str(c["ca.pem"]),
        "DIANA_EXPORT_SITE_SECRET_FILE": str(secret),
        "DIANA_ROUTING_RULES": str(rules),
        "DIANA_ROUTING_METRICS_PORT": str(METRICS_PORT),
        "DIANA_ROUTING_MAX_BACKOFF_S": "5",
    }
    pipeline.start("router", "route", settings=settings)
    # A new destination starts with what arrives after it joined: send only once every worker has.
    wait_for(
        "every destination's worker started",
        lambda: pipeline.log_text("router").count("route.started") >= RULES.count("{name:"),
        120,
    )
    yield {"work": work, "orthanc": orthanc, "settings": settings}
    pipeline.stop("router")
    stop(mr_only)
    stop(whole)
    stop(qa)
    stop(mixed)
    stop(secure)
    stop_orthanc(orthanc)


def test_a_destination_down_for_60s_gets_every_match_once_back_and_holds_back_no_other(pipeline, routing, tmp_path):
    cfg, work, orthanc = pipeline.cfg, routing["work"], routing["orthanc"]
    ct = write_instances(tmp_path / "ct", 6, StationName="ROUTESTATION", BodyPartExamined="CHEST")
    other = write_instances(tmp_path / "head", 3, StationName="ROUTESTATION", BodyPartExamined="HEAD")
    mr = write_instances(
        tmp_path / "mr", 2, Modality="MR", StudyDescription="ROUTED MR BRAIN", StationName="ROUTESTATION"
    )
    ct_study = str(pydicom.dcmread(next(iter(ct.values()))).StudyInstanceUID)
    mr_study = str(pydicom.dcmread(next(iter(mr.values()))).StudyInstanceUID)
    other_study = str(pydicom.dcmread(next(iter(other.values()))).StudyInstanceUID)
    # the dcmtk destination is down: nothing listens on its port
    sent_at = time.monotonic()
    result = storescu(cfg, [*ct.values(), *other.values(), *mr.values()])
    assert result.returncode == 0, result.stderr

    # Orthanc is not held back by the absent destination: CT by C-STORE, MR by STOW-RS
    wait_for("CT at Orthanc", lambda: orthanc_sops(orthanc.url, ct_study) == set(ct), 60)
    wait_for("MR at Orthanc by STOW-RS", lambda: orthanc_sops(orthanc.url, mr_study) == set(mr), 60)
    assert time.monotonic() - sent_at < 60, "the other destinations were only served after the outage"

    # diana status shows what the absent destination has not received
    status = collect_status(load_config(pipeline.config_file, environ=routing["settings"]))
    assert status.routes["dcmtk"]["dicom.instances"] >= len(ct), status.routes
    assert status.routes["orthanc"]["dicom.instances"] == 0, status.routes

    def lag_and_metrics() -> tuple[float, str] | None:
        text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        lag = {
            line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("diana_route_lag{")
        }
        value = lag.get('diana_route_lag{destination="dcmtk"}', -1.0)
        return (value, text) if value >= len(ct) else None

    # the lag gauge is refreshed every few seconds while the destination is down
    _, metrics = wait_for("the dcmtk destination's lag in the metrics", lag_and_metrics, 30)
    assert 'diana_route_destination_up{destination="dcmtk"} 0.0' in metrics

    time.sleep(max(0.0, 60 - (time.monotonic() - sent_at)))
    dcmtk = start_storescp("ROUTEDCMTK", DCMTK_PORT, work / "dcmtk")
    try:
        wait_for("CT at dcmtk after its outage", lambda: set(ct) <= received_sops(work / "dcmtk"), 120)
        time.sleep(3)  # anything else sent with them would have arrived by now
        got = received_sops(work / "dcmtk")
        assert got == set(ct), f"dcmtk got non-matching instances: {got - set(ct)}"
    finally:
        stop(dcmtk)
    assert orthanc_sops(orthanc.url, other_study) == set(), "a non-matching instance was routed"

    # storescp names files by SOP Instance UID (a second send would overwrite): the router's count says "once"
    metrics = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    assert 'diana_route_sent_total{destination="dcmtk"} 6.0' in metrics
    assert 'diana_route_unavailable_total{destination="dcmtk"}' in metrics


def test_an_instance_the_destination_refuses_is_dead_lettered_after_max_attempts(pipeline, routing, tmp_path):
    cfg = pipeline.cfg
    ct = write_instances(tmp_path / "ct", 2, StationName="ROUTESTATION", BodyPartExamined="CHEST")
    result = storescu(cfg, list(ct.values()))
    assert result.returncode == 0, result.stderr

    def dead_for_mr_only() -> dict[str, str]:
        out = {}
        for msg in read_messages(cfg, "dicom.deadletter"):
            headers = {k: v.decode() for k, v in msg.headers() or []}
            if headers.get("sink") == "route-mr-only":
                for sop in ct:
                    if sop in headers["reason"]:
                        out[sop] = headers["reason"]
        return out if set(out) == set(ct) else {}

    reasons = wait_for("dead letters of the refused CT", dead_for_mr_only, 120)
    for reason in reasons.values():
        assert "refused 2 times" in reason and "presentation context" in reason, reason
    assert received_sops(routing["work"] / "mr-only") == set()


def test_a_whole_study_is_forwarded_once_complete(pipeline, routing, tmp_path):
    cfg, folder = pipeline.cfg, routing["work"] / "whole"
    before = received_sops(folder)
    study = write_instances(tmp_path / "whole", 5, StationName="WHOLESTATION")
    result = storescu(cfg, list(study.values()))
    assert result.returncode == 0, result.stderr
    # not instance by instance: nothing before the aggregates worker completes the study (quiet time 4 s)
    time.sleep(1.0)
    assert received_sops(folder) - before == set()
    wait_for("the whole study", lambda: received_sops(folder) - before == set(study), 120)


def _sent_total(destination: str) -> float:
    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    prefix = f'diana_route_sent_total{{destination="{destination}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_a_late_instance_of_a_study_forwarded_whole_goes_alone(pipeline, routing, tmp_path):
    """A study forwarded whole, then amended by a late image: the destination gets that image, and
    nothing it had already (before, late instances were never forwarded)."""
    cfg, folder = pipeline.cfg, routing["work"] / "whole"
    before = received_sops(folder)
    study = write_instances(tmp_path / "amended", 3, StationName="WHOLESTATION")
    assert storescu(cfg, list(study.values())).returncode == 0
    wait_for("the whole study", lambda: received_sops(folder) - before == set(study), 120)
    sent_before = _sent_total("whole")
    first = pydicom.dcmread(next(iter(study.values())))
    late = make_instance(
        first.StudyInstanceUID, first.SeriesInstanceUID, 4, patient_id="ROUTE0001", study_date="20240601", rows=16
    )
    late.StationName = "WHOLESTATION"
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    assert storescu(cfg, [late_path]).returncode == 0
    wait_for("the late image", lambda: str(late.SOPInstanceUID) in received_sops(folder), 120)
    time.sleep(3.0)  # anything sent with it would have arrived by now
    assert received_sops(folder) - before == {*study, str(late.SOPInstanceUID)}
    assert _sent_total("whole") - sent_before == 1.0


def test_the_instances_of_a_study_that_raised_a_dose_alert_are_forwarded(pipeline, routing, tmp_path):
    cfg, folder = pipeline.cfg, routing["work"] / "qa"
    # a CT abdomen over the test DRL (tests/support/data/dose-rules.yaml) with its dose report
    study, rdsr = ct_study_with_report(tmp_path / "dose", "ROUTEDOSE1", "20240610", spiral_dlp="790")
    result = storescu(cfg, [*study.files, rdsr])
    assert result.returncode == 0, result.stderr
    ct = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study.files}
    wait_for("the alerted study's CT at the QA destination", lambda: received_sops(folder) == ct, 120)
    rdsr_uid = str(pydicom.dcmread(rdsr, stop_before_pixels=True).SOPInstanceUID)
    assert rdsr_uid not in received_sops(folder), "the rule asks for CT only; the dose report (SR) was sent"


def test_a_deidentifying_destination_gets_no_identifying_value(pipeline, routing, tmp_path):
    cfg, orthanc = pipeline.cfg, routing["orthanc"]
    before = set(orthanc.get("/instances"))
    sent = write_instances(tmp_path / "deid", 2, StationName="DEIDSTATION", PatientName="Routed^Identifiable")
    result = storescu(cfg, list(sent.values()))
    assert result.returncode == 0, result.stderr
    wait_for("2 de-identified instances at Orthanc", lambda: len(set(orthanc.get("/instances")) - before) >= 2, 120)
    time.sleep(2)  # a third would have arrived by now
    new = set(orthanc.get("/instances")) - before
    assert len(new) == 2, new
    for orthanc_id in new:
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        assert tags["PatientIdentityRemoved"] == "YES"
        assert tags["PatientID"] != "ROUTE0001" and "Identifiable" not in tags.get("PatientName", "")
        assert tags["SOPInstanceUID"] not in sent, "the SOP Instance UID went out unchanged"


def test_a_destination_over_tls_receives_verified_against_the_ca(pipeline, routing, tmp_path):
    sent = write_instances(tmp_path / "tls", 2, StationName="TLSSTATION")
    result = storescu(pipeline.cfg, list(sent.values()))
    assert result.returncode == 0, result.stderr
    wait_for(
        "the instances at the TLS destination", lambda: received_sops(routing["work"] / "secure") == set(sent), 120
    )


def test_a_backlog_survives_kill_9_of_the_router_and_drains_once_the_destination_is_back(pipeline, routing, tmp_path):
    cfg, folder = pipeline.cfg, routing["work"] / "bulk"
    sent = write_instances(tmp_path / "bulk", 200, StationName="BULKSTATION")
    result = storescu(cfg, list(sent.values()))
    assert result.returncode == 0, result.stderr

    def lag() -> float:
        metrics = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        line = next((x for x in metrics.splitlines() if x.startswith('diana_route_lag{destination="bulk"}')), "x 0")
        return float(line.split()[1])

    # the destination is down; the router has the backlog in hand (consumed, not committed) when it is killed
    wait_for("the bulk backlog in the router's lag", lambda: lag() >= len(sent), 120)
    pipeline.stop("router", kill=True)
    pipeline.start("router", "route", settings=routing["settings"])
    started = time.monotonic()
    bulk = start_storescp("BULK", BULK_PORT, folder)
    try:
        wait_for("the whole backlog at the destination", lambda: received_sops(folder) == set(sent), 300)
        drained = time.monotonic() - started
    finally:
        stop(bulk)
    times = sorted(p.stat().st_mtime for p in folder.iterdir())
    print(
        f"{len(sent)} instances at the destination {drained:.1f} s after the router restarted "
        f"(group rebalance included); first to last file {times[-1] - times[0]:.2f} s"
    )


def test_a_corrected_copy_reaches_a_destination_with_a_plain_and_a_whole_study_rule(pipeline, routing, tmp_path):
    """Under REPLACE a modality sends a corrected copy (same SOP Instance UID, other bytes) of an instance
    the destination was sent on its arrival: its arrival sends it again. Before, the destination's record
    (shared by its plain and whole_study rules) listed the SOP Instance UID and nothing went. The study's
    completion sends nothing the arrivals sent (each instance once)."""
    from tests.integration.test_conflicts_agree import _restart

    cfg, folder = pipeline.cfg, routing["work"] / "mixed"
    _restart(pipeline, "REPLACE")
    try:
        sent_before = _sent_total("mixed")
        study = write_instances(tmp_path / "mixed", 3, StationName="MIXEDSTATION")
        assert storescu(cfg, list(study.values())).returncode == 0
        wait_for("the arrivals at the mixed destination", lambda: set(study) <= received_sops(folder), 120)
        time.sleep(15.0)  # the study's completion (quiet time 4 s) came and sent nothing more
        assert _sent_total("mixed") - sent_before == 3.0
        sop, path = next(iter(study.items()))
        corrected = pydicom.dcmread(path)
        corrected.StudyDescription = "CORRECTED"
        corrected_path = tmp_path / "corrected.dcm"
        corrected.save_as(corrected_path, enforce_file_format=True)
        assert storescu(cfg, [corrected_path]).returncode == 0
        wait_for("the corrected copy sent", lambda: _sent_total("mixed") - sent_before == 4.0, 120)
        time.sleep(10.0)  # the study's amended record (complete again) sends nothing: it compares UIDs
        assert _sent_total("mixed") - sent_before == 4.0
        # What went is what the archive held when the router planned the event: the corrected bytes once
        # the archive sink replaced them (the router does not wait for that: docs/ROUTING.md).
        descriptions = {
            str(ds.get("StudyDescription"))
            for p in folder.glob("*")
            if (ds := pydicom.dcmread(p, stop_before_pixels=True)).SOPInstanceUID == sop
        }
        print(f"the destination's copies of the corrected instance: {sorted(descriptions)}")
    finally:
        _restart(pipeline, None)


def test_instances_refused_during_maintenance_go_with_the_study_s_next_complete_record(pipeline, routing, tmp_path):
    """A destination in maintenance refuses CT (an MR-only storescp on its port): each instance is
    refused max_attempts (2) times and dead-lettered, not recorded, on its arrival and again at the
    study's completion (once only when the worker takes the arrivals and the complete record in one
    batch: a batch plans an instance once). Back (an accepting storescp), a late image amends the
    study: its next complete record sends the late image and the three refused before. Before, the
    refused ones were recorded as sent and only the late image went."""
    cfg, work = pipeline.cfg, routing["work"]
    folder = work / "maintenance"
    refusing = start_storescp(
        "MAINTENANCE", MAINTENANCE_PORT, work / "maintenance-refused", ["-xf", str(work / "mr-only.cfg"), "MROnly"]
    )
    study = write_instances(tmp_path / "maint", 3, StationName="MAINTSTATION")
    study_uid = str(pydicom.dcmread(next(iter(study.values())), stop_before_pixels=True).StudyInstanceUID)
    group = f"{cfg.routing.group_prefix}-maintenance"
    try:
        assert storescu(cfg, list(study.values())).returncode == 0

        def dead_lettered() -> dict[str, int]:
            """SOP Instance UID of the study -> its dead letters from this destination."""
            count = dict.fromkeys(study, 0)
            for msg in read_messages(cfg, DEADLETTER.name):
                headers = {k: v.decode() for k, v in msg.headers() or []}
                if headers.get("sink") == "route-maintenance":
                    for sop in study:
                        count[sop] += sop in headers["reason"]
            return count

        def completed() -> bool:
            return any(
                key == study_uid.encode() and record["status"] == "COMPLETED"
                for key, record in topic_records(cfg, STUDIES.name)
            )

        # Not a count of dead letters: whether the arrivals and the complete record (quiet time 4 s) come
        # in one batch or two is the worker's timing. What is sure: every instance dead-lettered, and the
        # complete record there and committed by the destination's worker, so it was planned while
        # the destination refused (nothing recorded then).
        wait_for("every instance dead-lettered", lambda: all(dead_lettered().values()), 180)
        wait_for("the study's complete record", completed, 120)
        wait_for(
            "the router past the study's records",
            lambda: group_lag(cfg, group, [INSTANCES.name, STUDIES.name]) == 0,
            120,
        )
        print(f"dead letters per refused instance: {sorted(dead_lettered().values())}")
    finally:
        stop(refusing)
    accepting = start_storescp("MAINTENANCE", MAINTENANCE_PORT, folder)
    try:
        first = pydicom.dcmread(next(iter(study.values())))
        late = make_instance(
            first.StudyInstanceUID, first.SeriesInstanceUID, 4, patient_id="ROUTE0001", study_date="20240601", rows=16
        )
        late.StationName = "MAINTSTATION"
        late_path = tmp_path / "late.dcm"
        late.save_as(late_path, enforce_file_format=True)
        assert storescu(cfg, [late_path]).returncode == 0
        everything = {*study, str(late.SOPInstanceUID)}
        wait_for("the refused instances and the late one", lambda: received_sops(folder) == everything, 180)
    finally:
        stop(accepting)
