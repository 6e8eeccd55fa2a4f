"""Query/Retrieve on the real pipeline with dcmtk's findscu, movescu (to a storescp) and getscu.

Studies are sent with storescu (and pydicom's test files with a pynetdicom sender, each object in
its own transfer syntax), the pipeline indexes and archives them, then the receiver's own AE title
and port answer C-FIND from the index and C-MOVE/C-GET from the archive.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.filereader import read_file_meta_info

from tests.support.dicomgen import GeneratedStudy, SeriesSpec, make_study
from tests.support.helpers import DCMTK_ENV, dataset_body, storescu, suboperation_counts, wait_until_caught_up
from tests.support.paths import port

STORESCP_PORT = port(11192)  # the "STORESCP" move destination of the test config
OFFLINE_PORT = port(11193)  # the "OFFLINE" destination: nothing listens there


@dataclass
class Corpus:
    a: GeneratedStudy  # QR-P1 "Doe^Jane", 2021-03-04, CT: 3 + 2 instances
    b: GeneratedStudy  # QR-P2 "Roe^Richard", 2021-06-10, MR: 2 instances, referred by "Smith^Anna"
    c: GeneratedStudy  # QR-P3, CT: 4 instances (for the partial failure)
    pydicom_studies: list[str]  # studies of pydicom's test files the receiver accepted
    pydicom_instances: int


def _rename(study: GeneratedStudy, name: str, referring_physician: str | None = None) -> None:
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.PatientName = name
        if referring_physician is not None:
            ds.ReferringPhysicianName = referring_physician
        ds.save_as(path, enforce_file_format=True)


def _send_pydicom_test_files(cfg) -> list[str]:
    """Each of pydicom's test files in its own transfer syntax, as a modality would; the SOP Instance
    UIDs the receiver accepted (0x0000)."""
    from pydicom.data import get_testdata_files
    from pynetdicom import AE, build_context

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = get_testdata_files("*.dcm")
    accepted = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            context = build_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        except Exception:
            continue  # no file meta: nothing a network sender could send as it is
        ae = AE(ae_title="PYSENDER")
        ae.requested_contexts = [context]
        assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
        if not assoc.is_established:
            continue
        try:
            status = assoc.send_c_store(Path(path))
            if status and status.Status == 0:
                accepted.append(str(meta.MediaStorageSOPInstanceUID))
        except Exception:
            pass  # pynetdicom refused to send it: not something the receiver accepted
        finally:
            assoc.release()
    return accepted


@pytest.fixture(scope="module")
def corpus(pipeline, tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("qr")
    a = make_study(
        root / "a",
        [SeriesSpec("CT", "AXIAL", 3), SeriesSpec("CT", "SCOUT", 2)],
        patient_id="QR-P1",
        study_date="20210304",
    )
    _rename(a, "Doe^Jane")
    b = make_study(root / "b", [SeriesSpec("MR", "T1 SAG", 2)], patient_id="QR-P2", study_date="20210610")
    _rename(b, "Roe^Richard", referring_physician="Smith^Anna")
    c = make_study(root / "c", [SeriesSpec("CT", "PARTIAL", 4)], patient_id="QR-P3", study_date="20220101")
    for study in (a, b, c):
        result = storescu(pipeline.cfg, study.files)
        assert result.returncode == 0, result.stdout + result.stderr
    accepted = _send_pydicom_test_files(pipeline.cfg)
    assert len(accepted) >= 40, f"the receiver accepted only {len(accepted)} of pydicom's test files"
    wait_until_caught_up(pipeline.cfg)
    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[pipeline.cfg.opensearch.url])
    client.indices.refresh(index="diana-instances")
    found = client.search(
        index="diana-instances",
        body={
            "size": 0,
            "query": {"terms": {"sop_instance_uid": accepted}},
            "aggs": {"studies": {"terms": {"field": "study_instance_uid", "size": 1000}}},
        },
    )
    studies = [bucket["key"] for bucket in found["aggregations"]["studies"]["buckets"]]
    return Corpus(a, b, c, studies, found["hits"]["total"]["value"])


def _dcmtk(tool: str, cfg, args: list[str], qr_port: int | None = None, cwd: Path | None = None):
    command = [tool, "-aec", cfg.receiver.ae_title, *args, "127.0.0.1", str(qr_port or cfg.receiver.port)]
    return subprocess.run(command, capture_output=True, text=True, env=DCMTK_ENV, cwd=cwd, timeout=300)


def findscu(cfg, tmp_path: Path, keys: dict[str, str], model: str = "-S", qr_port: int | None = None) -> list:
    """C-FIND with dcmtk; the response identifiers, read back from the files findscu extracts."""
    out = tmp_path / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = [model, "-X", "-od", str(out)] + [arg for k, v in keys.items() for arg in ("-k", f"{k}={v}" if v else k)]
    result = _dcmtk("findscu", cfg, ["-v", *args], qr_port)
    assert "Received Final Find Response (Success)" in result.stdout + result.stderr, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def find_status(cfg, keys: dict[str, str], model: str = "-S") -> str:
    """The final C-FIND status line findscu reports."""
    args = [model] + [arg for k, v in keys.items() for arg in ("-k", f"{k}={v}" if v else k)]
    result = _dcmtk("findscu", cfg, ["-v", *args])
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "Final Find Response" in line]
    assert lines, result.stdout + result.stderr
    return lines[-1]


def _values(responses: list, keyword: str) -> list:
    return sorted(str(getattr(ds, keyword, "")) for ds in responses)


# ------------------------------------------------------------------ C-FIND
def test_study_level_matching(pipeline, corpus, tmp_path):
    cfg, a, b = pipeline.cfg, corpus.a, corpus.b
    keys = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": "",
        "PatientName": "",
        "ModalitiesInStudy": "",
        "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": "",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",  # not in study a's objects: returned empty
    }
    (one,) = findscu(cfg, tmp_path, keys | {"PatientID": "QR-P1"})
    assert one.StudyInstanceUID == a.study_uid and str(one.PatientName) == "Doe^Jane"
    assert list(one.ModalitiesInStudy) == ["CT"] or one.ModalitiesInStudy == "CT"
    assert int(one.NumberOfStudyRelatedSeries) == 2 and int(one.NumberOfStudyRelatedInstances) == 5
    assert one.AccessionNumber == "ACCQR-P1" and "ReferringPhysicianName" in one and not one.ReferringPhysicianName
    both = sorted([a.study_uid, b.study_uid])
    # a list of values matches any of them (and keeps the queries below to this test's two patients:
    # other tests of the session index patients named Doe too)
    qr = {"PatientID": "QR-P1\\QR-P2"}
    # wildcards; person names case-insensitively
    assert _values(findscu(cfg, tmp_path, keys | qr | {"PatientName": "doe*"}), "StudyInstanceUID") == [a.study_uid]
    assert _values(findscu(cfg, tmp_path, keys | qr | {"PatientName": "R?e^Rich*"}), "StudyInstanceUID") == [
        b.study_uid
    ]
    assert _values(findscu(cfg, tmp_path, keys | qr), "StudyInstanceUID") == both
    # the referring physician's name is matched as the patient's (a key PS3.18 Table 10.6.1-5 requires)
    referred = findscu(cfg, tmp_path, keys | qr | {"ReferringPhysicianName": "SMITH^a*"})
    assert _values(referred, "StudyInstanceUID") == [b.study_uid]
    assert str(referred[0].ReferringPhysicianName) == "Smith^Anna"
    # date ranges: closed, open above, open below; a single date
    assert _values(findscu(cfg, tmp_path, keys | qr | {"StudyDate": "20210101-20210331"}), "StudyInstanceUID") == [
        a.study_uid
    ]
    assert _values(findscu(cfg, tmp_path, keys | qr | {"StudyDate": "20210601-"}), "StudyInstanceUID") == [b.study_uid]
    assert _values(findscu(cfg, tmp_path, keys | qr | {"StudyDate": "-20210304"}), "StudyInstanceUID") == [a.study_uid]
    assert _values(findscu(cfg, tmp_path, keys | qr | {"StudyDate": "20210610"}), "StudyInstanceUID") == [b.study_uid]
    # time range (both studies are at 10:15:00), and one that excludes them
    assert len(findscu(cfg, tmp_path, keys | qr | {"StudyTime": "1000-1030"})) == 2
    assert findscu(cfg, tmp_path, keys | qr | {"StudyTime": "1016-"}) == []
    # UID list
    listed = findscu(cfg, tmp_path, keys | {"StudyInstanceUID": f"{a.study_uid}\\{b.study_uid}"})
    assert _values(listed, "StudyInstanceUID") == both
    # ModalitiesInStudy matches any modality of the study
    assert _values(findscu(cfg, tmp_path, keys | qr | {"ModalitiesInStudy": "MR"}), "StudyInstanceUID") == [b.study_uid]
    # nothing matches
    assert findscu(cfg, tmp_path, keys | {"PatientID": "NOBODY"}) == []


def test_series_and_image_levels(pipeline, corpus, tmp_path):
    cfg, a = pipeline.cfg, corpus.a
    series_keys = {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": a.study_uid,
        "SeriesInstanceUID": "",
        "SeriesDescription": "",
        "Modality": "",
        "SeriesNumber": "",
        "NumberOfSeriesRelatedInstances": "",
    }
    series = findscu(cfg, tmp_path, series_keys)
    assert {s.SeriesInstanceUID for s in series} == set(a.series)
    counts = {s.SeriesDescription: int(s.NumberOfSeriesRelatedInstances) for s in series}
    assert counts == {"AXIAL": 3, "SCOUT": 2}
    (scout,) = findscu(cfg, tmp_path, series_keys | {"SeriesDescription": "SC*"})
    assert scout.SeriesDescription == "SCOUT" and int(scout.SeriesNumber) == 2
    assert len(findscu(cfg, tmp_path, series_keys | {"SeriesNumber": "1"})) == 1
    axial = next(s for s in series if s.SeriesDescription == "AXIAL")
    image_keys = {
        "QueryRetrieveLevel": "IMAGE",
        "StudyInstanceUID": a.study_uid,
        "SeriesInstanceUID": axial.SeriesInstanceUID,
        "SOPInstanceUID": "",
        "SOPClassUID": "",
        "InstanceNumber": "",
        "Rows": "",  # an optional key the index does not match: returned from the header
    }
    images = findscu(cfg, tmp_path, image_keys)
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]
    assert {i.SOPClassUID for i in images} == {"1.2.840.10008.5.1.4.1.1.2"} and {i.Rows for i in images} == {64}
    (second,) = findscu(cfg, tmp_path, image_keys | {"InstanceNumber": "2"})
    assert second.SOPInstanceUID in {i.SOPInstanceUID for i in images}


def test_patient_root(pipeline, corpus, tmp_path):
    cfg, a = pipeline.cfg, corpus.a
    (patient,) = findscu(
        cfg,
        tmp_path,
        {
            "QueryRetrieveLevel": "PATIENT",
            "PatientID": "QR-P1",
            "PatientName": "",
            "NumberOfPatientRelatedStudies": "",
            "NumberOfPatientRelatedSeries": "",
            "NumberOfPatientRelatedInstances": "",
        },
        model="-P",
    )
    assert str(patient.PatientName) == "Doe^Jane"
    assert (
        int(patient.NumberOfPatientRelatedStudies),
        int(patient.NumberOfPatientRelatedSeries),
        int(patient.NumberOfPatientRelatedInstances),
    ) == (1, 2, 5)
    studies = findscu(
        cfg, tmp_path, {"QueryRetrieveLevel": "STUDY", "PatientID": "QR-P1", "StudyInstanceUID": ""}, model="-P"
    )
    assert [s.StudyInstanceUID for s in studies] == [a.study_uid]


@pytest.mark.parametrize(
    "keys,model,expected",
    [
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2021013"}, "-S", "UnableToProcess"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20210231"}, "-S", "UnableToProcess"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20210301-20210201"}, "-S", "UnableToProcess"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, "-S", "UnableToProcess"),
        ({"QueryRetrieveLevel": "SERIES", "SeriesNumber": "one", "StudyInstanceUID": "1.2.3"}, "-S", "UnableToProcess"),
        ({"QueryRetrieveLevel": "SERIES", "Modality": "CT"}, "-S", "DataSetDoesNotMatchSOPClass"),
        ({"QueryRetrieveLevel": "STUDY", "SOPInstanceUID": "1.2.3"}, "-S", "DataSetDoesNotMatchSOPClass"),
        ({"QueryRetrieveLevel": "PATIENT", "PatientID": "X"}, "-S", "DataSetDoesNotMatchSOPClass"),
        ({"QueryRetrieveLevel": "WARD"}, "-S", "DataSetDoesNotMatchSOPClass"),
        ({"PatientID": "X"}, "-S", "DataSetDoesNotMatchSOPClass"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, "-P", "DataSetDoesNotMatchSOPClass"),
    ],
)
def test_malformed_identifiers_get_failure_statuses(pipeline, corpus, keys, model, expected):
    assert expected in find_status(pipeline.cfg, keys, model)


def test_service_keeps_answering_after_bad_queries(pipeline, corpus, tmp_path):
    for _ in range(3):
        assert "UnableToProcess" in find_status(pipeline.cfg, {"QueryRetrieveLevel": "STUDY", "StudyTime": "25"})
    assert len(findscu(pipeline.cfg, tmp_path, {"QueryRetrieveLevel": "STUDY", "PatientID": "QR-P2"})) == 1
    # The refusal's reason quotes the value asked for (a birth date here): the requester hears it, the log
    # names the attribute only.
    asked = {"QueryRetrieveLevel": "STUDY", "PatientBirthDate": "19800231"}
    assert "UnableToProcess" in find_status(pipeline.cfg, asked)
    log = pipeline.log_text("receiver")
    refusals = [line for line in log.splitlines() if "find.refused" in line]
    assert any("PatientBirthDate" in line for line in refusals), refusals[-3:]
    assert "19800231" not in log


def test_find_cancel(pipeline, corpus):
    """findscu sends C-CANCEL after the first response; the ~40 matches may all be on the wire by then
    (a race the requester can lose), so up to five tries: the cancel must be honoured at least once,
    and every answer is either Cancel or a complete Success."""
    finals = []
    for _ in range(5):
        result = _dcmtk("findscu", pipeline.cfg, ["-v", "-S", "--cancel", "1", "-k", "QueryRetrieveLevel=STUDY"])
        finals.append([line for line in result.stderr.splitlines() if "Final Find Response" in line][-1])
        if "Cancel" in finals[-1]:
            break
    assert "Cancel: MatchingTerminatedDueToCancelRequest" in finals[-1], finals
    assert all("Cancel" in f or "(Success)" in f for f in finals), finals


# ------------------------------------------------------------------ C-MOVE
@pytest.fixture
def storescp(tmp_path):
    """dcmtk's storescp as the STORESCP move destination, accepting every transfer syntax, writing bits as received."""
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xa", "+B", "-aet", "STORESCP", "-od", str(out), str(STORESCP_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    deadline = time.monotonic() + 15
    while subprocess.run(
        ["echoscu", "-aec", "STORESCP", "127.0.0.1", str(STORESCP_PORT)], capture_output=True, env=DCMTK_ENV
    ).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.2)
    yield out
    proc.terminate()
    proc.wait(10)


def movescu(cfg, keys: dict[str, str], destination: str = "STORESCP", extra: list[str] | None = None) -> str:
    args = ["-d", "-S", "-aem", destination, *(extra or [])] + [
        arg for k, v in keys.items() for arg in ("-k", f"{k}={v}")
    ]
    result = _dcmtk("movescu", cfg, args)
    return result.stdout + result.stderr


def _archived(cfg) -> dict[str, Path]:
    return {p.stem: p for p in cfg.path(cfg.storage.archive_dir).rglob("*.dcm")}


def test_move_every_object_comes_back_as_stored(pipeline, corpus, storescp):
    cfg = pipeline.cfg
    studies = [corpus.a.study_uid, corpus.b.study_uid, *corpus.pydicom_studies]
    output = movescu(cfg, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "\\".join(studies)})
    expected = 7 + corpus.pydicom_instances
    assert "0x0000: Success" in output, output[-2000:]
    assert suboperation_counts(output) == {"Remaining": 0, "Completed": expected, "Failed": 0, "Warning": 0}
    received = list(storescp.iterdir())
    assert len(received) == expected
    archived = _archived(cfg)
    for path in received:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = dataset_body(archived[uid])
        if len(stored) % 2:  # an odd deflate stream travels with one pad byte (PDVs are even), then inflates the same
            stored += b"\x00"
        assert dataset_body(path) == stored, f"{path.name} differs from the archived object"


def _odd_deflated_file(folder: Path) -> Path:
    """A CT object of new UIDs whose deflate stream has an odd length, as some senders store it
    (pydicom pads its own output to even, so the stream is deflated here)."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    from tests.support.dicomgen import make_instance

    ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="QR-ODD", study_date="20210304", rows=16)
    for pad in range(64):
        ds.StudyDescription = "ODD DEFLATE" + " X" * pad
        plain = DicomBytesIO()
        plain.is_implicit_VR, plain.is_little_endian = False, True  # what Deflated wraps
        write_dataset(plain, ds)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = compressor.compress(plain.getvalue()) + compressor.flush()
        if len(stream) % 2:
            break
    assert len(stream) % 2, "no odd deflate stream in 64 tries"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    path = folder / "odd-deflated.dcm"
    path.write_bytes(out.getvalue() + stream)
    return path


def test_move_of_an_odd_length_deflated_object_pads_it_for_the_wire(pipeline, storescp, tmp_path):
    """dcmtk aborts an association on an odd PDV (it did, in the middle of a study's move): the object
    is stored as received and sent with the standard's one trailing pad byte."""
    from pynetdicom import AE, _config, build_context

    cfg = pipeline.cfg
    path = _odd_deflated_file(tmp_path)
    meta = read_file_meta_info(path)
    ae = AE(ae_title="ODDSENDER")
    ae.requested_contexts = [build_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)]
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # the bytes as they are
    try:
        assoc = ae.associate("127.0.0.1", cfg.receiver.port, ae_title=cfg.receiver.ae_title)
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    wait_until_caught_up(cfg)
    archived = _archived(cfg)[str(meta.MediaStorageSOPInstanceUID)]
    stored = dataset_body(archived)
    assert stored == dataset_body(path) and len(stored) % 2 == 1  # archived as received
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    output = movescu(
        cfg,
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": ds.StudyInstanceUID,
            "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID,
        },
    )
    assert suboperation_counts(output) == {"Remaining": 0, "Completed": 1, "Failed": 0, "Warning": 0}, output[-2000:]
    (received,) = storescp.iterdir()
    assert dataset_body(received) == stored + b"\x00"
    assert pydicom.dcmread(received) == pydicom.dcmread(path)


def test_move_series_and_image_levels(pipeline, corpus, storescp):
    a = corpus.a
    series_uid = next(uid for uid, s in a.series.items() if s["description"] == "SCOUT")
    output = movescu(
        pipeline.cfg, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": a.study_uid, "SeriesInstanceUID": series_uid}
    )
    assert suboperation_counts(output)["Completed"] == 2
    one = pydicom.dcmread(a.files[0], stop_before_pixels=True)
    output = movescu(
        pipeline.cfg,
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": a.study_uid,
            "SeriesInstanceUID": one.SeriesInstanceUID,
            "SOPInstanceUID": one.SOPInstanceUID,
        },
    )
    assert suboperation_counts(output)["Completed"] == 1
    assert len(list(storescp.iterdir())) == 3
    for path in storescp.iterdir():
        original = next(f for f in a.files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID in path.name)
        assert pydicom.dcmread(path) == pydicom.dcmread(original)


def test_move_partial_failure_counts_and_lists_the_failed(pipeline, corpus, storescp, tmp_path):
    cfg, c = pipeline.cfg, corpus.c
    archived = sorted(cfg.path(cfg.storage.archive_dir).joinpath(c.study_uid).rglob("*.dcm"))
    assert len(archived) == 4
    moved_away = tmp_path / archived[0].name
    shutil.move(archived[0], moved_away)  # the archive lost one object
    try:
        output = movescu(cfg, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": c.study_uid})
    finally:
        shutil.move(moved_away, archived[0])
    assert "0xb000" in output.lower(), output[-2000:]
    assert suboperation_counts(output) == {"Remaining": 0, "Completed": 3, "Failed": 1, "Warning": 0}
    assert archived[0].stem in output  # Failed SOP Instance UID List
    assert len(list(storescp.iterdir())) == 3


def test_move_unknown_and_unreachable_destinations(pipeline, corpus, storescp):
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": corpus.a.study_uid}
    assert "0xa801" in movescu(pipeline.cfg, keys, destination="NOWHERE").lower()
    assert "0xa801" in movescu(pipeline.cfg, keys, destination="OFFLINE").lower()
    bad = movescu(pipeline.cfg, {"QueryRetrieveLevel": "STUDY"}, destination="STORESCP")
    assert "0xa900" in bad.lower()


def test_move_cancel(pipeline, corpus, storescp):
    studies = [corpus.a.study_uid, corpus.b.study_uid, *corpus.pydicom_studies]
    output = movescu(
        pipeline.cfg, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "\\".join(studies)}, extra=["--cancel", "2"]
    )
    assert "0xfe00" in output.lower(), output[-2000:]
    counts = suboperation_counts(output)
    assert counts["Remaining"] > 0 and counts["Completed"] + counts["Remaining"] == 7 + corpus.pydicom_instances


# ------------------------------------------------------------------ C-GET
def test_get_returns_identical_data_sets(pipeline, corpus, tmp_path):
    cfg = pipeline.cfg
    out = tmp_path / "got"
    out.mkdir()
    # getscu proposes one context per SOP class with the uncompressed syntaxes; the receiver's AE
    # picks its preferred one (explicit VR little endian, as for storage), so objects stored in the
    # other syntax come back converted: the same values, but private elements unknown to the
    # reader's dictionary lose their VR. So: every little endian object comes back; ours (standard
    # elements only) are data-set identical; objects that come back in their stored syntax are
    # byte for byte what the archive holds.
    little_endian = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    archived = _archived(cfg)
    studies = [corpus.a.study_uid, corpus.b.study_uid, *corpus.pydicom_studies]
    syntax = {
        uid: str(read_file_meta_info(path).TransferSyntaxUID)
        for uid, path in archived.items()
        if path.parent.parent.name in studies
    }
    wanted = {uid for uid, ts in syntax.items() if ts in little_endian}
    result = _dcmtk(
        "getscu",
        cfg,
        [
            "-d",
            "-S",
            "+B",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=" + "\\".join(studies),
        ],
    )
    output = result.stdout + result.stderr
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    assert wanted <= set(got), f"missing: {sorted(wanted - set(got))[:5]}"
    counts = suboperation_counts(output)
    assert counts["Completed"] == len(got) and counts["Remaining"] == 0
    received = {uid: str(read_file_meta_info(p).TransferSyntaxUID) for uid, p in got.items()}
    assert set(received.values()) <= little_endian
    as_stored = {uid for uid in wanted if received[uid] == syntax[uid]}
    assert as_stored, "no object came back in the syntax it is stored in"
    for uid in as_stored:
        assert dataset_body(got[uid]) == dataset_body(archived[uid]), f"{uid}: not the bytes stored"
    for path in [*corpus.a.files, *corpus.b.files]:
        original = pydicom.dcmread(path)
        assert pydicom.dcmread(got[original.SOPInstanceUID]) == original, f"{path.name}: the data set differs"


def test_get_decodes_compressed_objects_for_a_peer_that_takes_only_uncompressed(pipeline, corpus, tmp_path):
    """getscu proposes only the uncompressed syntaxes: JPEG, JPEG-LS, JPEG 2000 and RLE objects come back
    decoded (the same SOP Instance UID, pixels as pydicom decodes the archived file); what cannot be decoded
    here is a failed sub-operation, and the counts add up."""
    cfg = pipeline.cfg
    out = tmp_path / "decoded"
    out.mkdir()
    archived = {uid: p for uid, p in _archived(cfg).items() if p.parent.parent.name in corpus.pydicom_studies}
    compressed = {
        uid: read_file_meta_info(p).TransferSyntaxUID
        for uid, p in archived.items()
        if read_file_meta_info(p).TransferSyntaxUID.is_compressed
    }
    lossless = {"RLE Lossless", "JPEG-LS Lossless Image Compression", "JPEG 2000 Image Compression (Lossless Only)"}
    assert {ts.name for ts in compressed.values()} >= lossless | {"JPEG Baseline (Process 1)"}, "corpus lacks a syntax"
    result = _dcmtk(
        "getscu",
        cfg,
        [
            "-d",
            "-S",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=" + "\\".join(corpus.pydicom_studies),
        ],
    )
    output = result.stdout + result.stderr
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    counts = suboperation_counts(output)
    assert counts["Remaining"] == 0 and counts["Completed"] == len(got), output[-2000:]
    assert counts["Completed"] + counts["Failed"] + counts.get("Warning", 0) == len(archived)
    decoded = {uid for uid in compressed if uid in got}
    assert {compressed[uid].name for uid in decoded} >= lossless | {"JPEG Baseline (Process 1)"}
    assert len(decoded) >= len(compressed) - 5, f"only {len(decoded)} of {len(compressed)} compressed objects decoded"
    for uid in decoded:
        received = pydicom.dcmread(got[uid])
        assert received.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
        stored = pydicom.dcmread(archived[uid])
        difference = np.abs(received.pixel_array.astype(np.int64) - stored.pixel_array.astype(np.int64))
        if compressed[uid].name == "JPEG Baseline (Process 1)":
            # Lossy: JPEG decoders may round the colour conversion differently by a level or two.
            assert received.LossyImageCompression == "01" and difference.max() <= 4, f"{uid}: pixels differ"
        else:
            assert difference.max() == 0, f"{compressed[uid].name}: pixels differ"
    # The failed ones are the compressed objects not decoded; the service kept answering.
    assert counts["Failed"] == len(compressed) - len(decoded)
    assert "Success" in find_status(cfg, {"QueryRetrieveLevel": "STUDY"})


def test_serve_alone_answers_on_its_own_port(pipeline, corpus, tmp_path):
    proc = pipeline.start(
        "qr-serve", "serve", "--only", "dicom", settings={"DIANA_DICOMWEB_METRICS_PORT": str(port(19467))}
    )
    try:
        qr_port = pipeline.cfg.query_retrieve.port
        deadline = time.monotonic() + 30
        while True:
            echo = subprocess.run(
                ["echoscu", "-aec", pipeline.cfg.receiver.ae_title, "127.0.0.1", str(qr_port)],
                capture_output=True,
                env=DCMTK_ENV,
            )
            if echo.returncode == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, pipeline.log_text("qr-serve")[-2000:]
            time.sleep(0.5)
        (study,) = findscu(
            pipeline.cfg,
            tmp_path,
            {"QueryRetrieveLevel": "STUDY", "PatientID": "QR-P2", "StudyInstanceUID": ""},
            qr_port=qr_port,
        )
        assert study.StudyInstanceUID == corpus.b.study_uid
        # the Q/R-only AE stores nothing: a C-STORE to it fails
        stored = subprocess.run(
            ["storescu", "-aec", pipeline.cfg.receiver.ae_title, "127.0.0.1", str(qr_port), str(corpus.b.files[0])],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
        )
        assert stored.returncode != 0, stored.stdout + stored.stderr
        metrics = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{port(19467)}/metrics"], capture_output=True, text=True
        ).stdout
        assert 'diana_qr_requests_total{operation="find",status="0000"} 1.0' in metrics
    finally:
        pipeline.stop("qr-serve")


# ------------------------------------------------------------------ Orthanc as the client
def test_orthanc_queries_and_moves_through_its_rest_api(pipeline, corpus, tmp_path):
    from tests.support.orthanc import ORTHANC_AE, start_orthanc, stop_orthanc

    cfg, a = pipeline.cfg, corpus.a
    orthanc = start_orthanc(tmp_path, {"diana": [cfg.receiver.ae_title, "127.0.0.1", cfg.receiver.port]}, {})
    try:
        query = orthanc.post(
            "/modalities/diana/query",
            {"Level": "Study", "Query": {"PatientID": "QR-P1", "StudyInstanceUID": "", "ModalitiesInStudy": ""}},
        )
        answers = orthanc.get(f"/queries/{query['ID']}/answers")
        assert len(answers) == 1
        content = orthanc.get(f"/queries/{query['ID']}/answers/0/content?simplify")
        assert content["StudyInstanceUID"] == a.study_uid and content["ModalitiesInStudy"] == "CT"
        # Orthanc asks diana-star to C-MOVE the study to Orthanc itself (ORTHANC is a configured destination)
        orthanc.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": ORTHANC_AE, "Synchronous": True})
        (study_id,) = [r["ID"] for r in orthanc.post("/tools/lookup", a.study_uid)]
        instances = orthanc.get(f"/studies/{study_id}/instances")
        assert len(instances) == 5
        originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in a.files}
        for instance in instances:
            raw = requests.get(f"{orthanc.url}/instances/{instance['ID']}/file", timeout=60).content
            got = pydicom.dcmread(BytesIO(raw))
            assert got == originals[got.SOPInstanceUID]
    finally:
        stop_orthanc(orthanc)


def test_move_over_tls_with_the_receivers_tls_settings(pipeline, corpus, tmp_path):
    """`diana serve` with the receiver's TLS settings: movescu over TLS (client certificate required),
    and the move to a ":tls" destination (a dcmtk storescp over TLS) verified against tls_ca_file."""
    from tests.support.pki import make_certificates

    pki = tmp_path / "pki"
    pki.mkdir()
    c = make_certificates(pki)
    tls_client = ["+tls", str(c["client.key"]), str(c["client.pem"]), "+cf", str(c["ca.pem"])]
    secure_port, qr_port = port(11196), port(11197)
    out = tmp_path / "secure"
    out.mkdir()
    destination = subprocess.Popen(
        ["storescp", "+tls", str(c["server.key"]), str(c["server.pem"]), "+cf", str(c["ca.pem"]), "-aet", "SECURE",
         "-od", str(out), str(secure_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV,
    )  # fmt: skip
    proc = pipeline.start(
        "qr-tls",
        "serve",
        "--only",
        "dicom",
        settings={
            "DIANA_RECEIVER_TLS_CERT_FILE": str(c["server.pem"]),
            "DIANA_RECEIVER_TLS_KEY_FILE": str(c["server.key"]),
            "DIANA_RECEIVER_TLS_CA_FILE": str(c["ca.pem"]),
            "DIANA_QUERY_RETRIEVE_PORT": str(qr_port),
            "DIANA_QUERY_RETRIEVE_DESTINATIONS": f"SECURE=127.0.0.1:{secure_port}:tls",
            "DIANA_DICOMWEB_METRICS_PORT": "0",
        },
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            echo = subprocess.run(
                ["echoscu", *tls_client, "-aec", pipeline.cfg.receiver.ae_title, "127.0.0.1", str(qr_port)],
                capture_output=True,
                env=DCMTK_ENV,
            )
            if echo.returncode == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, pipeline.log_text("qr-tls")[-2000:]
            time.sleep(0.5)
        # dcmtk's movescu has no TLS: pynetdicom is the C-MOVE SCU here, with a client certificate
        import ssl

        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(c["ca.pem"]))
        context.load_cert_chain(str(c["client.pem"]), str(c["client.key"]))
        scu = AE(ae_title="TLSMOVESCU")
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = scu.associate(
            "127.0.0.1", qr_port, ae_title=pipeline.cfg.receiver.ae_title, tls_args=(context, "127.0.0.1")
        )
        assert assoc.is_established
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = corpus.b.study_uid
        responses = list(assoc.send_c_move(identifier, "SECURE", StudyRootQueryRetrieveInformationModelMove))
        assoc.release()
        final = responses[-1][0]
        assert final.Status == 0x0000, final
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 0)
        assert len(list(out.iterdir())) == 2
        plain = _dcmtk("echoscu", pipeline.cfg, [], qr_port)
        assert plain.returncode != 0  # no TLS: no association
    finally:
        pipeline.stop("qr-tls")
        destination.terminate()
        destination.wait(10)


def test_index_outage_is_out_of_resources_and_the_allow_list_holds(pipeline, corpus):
    """Q/R alone with an OpenSearch that does not answer: 0xA700 (retry later), the service goes on;
    the receiver's allow-list applies to it too."""
    qr_port = port(11198)
    proc = pipeline.start(
        "qr-outage",
        "serve",
        "--only",
        "dicom",
        settings={
            "DIANA_OPENSEARCH_URL": f"http://127.0.0.1:{port(11199)}",  # nothing listens there
            "DIANA_QUERY_RETRIEVE_PORT": str(qr_port),
            "DIANA_RECEIVER_ALLOWED_CALLING_AES": "FINDSCU,GETSCU",
            "DIANA_DICOMWEB_METRICS_PORT": "0",
        },
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            echo = subprocess.run(
                ["echoscu", "-aet", "FINDSCU", "-aec", pipeline.cfg.receiver.ae_title, "127.0.0.1", str(qr_port)],
                capture_output=True,
                env=DCMTK_ENV,
            )
            if echo.returncode == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, pipeline.log_text("qr-outage")[-2000:]
            time.sleep(0.5)
        for _ in range(2):
            result = _dcmtk("findscu", pipeline.cfg, ["-v", "-S", "-k", "QueryRetrieveLevel=STUDY"], qr_port)
            assert "Final Find Response (Refused: OutOfResources)" in result.stderr, result.stderr[-1500:]
        got = _dcmtk(
            "getscu",
            pipeline.cfg,
            ["-d", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3"],
            qr_port,
        )
        assert "0xa700" in (got.stdout + got.stderr).lower()
        refused = subprocess.run(
            ["echoscu", "-aet", "STRANGER", "-aec", pipeline.cfg.receiver.ae_title, "127.0.0.1", str(qr_port)],
            capture_output=True,
            env=DCMTK_ENV,
        )
        assert refused.returncode != 0  # not in allowed_calling_aes
        assert proc.poll() is None
    finally:
        pipeline.stop("qr-outage")


# ------------------------------------------------------------------ WADO-RS of the same corpus

WEB_PORT = port(18046)
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def wado(pipeline, corpus) -> str:
    """``diana serve --only web`` on the loopback (no authentication there), the same archive and index."""
    yield pipeline.start_web(
        "qr-web", WEB_PORT, "--only", "web", settings={"DIANA_DICOMWEB_METRICS_PORT": str(port(19471))}
    )
    pipeline.stop("qr-web")


def _parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response."""
    assert response.status_code == 200, response.text[:500]
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    out = []
    for chunk in response.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        content_type = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type")
        )
        assert body.endswith(b"\r\n")
        out.append((content_type, body[:-2]))
    return out


def test_wado_rs_sends_every_object_as_stored_when_asked(wado, pipeline, corpus):
    """transfer-syntax=*: every object the receiver accepted from pydicom's test files comes back byte for byte."""
    archived = {uid: p for uid, p in _archived(pipeline.cfg).items() if p.parent.parent.name in corpus.pydicom_studies}
    got = {}
    for study in corpus.pydicom_studies:
        for _, body in _parts(requests.get(f"{wado}/studies/{study}", headers={"Accept": AS_STORED}, timeout=120)):
            got[pydicom.dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID] = body
    assert set(got) == set(archived)
    for uid, body in got.items():
        assert body == archived[uid].read_bytes(), f"{uid}: not the bytes stored"


def test_wado_rs_default_is_explicit_little_endian_with_compressed_objects_decoded(wado, pipeline, corpus):
    """No transfer-syntax (dicomweb-client's default): Explicit VR Little Endian, PS3.18 since 2016c."""
    archived = {uid: p for uid, p in _archived(pipeline.cfg).items() if p.parent.parent.name in corpus.pydicom_studies}
    syntax = {uid: read_file_meta_info(p).TransferSyntaxUID for uid, p in archived.items()}
    got, bodies = {}, {}
    for study in corpus.pydicom_studies:
        response = requests.get(
            f"{wado}/studies/{study}", headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=120
        )
        assert "transfer-syntax=1.2.840.10008.1.2.1" in response.headers["content-type"]
        for content_type, body in _parts(response):
            assert content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1" or ";" not in content_type
            ds = pydicom.dcmread(BytesIO(body))
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", ds.SOPInstanceUID
            got[ds.SOPInstanceUID] = ds
            bodies[ds.SOPInstanceUID] = body
    compressed = {uid for uid, ts in syntax.items() if ts.is_compressed}
    assert set(archived) - compressed <= set(got), "an uncompressed object is missing"
    assert len(compressed & set(got)) >= len(compressed) - 5, "too few compressed objects decoded"
    for uid, ds in got.items():
        if syntax[uid] == "1.2.840.10008.1.2.1":
            assert bodies[uid] == archived[uid].read_bytes(), f"{uid}: not as stored"
        elif syntax[uid].name in ("RLE Lossless", "JPEG-LS Lossless Image Compression"):
            assert (ds.pixel_array == pydicom.dcmread(archived[uid]).pixel_array).all(), syntax[uid].name


def test_wado_rs_frames_are_native_by_default_and_as_stored_when_asked(wado, pipeline, corpus):
    archived = _archived(pipeline.cfg)
    uid, path = next(
        (uid, p)
        for uid, p in archived.items()
        if p.parent.parent.name in corpus.pydicom_studies
        and read_file_meta_info(p).TransferSyntaxUID == "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    )
    stored = pydicom.dcmread(path)
    url = f"{wado}/studies/{stored.StudyInstanceUID}/series/{stored.SeriesInstanceUID}/instances/{uid}/frames/1"
    ((content_type, native),) = _parts(requests.get(url, timeout=60))
    assert content_type == "application/octet-stream"
    assert native == stored.pixel_array.astype(stored.pixel_array.dtype.newbyteorder("<")).tobytes()
    ((content_type, jls),) = _parts(
        requests.get(url, headers={"Accept": 'multipart/related; type="image/jls"'}, timeout=60)
    )
    assert content_type == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    from pydicom.encaps import generate_frames

    assert jls == next(generate_frames(stored.PixelData, number_of_frames=1))
    refused = requests.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'}, timeout=60)
    assert refused.status_code == 406 and "image/jls" in refused.text
