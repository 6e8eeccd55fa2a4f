"""DICOMweb on the real pipeline with the dicomweb-client package: QIDO-RS, WADO-RS (instances,
series, metadata, frames), bearer authentication, HTTPS with basic authentication and CORS, and the
refusal to expose data without authentication."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from io import BytesIO

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from diana.schemas.topics import INSTANCES
from tests.support.dicomgen import SeriesSpec, make_study
from tests.support.helpers import storescu, topic_records, wait_until_caught_up
from tests.support.paths import REPO, TEST_HOME, port
from tests.support.pki import make_certificates

WEB_PORT = port(18042)
TOKEN = "diana-test-token-0123456789"
STOW_LIMIT = 1_000_000  # bytes of a STOW-RS body; the test studies' objects are about 10 KB


@pytest.fixture(scope="module")
def web(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    study = make_study(
        root / "a",
        [SeriesSpec("CT", "WEB AXIAL", 3), SeriesSpec("CT", "WEB SCOUT", 1)],
        patient_id="WEB-P1",
        study_date="20230405",
    )
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.PatientName = "Müller^Jürgen"  # non-ASCII, as names are
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.save_as(path, enforce_file_format=True)
    result = storescu(pipeline.cfg, study.files)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until_caught_up(pipeline.cfg)
    token_file = TEST_HOME / "dicomweb-token"
    token_file.write_text(TOKEN)
    url = pipeline.start_web(
        "dicomweb",
        WEB_PORT,
        "--only",
        "web",
        settings={
            "DIANA_DICOMWEB_BEARER_TOKEN_FILE": str(token_file),
            "DIANA_DICOMWEB_METRICS_PORT": str(port(19468)),
            "DIANA_DICOMWEB_MAX_STOW_BYTES": str(STOW_LIMIT),
        },
    )
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield DICOMwebClient(url, session=session), study, url
    pipeline.stop("dicomweb")


def test_qido_studies_series_instances(web):
    client, study, _ = web
    (found,) = client.search_for_studies(search_filters={"PatientID": "WEB-P1"})
    ds = pydicom.Dataset.from_json(found)
    assert ds.StudyInstanceUID == study.study_uid and str(ds.PatientName) == "Müller^Jürgen"
    assert int(ds.NumberOfStudyRelatedInstances) == 4 and int(ds.NumberOfStudyRelatedSeries) == 2
    assert ds.RetrieveURL.endswith(f"/studies/{study.study_uid}")
    # fuzzy matching of names, date range, includefield
    fuzzy = client.search_for_studies(
        search_filters={"PatientName": "müller", "StudyDate": "20230101-20231231"},
        fuzzymatching=True,
        fields=["StationName"],
    )
    assert [pydicom.Dataset.from_json(f).StudyInstanceUID for f in fuzzy] == [study.study_uid]
    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study.study_uid)]
    assert sorted(s.SeriesDescription for s in series) == ["WEB AXIAL", "WEB SCOUT"]
    # across studies (relational), with limit and offset
    all_ct = client.search_for_series(search_filters={"Modality": "CT", "SeriesDescription": "WEB*"})
    assert len(all_ct) == 2
    assert len(client.search_for_series(search_filters={"SeriesDescription": "WEB*"}, limit=1, offset=1)) == 1
    # includefield=all: the attributes of the query's level and above, from the stored header. StationName
    # (General Equipment) is a series' attribute, not a study's, and no default one.
    (everything,) = client.search_for_studies(search_filters={"PatientID": "WEB-P1"}, fields=["all"])
    assert "StationName" not in pydicom.Dataset.from_json(everything)
    axial = next(s for s in series if s.SeriesDescription == "WEB AXIAL")
    (axial_all,) = client.search_for_series(
        study.study_uid, search_filters={"SeriesInstanceUID": axial.SeriesInstanceUID}, fields=["all"]
    )
    whole = pydicom.Dataset.from_json(axial_all)
    assert whole.StationName == "CTSTATION1" and whole.RetrieveURL.endswith(f"/series/{axial.SeriesInstanceUID}")
    instances = client.search_for_instances(study.study_uid, axial.SeriesInstanceUID)
    assert len(instances) == 3
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_wado_instances_series_and_metadata_are_the_stored_objects(web):
    client, study, base = web
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in study.files}
    retrieved = client.retrieve_study(study.study_uid)
    assert {ds.SOPInstanceUID for ds in retrieved} == set(originals)
    for ds in retrieved:
        assert ds == originals[ds.SOPInstanceUID]
    one = originals[next(iter(originals))]
    single = client.retrieve_instance(study.study_uid, one.SeriesInstanceUID, one.SOPInstanceUID)
    assert single == one
    meta = client.retrieve_series_metadata(study.study_uid, one.SeriesInstanceUID)
    assert {m["00080018"]["Value"][0] for m in meta} == {
        uid for uid, ds in originals.items() if ds.SeriesInstanceUID == one.SeriesInstanceUID
    }
    pixel_uri = meta[0]["7FE00010"]["BulkDataURI"]
    assert pixel_uri.startswith(base + "/studies/"), pixel_uri
    (frame,) = client.retrieve_instance_frames(
        study.study_uid, one.SeriesInstanceUID, one.SOPInstanceUID, frame_numbers=[1]
    )
    assert frame == one.PixelData


def test_refusals_have_reasons_and_the_service_goes_on(web):
    client, study, base = web
    assert requests.get(base + "/studies").status_code == 401
    assert requests.get(base + "/studies", headers={"Authorization": "Bearer wrong-token-xxxx"}).status_code == 401
    bad = client._session.get(base + "/studies", params={"StudyDate": "2023-04-05"})
    assert bad.status_code == 400 and "StudyDate" in bad.text
    unknown = client._session.get(base + "/studies", params={"PatientNmae": "x"})
    assert unknown.status_code == 400 and "PatientNmae" in unknown.text
    assert client._session.get(base + "/studies", params={"limit": "ten"}).status_code == 400
    assert client._session.get(base + "/studies/1." + "2" * 63).status_code == 400  # 65 characters: no UID
    assert client._session.get(base + "/studies/1.2.3.4.5").status_code == 404
    # Inputs that once reached the server's own errors (500) are 400s naming what is wrong.
    for path, params, named in [
        ("/studies", {"limit": "²"}, "limit"),
        ("/studies", {"offset": "100000000000"}, "offset"),
        ("/series", {"SeriesNumber": "+-5"}, "SeriesNumber"),
        ("/studies", {"ReferencedSeriesSequence": "x"}, "ReferencedSeriesSequence"),
        ("/instances", {"00189087": "x"}, "00189087"),
        ("/studies", {"includefield": "7FE00010"}, "7FE00010"),
    ]:
        refused = client._session.get(base + path, params=params)
        assert refused.status_code == 400 and refused.text.startswith(named), (params, refused.text)
    # A list OpenSearch refuses (more wildcard clauses than it allows): the query's fault, not a 503.
    many = "\\".join(f"a{n}*" for n in range(1100))
    refused = client._session.get(base + "/studies", params={"PatientName": many})
    assert refused.status_code == 400 and "the index refuses this query" in refused.text, refused.text[:300]
    one = pydicom.dcmread(study.files[0])
    frames = f"{base}/studies/{study.study_uid}/series/{one.SeriesInstanceUID}/instances/{one.SOPInstanceUID}/frames"
    for asked, why in [("1,1", "more than once"), ("0", "start at 1"), ("1,x", "comma-separated")]:
        refused = client._session.get(f"{frames}/{asked}")
        assert refused.status_code == 400 and why in refused.text, (asked, refused.text)
    assert len(client.search_for_studies(search_filters={"PatientID": "WEB-P1"})) == 1
    metrics = requests.get(f"http://127.0.0.1:{port(19468)}/metrics").text
    assert 'diana_dicomweb_requests_total{service="qido",status="400"}' in metrics


def test_stow_stores_through_the_receivers_path(web, pipeline, tmp_path):
    client, _, base = web
    study = make_study(tmp_path / "stow", [SeriesSpec("MR", "STOWED", 3)], patient_id="WEB-STOW")
    datasets = [pydicom.dcmread(p) for p in study.files]
    answer = client.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in answer
    # Their events say where they came from (InstanceArrived v4) and where they landed.
    events = [e for _, e in topic_records(pipeline.cfg, INSTANCES.name) if e["study_instance_uid"] == study.study_uid]
    assert len(events) == 3 and {(e["source"], e["called_ae"], e["calling_ae"]) for e in events} == {
        ("STOW_RS", "DICOMWEB", None)
    }
    assert all(e["landing_uri"].startswith("file:///") for e in events)
    # a part that is no DICOM object, beside a good one: 202 with the reason per instance
    boundary = "stowtestboundary"
    good = study.files[0].read_bytes()
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
            for part in (good, b"not a dicom object at all" * 10)
        )
        + f"--{boundary}--\r\n".encode()
    )
    mixed = client._session.post(
        base + "/studies",
        data=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert mixed.status_code == 202, mixed.text
    reply = pydicom.Dataset.from_json(mixed.json())
    assert [item.FailureReason for item in reply.FailedSOPSequence] == [0xC210]
    wrong_study = client._session.post(
        base + "/studies/1.2.3.4",
        data=body.replace(b"not a dicom", b"NOT A DICOM"),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert wrong_study.status_code == 409
    assert sorted(i.FailureReason for i in pydicom.Dataset.from_json(wrong_study.json()).FailedSOPSequence) == [
        0xA900,
        0xC210,
    ]
    wrong_type = client._session.post(base + "/studies", data=b"x", headers={"Content-Type": "application/json"})
    assert wrong_type.status_code == 415
    # A body over [dicomweb] max_stow_bytes: refused by its declared length, or as it arrives (chunked);
    # a body refused whole (here its second part is no DICOM part) keeps none of its parts either.
    multipart = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    large = body + b"x" * STOW_LIMIT
    assert client._session.post(base + "/studies", data=large, headers=multipart).status_code == 413
    streamed = client._session.post(
        base + "/studies", data=(large[i : i + 65536] for i in range(0, len(large), 65536)), headers=multipart
    )
    assert streamed.status_code == 413 and "max_stow_bytes" in streamed.text, streamed.text
    not_dicom = body.replace(b"Content-Type: application/dicom\r\n\r\nnot a", b"Content-Type: text/plain\r\n\r\nnot a")
    assert client._session.post(base + "/studies", data=not_dicom, headers=multipart).status_code == 400
    incoming = pipeline.cfg.path(pipeline.cfg.storage.landing_dir) / ".incoming"
    assert not [p.name for p in incoming.iterdir() if p.name.startswith("stow-")]
    assert (
        client._session.post(
            base + "/studies", data=b"no parts", headers={"Content-Type": f"multipart/related; boundary={boundary}"}
        ).status_code
        == 400
    )
    # durable and published: the pipeline archives and indexes them
    wait_until_caught_up(pipeline.cfg)
    archive = pipeline.cfg.path(pipeline.cfg.storage.archive_dir) / study.study_uid
    assert len(list(archive.rglob("*.dcm"))) == 3
    assert len(client.search_for_instances(study.study_uid)) == 3
    retrieved = {ds.SOPInstanceUID: ds for ds in client.retrieve_study(study.study_uid)}
    for ds in datasets:
        assert retrieved[ds.SOPInstanceUID] == ds


def test_https_with_basic_authentication_and_cors_for_a_browser_viewer(web, pipeline, tmp_path):
    """A second DICOMweb service as a site would expose it to a browser viewer: HTTPS with a private CA,
    HTTP basic credentials from a file, one allowed origin."""
    _, study, _ = web
    certs = make_certificates(tmp_path)
    password_file = tmp_path / "dicomweb-password"
    password_file.write_text("viewer-password-0123")
    origin = "https://viewer.example.org"
    tls_port = port(18045)
    proc = pipeline.start(
        "dicomweb-tls",
        "serve",
        "--only",
        "web",
        settings={
            "DIANA_DICOMWEB_PORT": str(tls_port),
            "DIANA_DICOMWEB_TLS_CERT_FILE": str(certs["server.pem"]),
            "DIANA_DICOMWEB_TLS_KEY_FILE": str(certs["server.key"]),
            "DIANA_DICOMWEB_BASIC_USER": "viewer",
            "DIANA_DICOMWEB_BASIC_PASSWORD_FILE": str(password_file),
            "DIANA_DICOMWEB_CORS_ORIGINS": origin,
            "DIANA_DICOMWEB_METRICS_PORT": "0",
        },
    )
    url = f"https://127.0.0.1:{tls_port}"
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides session.verify (requests issue 3829)
    session.verify = str(certs["ca.pem"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                session.get(url + "/studies", timeout=5)
                break
            except requests.ConnectionError as exc:
                alive = proc.poll() is None and time.monotonic() < deadline
                assert alive, f"{exc!r}\n{pipeline.log_text('dicomweb-tls')[-2000:]}"
                time.sleep(0.3)
        assert session.get(url + "/studies", timeout=10).status_code == 401
        assert session.get(url + "/studies", auth=("viewer", "wrong-password-0123"), timeout=10).status_code == 401
        session.auth = ("viewer", "viewer-password-0123")
        client = DICOMwebClient(url, session=session)
        (found,) = client.search_for_studies(search_filters={"PatientID": "WEB-P1"})
        assert pydicom.Dataset.from_json(found).StudyInstanceUID == study.study_uid
        assert {ds.SOPInstanceUID for ds in client.retrieve_study(study.study_uid)} == {
            pydicom.dcmread(p).SOPInstanceUID for p in study.files
        }
        # A server certificate the client cannot verify is refused by the client, not ignored.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url + "/studies", auth=("viewer", "viewer-password-0123"), timeout=10)
        # Plain HTTP on the HTTPS port gets no data.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{tls_port}/studies", timeout=10).raise_for_status()
        # A browser's preflight carries no credentials and is answered for the allowed origin only.
        preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
        allowed = requests.options(
            url + "/studies", headers={"Origin": origin, **preflight}, verify=str(certs["ca.pem"]), timeout=10
        )
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        other = requests.options(
            url + "/studies",
            headers={"Origin": "https://evil.example.com", **preflight},
            verify=session.verify,
            timeout=10,
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        answer = session.get(url + "/studies", params={"PatientID": "WEB-P1"}, headers={"Origin": origin}, timeout=10)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert proc.poll() is None
    finally:
        pipeline.stop("dicomweb-tls")


def _serve_web_off_loopback(pipeline, **settings: str) -> subprocess.CompletedProcess:
    """`diana serve --only web` bound to every address, with ``settings`` (DIANA_* variables) added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env.update(
        DIANA_CONFIG=str(pipeline.config_file),
        DIANA_DICOMWEB_HOST="0.0.0.0",
        DIANA_DICOMWEB_PORT=str(WEB_PORT + 1),
        DIANA_DICOMWEB_METRICS_PORT="0",
        **settings,
    )
    return subprocess.run(
        [sys.executable, "-m", "diana.cli", "serve", "--only", "web"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_refuses_to_start_exposed_without_authentication(pipeline):
    result = _serve_web_off_loopback(pipeline)
    assert result.returncode == 2 and "no authentication is configured" in result.stderr


def test_refuses_to_start_exposed_over_plain_http(pipeline, tmp_path):
    """Off loopback with a token but no HTTPS: the token and every answer would travel in clear."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    result = _serve_web_off_loopback(pipeline, DIANA_DICOMWEB_BEARER_TOKEN_FILE=str(token_file))
    assert result.returncode == 2 and "HTTPS is not configured" in result.stderr
    assert "allow_plain_http" in result.stderr and TOKEN not in result.stderr


def test_orthanc_dicomweb_plugin_as_client(web, pipeline, tmp_path):
    """Orthanc's DICOMweb plugin configured with diana-star as a server: QIDO, WADO retrieve, STOW."""
    from tests.support.orthanc import start_orthanc, stop_orthanc

    client, study, base = web
    server = {"Url": base + "/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}
    orthanc = start_orthanc(tmp_path, {}, {"diana": server})
    try:
        found = orthanc.post("/dicom-web/servers/diana/qido", {"Uri": "/studies", "Arguments": {"PatientID": "WEB-P1"}})
        # the plugin hands the answers on in its own form (Orthanc's JSON: tag -> Name, Value...)
        assert [f["0020000D"]["Value"] for f in found] == [study.study_uid], found
        orthanc.post("/dicom-web/servers/diana/retrieve", {"Resources": [{"Study": study.study_uid}]})
        (study_id,) = [r["ID"] for r in orthanc.post("/tools/lookup", study.study_uid)]
        originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in study.files}
        instances = orthanc.get(f"/studies/{study_id}/instances")
        assert len(instances) == len(originals)
        for instance in instances:
            raw = requests.get(f"{orthanc.url}/instances/{instance['ID']}/file", timeout=60).content
            got = pydicom.dcmread(BytesIO(raw))
            assert got == originals[got.SOPInstanceUID]
        # STOW from Orthanc's side
        new = make_study(tmp_path / "from-orthanc", [SeriesSpec("CT", "FROM ORTHANC", 2)], patient_id="WEB-ORTHANC")
        uploaded = [
            requests.post(orthanc.url + "/instances", data=p.read_bytes(), timeout=60).json()["ID"] for p in new.files
        ]
        orthanc.post("/dicom-web/servers/diana/stow", {"Resources": uploaded, "Synchronous": True})
        wait_until_caught_up(pipeline.cfg)
        assert len(client.search_for_instances(new.study_uid)) == 2
    finally:
        stop_orthanc(orthanc)


def test_status_shows_the_services(web, pipeline):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env.update(DIANA_CONFIG=str(pipeline.config_file), DIANA_DICOMWEB_PORT=str(WEB_PORT))
    result = subprocess.run(
        [sys.executable, "-m", "diana.cli", "status"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = {
        line.split("  ")[1].strip(): line
        for line in result.stdout.splitlines()
        if "(diana serve)" in line or "receiver (" in line
    }
    assert lines["DICOMweb (diana serve)"].endswith(" listening"), result.stdout
    assert lines["receiver (C-STORE, C-FIND/C-MOVE/C-GET)"].endswith(" listening"), result.stdout
    assert lines["query/retrieve alone (diana serve)"].endswith("not listening"), result.stdout


def test_a_retrieve_over_max_retrieve_is_refused_whole_and_metadata_read_as_it_is_sent(web, pipeline):
    """With [query_retrieve] max_retrieve = 3: the study (4 instances) is refused with the reason, its
    3-instance series is served; per-instance metadata is counted first (404 for nothing), then
    streamed, and is the same as the other server's."""
    client, study, base = web
    url = pipeline.start_web(
        "dicomweb-small",
        port(18043),
        "--only",
        "web",
        settings={
            "DIANA_DICOMWEB_BEARER_TOKEN_FILE": str(TEST_HOME / "dicomweb-token"),
            "DIANA_DICOMWEB_METRICS_PORT": str(port(19469)),
            "DIANA_QUERY_RETRIEVE_MAX_RETRIEVE": "3",
        },
    )
    try:
        session = client._session
        refused = session.get(f"{url}/studies/{study.study_uid}")
        assert refused.status_code == 400 and "max_retrieve" in refused.text, refused.text
        by_series: dict[str, list] = {}
        for path in study.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            by_series.setdefault(ds.SeriesInstanceUID, []).append(ds.SOPInstanceUID)
        axial = next(uid for uid, sops in by_series.items() if len(sops) == 3)
        served = session.get(f"{url}/studies/{study.study_uid}/series/{axial}")
        assert served.status_code == 200 and served.headers["content-type"].startswith("multipart/related")
        instance = f"/studies/{study.study_uid}/series/{axial}/instances/{by_series[axial][0]}/metadata"
        small, whole = session.get(url + instance), session.get(base + instance)
        assert small.status_code == 200 and small.headers["content-type"] == "application/dicom+json"
        ((mine,), (theirs,)) = small.json(), whole.json()
        # The same data set; its bulk data URIs point to the server answering.
        assert mine.pop("7FE00010")["BulkDataURI"].startswith(url + "/studies/")
        assert theirs.pop("7FE00010")["BulkDataURI"].startswith(base + "/studies/")
        assert mine == theirs
        assert small.json()[0]["00080018"]["Value"] == [by_series[axial][0]]
        missing = session.get(f"{url}/studies/{study.study_uid}/series/{axial}/instances/1.2.3.4/metadata")
        assert missing.status_code == 404, missing.text
    finally:
        pipeline.stop("dicomweb-small")


def test_frames_of_an_archived_object_damaged_on_disk_are_a_500_with_the_reason(web, pipeline, tmp_path):
    client, _, base = web
    study = make_study(tmp_path / "damaged", [SeriesSpec("CT", "WEB DAMAGED", 1)], patient_id="WEB-DAMAGED")
    assert storescu(pipeline.cfg, study.files).returncode == 0
    wait_until_caught_up(pipeline.cfg)
    ds = pydicom.dcmread(study.files[0])
    archived = (
        pipeline.cfg.path(pipeline.cfg.storage.archive_dir)
        / ds.StudyInstanceUID
        / ds.SeriesInstanceUID
        / f"{ds.SOPInstanceUID}.dcm"
    )
    whole = archived.read_bytes()
    archived.write_bytes(whole[: len(whole) - 100])  # the disk lost the end of the pixel data
    frames = (
        f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"
    )
    for accept in ("multipart/related; type=application/octet-stream", None):
        damaged = client._session.get(frames, headers={"Accept": accept} if accept else {})
        assert damaged.status_code == 500, (damaged.status_code, damaged.text[:200])
        assert damaged.text.startswith("the archived object cannot be read: its pixel data holds"), damaged.text
    assert "wado.corrupt_object" in pipeline.log_text("dicomweb")
    assert len(client.search_for_studies(search_filters={"PatientID": "WEB-DAMAGED"})) == 1  # the service goes on
