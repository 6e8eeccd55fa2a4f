"""`diana collect` against a real PACS (Orthanc from Debian, loaded through its REST API): C-FIND,
C-MOVE to diana-star's own receiver, the report, kill -9 and resume, the throttle counted by the PACS."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from diana.clients import opensearch_client
from diana.producers.pacs_pull.ledger import load_events
from diana.schemas.layout import IndexLayout
from diana.schemas.topics import INSTANCES
from tests.support.dcmqrscp import DCMQRSCP_AE, DCMQRSCP_PORT, start_dcmqrscp, stop_dcmqrscp
from tests.support.helpers import storescu, topic_records
from tests.support.orthanc import DICOM_PORT, ORTHANC_AE, start_orthanc, stop_orthanc
from tests.support.pacscorpus import PacsStudy, load_into_orthanc, make_pacs_study, max_concurrent_associations
from tests.support.paths import port

COLLECT_AE = "DIANA-COLLECT"
ORTHANC_FIND_LIMIT = 3


@pytest.fixture(scope="module")
def pacs(pipeline, tmp_path_factory):
    work = tmp_path_factory.mktemp("pacs")
    receiver = pipeline.cfg.receiver
    orthanc = start_orthanc(
        work,
        {
            "DIANA": [receiver.ae_title, "127.0.0.1", receiver.port],
            "COLLECT": [COLLECT_AE, "127.0.0.1", port(11199)],
        },
        {},
        verbose=True,
        # Orthanc's cap on a C-FIND's matches (its first 3, then 0xFE00): the other tests here ask by
        # accession number, one study each; test_a_pacs_capping_its_c_find_answers asks for more.
        settings={"LimitFindResults": ORTHANC_FIND_LIMIT},
    )
    orthanc.work = work  # type: ignore[attr-defined]
    yield orthanc
    stop_orthanc(orthanc)


def settings(**overrides: str) -> dict[str, str]:
    base = {
        "DIANA_COLLECT_PACS_AE_TITLE": ORTHANC_AE,
        "DIANA_COLLECT_PACS_HOST": "127.0.0.1",
        "DIANA_COLLECT_PACS_PORT": str(DICOM_PORT),
        "DIANA_COLLECT_AE_TITLE": COLLECT_AE,
        "DIANA_COLLECT_CONCURRENCY": "2",
        "DIANA_COLLECT_RETRIES": "1",
        "DIANA_COLLECT_BACKOFF_S": "1",
        "DIANA_COLLECT_VERIFY_TIMEOUT_S": "60",
        "DIANA_COLLECT_PAUSE_S": "2",
    }
    return base | overrides


def run_collect(
    pipeline, name: str, args: list[str], env: dict[str, str], timeout: float = 400, status: int = 0
) -> str:
    """The job's output; ``status``: its exit status (3: it ended, something did not come)."""
    proc = pipeline.start(name, "collect", "run", "--no-progress", *args, settings=env)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pipeline.stop(name, kill=True)
        raise AssertionError(
            f"diana collect did not finish in {timeout:.0f} s:\n{pipeline.log_text(name)[-3000:]}"
        ) from None
    pipeline.procs.pop(name, None)
    output = pipeline.log_text(name)
    assert proc.returncode == status, output[-3000:]
    return output


def write_accessions(path: Path, accessions: list[str]) -> Path:
    path.write_text("AccessionNumber\n" + "".join(f"{a}\n" for a in accessions))
    return path


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def indexed_count(cfg, study_uid: str) -> int:
    client = opensearch_client(cfg.opensearch)
    index = IndexLayout(cfg.opensearch.index_prefix).alias("instances")
    client.indices.refresh(index=index)
    return int(client.count(index=index, body={"query": {"term": {"study_instance_uid": study_uid}}})["count"])


def archived_count(cfg, study_uid: str) -> int:
    folder = cfg.path(cfg.storage.archive_dir) / study_uid
    return len(list(folder.glob("*/*.dcm"))) if folder.is_dir() else 0


def wait_archived(cfg, studies: list[PacsStudy], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(archived_count(cfg, s.study_uid) < len(s.sop_uids) - s.private_objects for s in studies):
        assert time.monotonic() < deadline, "the archive sink did not write every pulled object"
        time.sleep(0.5)


def test_job_of_20_accessions_report_is_exact(pipeline, tmp_path):
    """Against dcmqrscp: 17 studies, 2 unknown accessions, 1 study whose retrieve is refused in part
    (its private object is not accepted by our receiver, so the PACS counts a failed sub-operation)."""
    cfg = pipeline.cfg
    studies = [make_pacs_study(tmp_path / "corpus", f"CA{n:04d}") for n in range(17)]
    refused = make_pacs_study(tmp_path / "corpus", "CAPRIVATE", instances=2, private_objects=1)
    pacs = start_dcmqrscp(
        tmp_path,
        {cfg.receiver.ae_title: ("127.0.0.1", cfg.receiver.port)},
        [f for s in [*studies, refused] for f in s.files],
    )
    try:
        unknown = ["CAUNKNOWN1", "CAUNKNOWN2"]
        lines = [s.accession for s in studies[:9]] + [refused.accession] + unknown + [s.accession for s in studies[9:]]
        lines.insert(5, "CA*WILDCARD")  # a line that cannot be a single accession number: reported, the job goes on
        source = write_accessions(tmp_path / "accessions.csv", lines)
        report = tmp_path / "report.csv"
        env = settings(DIANA_COLLECT_PACS_AE_TITLE=DCMQRSCP_AE, DIANA_COLLECT_PACS_PORT=str(DCMQRSCP_PORT))
        # exit status 3: a study partial and a line unparsable
        run_collect(pipeline, "collect-20", [str(source), "--report", str(report), "--job", "twenty"], env, status=3)

        rows = read_report(report)
        by_input = {r["input"]: r for r in rows}
        assert len(rows) == len(lines) == 21
        for s in studies:
            row = by_input[s.accession]
            got = (row["outcome"], row["study_instance_uid"], row["expected_instances"], row["indexed_instances"])
            assert got == ("retrieved", s.study_uid, "2", "2"), row
            assert row["pacs_status"] == "0x0000" and row["retrieves"] == "1", row
        for accession in unknown:
            assert (by_input[accession]["outcome"], by_input[accession]["pacs_status"]) == ("not_found", "0x0000")
        wildcard = by_input["CA*WILDCARD"]
        assert (wildcard["outcome"], wildcard["line"]) == ("unparsable", "7")  # the header is line 1
        assert "not a single DICOM value" in wildcard["detail"]
        partial = by_input[refused.accession]
        got = (partial["outcome"], partial["expected_instances"], partial["indexed_instances"], partial["retrieves"])
        assert got == ("partial", "3", "2", "2"), partial
        assert partial["pacs_status"] == "0xB000", partial  # sub-operations complete, one or more failed
        assert "PACS status 0xB000: 2 sent, 1 failed" in partial["detail"], partial

        # Every known study archived and indexed (the private object refused by our receiver is not).
        wait_archived(cfg, [*studies, refused])
        for s in [*studies, refused]:
            assert indexed_count(cfg, s.study_uid) == len(s.sop_uids) - s.private_objects
            assert archived_count(cfg, s.study_uid) == len(s.sop_uids) - s.private_objects

        # `diana collect status` reads the same state from the topic.
        status = subprocess.run(
            [sys.executable, "-m", "diana.cli", "collect", "status", "twenty", "--report", "-"],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
            | {"DIANA_CONFIG": str(pipeline.config_file)},
        )
        assert status.returncode == 0, status.stderr
        assert "job twenty (done): 2 not_found, 1 partial, 17 retrieved, 1 unparsable" in status.stdout, status.stdout

        # Run again: the job is done, nothing is moved again, the report is the same.
        moves = (tmp_path / "dcmqrscp.log").read_text(errors="replace").count("Received Move SCP")
        again = tmp_path / "again.csv"
        run_collect(
            pipeline, "collect-20-again", [str(source), "--report", str(again), "--job", "twenty"], env, status=3
        )
        assert read_report(again) == rows
        assert (tmp_path / "dcmqrscp.log").read_text(errors="replace").count("Received Move SCP") == moves
    finally:
        stop_dcmqrscp(pacs)


def test_throttle_of_2_counted_by_the_pacs_and_complete_studies_skipped(pipeline, pacs, tmp_path):
    cfg = pipeline.cfg
    studies = [make_pacs_study(tmp_path / "corpus", f"TH{n:04d}", instances=3) for n in range(10)]
    load_into_orthanc(pacs.url, studies)
    sent = storescu(cfg, studies[0].files)  # already in diana-star before the job
    assert sent.returncode == 0, sent.stderr
    wait_archived(cfg, studies[:1])
    deadline = time.monotonic() + 60
    while indexed_count(cfg, studies[0].study_uid) < 3:
        assert time.monotonic() < deadline, "the study sent beforehand was not indexed"
        time.sleep(0.5)
    log = pacs.work / "orthanc.log"
    log_start = len(log.read_text(errors="replace"))
    source = write_accessions(tmp_path / "throttle.csv", [s.accession for s in studies])
    report = tmp_path / "throttle-report.csv"
    run_collect(pipeline, "collect-throttle", [str(source), "--report", str(report), "--job", "throttle"], settings())
    rows = read_report(report)
    assert [r["outcome"] for r in rows] == ["already_present"] + ["retrieved"] * 9, rows
    assert rows[0]["retrieves"] == "0" and rows[0]["detail"] == "already complete in diana-star"

    # Counted on the PACS side: Orthanc's own log of the associations we opened.
    orthanc_log = log.read_text(errors="replace")[log_start:]
    peak, total = max_concurrent_associations(orthanc_log, COLLECT_AE)
    assert total == 10 + 9, total  # one C-FIND per line, one C-MOVE per study not already complete
    assert orthanc_log.count("Incoming Move request") == 9
    assert peak == 2, peak


def test_kill_9_and_restart_pull_each_study_once(pipeline, pacs, tmp_path):
    cfg = pipeline.cfg
    studies = [make_pacs_study(tmp_path / "corpus", f"KL{n:04d}", instances=3) for n in range(8)]
    load_into_orthanc(pacs.url, studies)
    source = write_accessions(tmp_path / "kill.csv", [s.accession for s in studies])
    env = settings(DIANA_COLLECT_CONCURRENCY="1")
    proc = pipeline.start(
        "collect-kill", "collect", "run", "--no-progress", str(source), "--job", "killed", settings=env
    )
    deadline = time.monotonic() + 300
    while True:
        events = load_events(cfg.kafka, "killed")
        complete = sum(1 for e in events if e["event"] == "STUDY_COMPLETE")
        if complete >= 3 and events[-1]["event"] == "MOVE_ENDED":
            break
        assert proc.poll() is None, pipeline.log_text("collect-kill")[-3000:]
        assert time.monotonic() < deadline, "the job never got three studies in"
        time.sleep(0.2)
    pipeline.stop("collect-kill", kill=True)  # SIGKILL: no clean-up of any kind
    assert proc.returncode == -9
    report = tmp_path / "kill-report.csv"
    run_collect(pipeline, "collect-resume", [str(source), "--job", "killed", "--report", str(report)], env)
    rows = read_report(report)
    assert [r["outcome"] for r in rows] == ["retrieved"] * 8, rows
    assert all(r["retrieves"] == "1" for r in rows), rows
    wait_archived(cfg, studies)

    # Each study pulled once: the receiver published one event per object (counted on the topic).
    ours = {uid for s in studies for uid in s.sop_uids}
    arrivals = Counter(
        r["sop_instance_uid"] for _key, r in topic_records(cfg, INSTANCES.name) if r["sop_instance_uid"] in ours
    )
    assert set(arrivals) == ours
    assert set(arrivals.values()) == {1}, arrivals


def test_unreachable_pacs_pauses_the_job(pipeline, tmp_path):
    source = write_accessions(tmp_path / "one.csv", ["CAOFFLINE"])
    env = settings(DIANA_COLLECT_PACS_PORT=str(port(11198)))  # nothing listens there
    proc = pipeline.start(
        "collect-offline", "collect", "run", "--no-progress", str(source), "--job", "offline", settings=env
    )
    deadline = time.monotonic() + 60
    while "paused, trying again" not in pipeline.log_text("collect-offline"):
        assert proc.poll() is None, pipeline.log_text("collect-offline")
        assert time.monotonic() < deadline, pipeline.log_text("collect-offline")
        time.sleep(0.3)
    text = pipeline.log_text("collect-offline")
    assert f"PACS {ORTHANC_AE} at 127.0.0.1:{port(11198)} does not answer" in text
    pipeline.stop("collect-offline")  # SIGTERM: stops between two steps
    assert proc.returncode == 130
    assert "run the same command again" in pipeline.log_text("collect-offline")
    events = [e["event"] for e in load_events(pipeline.cfg.kafka, "offline")]
    assert events[0] == "JOB_STARTED" and "JOB_PAUSED" in events and "LINE_NOT_FOUND" not in events


def test_a_pacs_capping_its_c_find_answers_has_the_line_asked_in_parts(pipeline, pacs, tmp_path):
    """Orthanc at its LimitFindResults (3) answers a month of 7 studies with 3 matches and 0xFE00: the
    line was find_failed ("narrow the line's query"); with [collect] find_limit = 3 (a PACS that says
    Success) it would have been 3 studies. Now the month is asked by halves of its dates (no day has
    more than 2): all 7 retrieved, each moved once. A day of 4 studies is not split by StudyTime (a
    study without one would be lost): find_failed, saying so; so is a patient's line without dates.
    Dates in June and July 2023: no other test's studies."""
    cfg = pipeline.cfg
    corpus = tmp_path / "corpus"
    dated = (("20230601", ""), ("20230605", ""), ("20230612", "P"), ("20230612", "P"), ("20230615", "P"))
    dated += (("20230620", "P"), ("20230630", ""))
    studies = [
        make_pacs_study(corpus, f"LM{n}", study_date=d, study_time=f"{8 + n:02d}0000", patient_id=p and "PATLIMIT")
        for n, (d, p) in enumerate(dated)
    ]
    busy_day = [
        make_pacs_study(corpus, f"LD{n}", study_date="20230710", study_time=f"{8 + n:02d}0000") for n in range(4)
    ]
    load_into_orthanc(pacs.url, studies + busy_day)
    log = pacs.work / "orthanc.log"
    log_start = len(log.read_text(errors="replace"))
    month = ["--date-from", "2023-06-01", "--date-to", "2023-06-30"]
    report = tmp_path / "capped.csv"
    run_collect(pipeline, "collect-capped", [*month, "--report", str(report), "--job", "capped"], settings())
    rows = read_report(report)
    assert sorted(r["study_instance_uid"] for r in rows) == sorted(s.study_uid for s in studies), rows
    assert {r["outcome"] for r in rows} == {"retrieved"} and {r["retrieves"] for r in rows} == {"1"}, rows
    assert log.read_text(errors="replace")[log_start:].count("Incoming Move request") == 7
    line = next(e for e in load_events(cfg.kafka, "capped") if e["event"] == "LINE_FOUND")
    assert "7 studies by " in line["detail"] and "limit of matches reached" in line["detail"], line
    wait_archived(cfg, studies)

    # find_limit said (as for a PACS capping with Success): the same parts; everything is already here.
    again = tmp_path / "capped-again.csv"
    env = settings(DIANA_COLLECT_FIND_LIMIT=str(ORTHANC_FIND_LIMIT))
    run_collect(pipeline, "collect-capped-2", [*month, "--report", str(again), "--job", "capped-2"], env)
    assert {r["outcome"] for r in read_report(again)} == {"already_present"} and len(read_report(again)) == 7

    # One day of 4 studies: not asked in parts by StudyTime, none retrieved.
    day = ["--date-from", "2023-07-10", "--date-to", "2023-07-10"]
    busy = tmp_path / "busy-day.csv"
    run_collect(
        pipeline, "collect-busy-day", [*day, "--report", str(busy), "--job", "capped-day"], settings(), status=3
    )
    (row,) = read_report(busy)
    assert (row["outcome"], row["study_instance_uid"]) == ("find_failed", ""), row
    assert "studies without a StudyTime could not be listed" in row["detail"], row

    # A patient's 4 studies, no dates: nothing to split by.
    source = tmp_path / "patient.csv"
    source.write_text("PatientID\nPATLIMIT\n")
    failed = tmp_path / "patient-report.csv"
    run_collect(pipeline, "collect-patient", [str(source), "--report", str(failed), "--job", "capped-3"], env, status=3)
    (row,) = read_report(failed)
    assert (row["outcome"], row["study_instance_uid"]) == ("find_failed", ""), row
    assert "limit of matches was reached" in row["detail"] and "no study date to split it by" in row["detail"], row


def test_a_pacs_without_instance_counts_has_a_study_held_already_present(pipeline, tmp_path):
    """dcmqrscp gives no NumberOfStudyRelatedInstances: a study sent to diana-star beforehand was
    retrieved again by a new job. Now counted by an IMAGE-level C-FIND: already_present, never moved;
    the others retrieved with the count to wait for."""
    cfg = pipeline.cfg
    studies = [make_pacs_study(tmp_path / "corpus", f"NC{n:04d}", instances=3) for n in range(3)]
    sent = storescu(cfg, studies[0].files)  # already in diana-star before the job
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 60
    while indexed_count(cfg, studies[0].study_uid) < 3:
        assert time.monotonic() < deadline, "the study sent beforehand was not indexed"
        time.sleep(0.5)
    pacs = start_dcmqrscp(
        tmp_path, {cfg.receiver.ae_title: ("127.0.0.1", cfg.receiver.port)}, [f for s in studies for f in s.files]
    )
    try:
        source = write_accessions(tmp_path / "counts.csv", [s.accession for s in studies])
        report = tmp_path / "counts-report.csv"
        env = settings(DIANA_COLLECT_PACS_AE_TITLE=DCMQRSCP_AE, DIANA_COLLECT_PACS_PORT=str(DCMQRSCP_PORT))
        run_collect(pipeline, "collect-counts", [str(source), "--report", str(report), "--job", "counts"], env)
        rows = read_report(report)
        got = [(r["outcome"], r["expected_instances"], r["retrieves"]) for r in rows]
        assert got == [("already_present", "3", "0"), ("retrieved", "3", "1"), ("retrieved", "3", "1")], rows
        assert (tmp_path / "dcmqrscp.log").read_text(errors="replace").count("Received Move SCP") == 2
        wait_archived(cfg, studies)
    finally:
        stop_dcmqrscp(pacs)
