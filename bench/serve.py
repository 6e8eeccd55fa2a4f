"""Query/retrieve and DICOMweb, diana-star side by side with Orthanc serving the same corpus.

Measures study-level C-FIND latency over the whole corpus, C-MOVE and WADO-RS retrieval of one CT
series (rate against Orthanc, and against dcmtk storescu → storescp moving the same files), QIDO-RS
latency, and WADO-RS metadata latency for one large study (diana-star from its prepared files, and
again one index document per instance, and Orthanc). Reports met / not met per target (issue 17).

Corpus (generated): one CT series of ``--series`` 256×256×16-bit instances, one study of ``--study``
small instances (16×16, no meaningful pixels) in series of 500, and filler studies of 50 small
instances up to ``--find-instances`` in all (written from one template: bench/serve_fill.py).
diana-star is fed the CT series and the large study with ``diana import`` (the same path as a
C-STORE, 8 in flight); the fillers too with ``--fill import``, or with ``--fill events`` (the
default) as the InstanceArrived events the receiver would publish for them, indexed by ``diana
reindex`` (the pipeline's sinks stopped first: the fillers have no landing file to archive). Orthanc
gets every file with dcmtk storescu over 4 associations, while diana-star loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from bench.ingest import REPO, bench_env, diana, diana_config, pct, send, start_orthanc, start_storescp, wait_for_echo
from bench.pipeline_steps import reindex_instances, stop_processes, stop_stack
from bench.profile import Profiler
from bench.serve_fill import produce_filler_events, send_folders, write_fillers
from tests.support.dicomgen import make_instance

PORTS = {
    "kafka": 28092,
    "controller": 28093,
    "opensearch": 28200,
    "transport": 28300,
    "diana": 28112,
    "storescp": 28113,
    "orthanc": 28114,
    "orthanc_http": 28142,
    "dicomweb": 28180,
    "stream_web": 28066,
}
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SMALL_STUDY = 50
STUDY_SERIES = 500
FILL_FOLDERS = 4  # one storescu association each into Orthanc


def _write_study(root: Path, n: int, per_series: int, rows: int, patient: str, date: str) -> dict[str, Any]:
    from pydicom.uid import generate_uid

    study = generate_uid()
    series: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i % per_series == 0:
            series.append(generate_uid())
        ds = make_instance(study, series[-1], i + 1, patient_id=patient, study_date=date, rows=rows)
        ds.save_as(root / f"{i:06d}.dcm", enforce_file_format=True)
    return {"study": study, "series": series, "patient": patient, "instances": n}


def make_corpus(root: Path, total: int, series_n: int, study_n: int) -> dict[str, Any]:
    ct = _write_study(root / "series", series_n, series_n, 256, "SERVE-CT", "20240102")
    big = _write_study(root / "study", study_n, STUDY_SERIES, 16, "SERVE-BIG", "20240103")
    studies = max(0, total - series_n - study_n) // SMALL_STUDY
    fillers = write_fillers(root / "fill", studies, SMALL_STUDY, 25, FILL_FOLDERS)
    return {"series": ct, "study": big, "fillers": fillers, "files": sum(1 for _ in root.rglob("*.dcm"))}


def _study_find(patient: str):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient
    ds.StudyInstanceUID = ""
    ds.StudyDate = ""
    ds.PatientName = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _nagle_off(event: Any) -> None:
    """TCP_NODELAY on the bench's own association: pynetdicom leaves Nagle on, and a C-FIND-RQ is two
    writes (command, then identifier), so the second waited for the server's delayed ACK (~40 ms)."""
    import socket

    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _find_association(aec: str, port: int, nodelay: bool) -> Any:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    handlers = [(evt.EVT_CONN_OPEN, _nagle_off)] if nodelay else []
    assoc = ae.associate("127.0.0.1", port, ae_title=aec, evt_handlers=handlers)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {aec}")
    return assoc


def _timed_find(assoc: Any, aec: str, patient: str) -> tuple[float, int]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    if not assoc.is_established:
        raise RuntimeError(f"{aec} ended the association")
    matches = 0
    t0 = time.perf_counter()
    for status, identifier in assoc.send_c_find(_study_find(patient), FIND):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            matches += 1
    return time.perf_counter() - t0, matches


def cfind_latencies(
    aec: str, port: int, patients: list[str], queries: int, with_nagle: bool = False
) -> tuple[list[float], int, list[float]]:
    """Study-level C-FINDs by Patient ID; (seconds per query, matches in all, seconds per query with Nagle on).

    The client has Nagle off (a C-FIND-RQ is two writes, command then identifier; with Nagle on the
    second waits for the server's delayed ACK). ``with_nagle``: each query is also asked, in turn, on a
    second association with Nagle on (pynetdicom's default, what this bench measured before), so that
    both figures see the same load."""
    fast = _find_association(aec, port, nodelay=True)
    slow = _find_association(aec, port, nodelay=False) if with_nagle else None
    rng = random.Random(3)
    latencies: list[float] = []
    nagle: list[float] = []
    matches = 0
    try:
        for number in range(queries):
            patient = rng.choice(patients)
            order = [(fast, latencies), (slow, nagle)] if number % 2 == 0 else [(slow, nagle), (fast, latencies)]
            for assoc, into in order:
                if assoc is None:
                    continue
                seconds, found = _timed_find(assoc, aec, patient)
                into.append(seconds)
                if assoc is fast:
                    matches += found
    finally:
        fast.release()
        if slow is not None:
            slow.release()
    return latencies, matches, nagle


def find_in_process(cfg: Any, patients: list[str], queries: int) -> list[float]:
    """The C-FIND handler's own work for the same queries, in this process without DICOM networking:
    the identifier parsed, the index asked (the receiver's IndexReader), every response data set built.
    What the end-to-end figure adds to this is the associations' networking and pacing."""
    from diana.access.qr.identifier import parse_identifier
    from diana.access.qr.index_reader import IndexReader
    from diana.access.qr.response import build_response, header_fields
    from diana.clients import opensearch_client

    reader = IndexReader(opensearch_client(cfg.opensearch), cfg.opensearch.index_prefix)
    rng = random.Random(3)
    latencies = []
    for _ in range(queries):
        t0 = time.perf_counter()
        query = parse_identifier(_study_find(rng.choice(patients)), "STUDY")
        for match in reader.find(query, 10001, header=header_fields(query)):
            build_response(query, match, "DIANA")
        latencies.append(time.perf_counter() - t0)
    return latencies


def cmove_series(aec: str, port: int, study: str, series: str) -> tuple[float, int, int]:
    """C-MOVE of one series to STORESCP; (seconds, completed, failed)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(MOVE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {aec}")
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    t0 = time.perf_counter()
    completed = failed = 0
    for status, _ in assoc.send_c_move(ds, "STORESCP", MOVE):
        if status and status.Status not in (0xFF00,):
            completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    wall = time.perf_counter() - t0
    assoc.release()
    return wall, completed, failed


def http_get(url: str, accept: str) -> tuple[float, int]:
    """(seconds, bytes) of one GET, the body read to its end."""
    t0 = time.perf_counter()
    with requests.get(url, headers={"Accept": accept}, stream=True, timeout=900) as r:
        r.raise_for_status()
        size = sum(len(chunk) for chunk in r.iter_content(1 << 20))
    return time.perf_counter() - t0, size


def repeat(url: str, accept: str, times: int) -> list[float]:
    return [http_get(url, accept)[0] for _ in range(times)]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(pct(values, 0.5) * 1000, 1), "p95_ms": round(pct(values, 0.95) * 1000, 1)}


def wait_indexed(url: str, total: int, timeout: float) -> float:
    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[url])
    t0 = time.monotonic()
    count = 0
    while time.monotonic() - t0 < timeout:
        try:
            count = client.count(index="diana-instances")["count"]
        except Exception:  # the index does not exist yet
            count = 0
        if count >= total:
            return time.monotonic() - t0
        time.sleep(1)
    raise RuntimeError(f"only {count} of {total} instances indexed after {timeout}s")


def wait_prepared(archive: Path, study: str, series: list[str], timeout: float) -> None:
    from diana.schemas.layout import series_metadata_path

    deadline = time.monotonic() + timeout
    while not all((archive / series_metadata_path(study, s)).exists() for s in series):
        if time.monotonic() > deadline:
            raise RuntimeError("the study's series metadata was not prepared in time")
        time.sleep(1)


def _load_orthanc(into: dict[str, Any], files: list[Path], fill: Path, port: int) -> None:
    """Every file of the corpus into Orthanc (run in a thread, beside diana-star's loading)."""
    try:
        t0 = time.monotonic()
        send(files, port, "ORTHANC", 4)
        folders = sorted(f for f in fill.iterdir() if f.is_dir()) if fill.exists() else []
        if folders:
            send_folders(folders, port, "ORTHANC")
        into["s"] = time.monotonic() - t0
    except Exception as exc:  # reported by the main thread
        into["error"] = f"loading Orthanc failed: {exc}"


def _index_filler_events(cfg: Any, config: Path, env: dict[str, str], stages: list[Any], fill: Path) -> dict[str, Any]:
    """The fillers' events to dicom.instances, then `diana reindex --kinds instances`.

    ``stages`` (aggregate and the sinks) are stopped first: the fillers have no landing file to
    archive, and the instance index is rebuilt from the log by reindex, not by the sink."""
    for stage in stages:
        stage.send_signal(signal.SIGTERM)
    for stage in stages:
        stage.wait(60)
    events, produce_s = produce_filler_events(cfg, fill)
    t0 = time.monotonic()
    reindex_instances(config, env).check_returncode()
    return {"events": events, "produce_s": round(produce_s, 1), "reindex_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--find-instances", type=int, default=100_000, help="instances in all (default 100000)")
    ap.add_argument("--series", type=int, default=1000, help="instances of the retrieved CT series (default 1000)")
    ap.add_argument("--study", type=int, default=5000, help="instances of the large study (default 5000)")
    ap.add_argument("--queries", type=int, default=200, help="C-FIND and QIDO requests per server (default 200)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench-serve", help="where results.json/.md go")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (corpus, logs, archive)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the diana-star process serving C-FIND, C-MOVE and WADO-RS during those measures (into --out)",
    )
    ap.add_argument(
        "--wado-repeats",
        type=int,
        default=7,
        help="WADO-RS series retrievals per server, taking turns, after one untimed each (median kept)",
    )
    ap.add_argument(
        "--fill",
        choices=("events", "import"),
        default="events",
        help="how diana-star gets the filler studies: their events indexed by `diana reindex` (default), "
        "or `diana import` like the rest (24-57 instances/s on the shared machine: 30-70 min for 100,000)",
    )
    ap.add_argument("--port-offset", type=int, default=0, help="add this to every port of the bench (default 0)")
    ap.add_argument(
        "--orthanc-dir",
        type=Path,
        help="Orthanc's storage and SQLite index here, e.g. under /dev/shm (default: the bench's temporary "
        "folder). On the shared machine Orthanc stored 43 instances/s on disk: 40 min for 100,000",
    )
    args = ap.parse_args(argv)
    if not shutil.which("Orthanc") or not Path(PLUGIN).exists():
        sys.exit("Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb")

    from diana.compose.local.stack import LocalStack
    from diana.config import load_config

    work = Path(tempfile.mkdtemp(prefix="diana-bench-serve-"))
    p = {name: number + args.port_offset for name, number in PORTS.items()}
    config = diana_config(
        work,
        p,
        extra=f'[query_retrieve]\ndestinations = ["STORESCP=127.0.0.1:{p["storescp"]}"]\n'
        f"[dicomweb]\nport = {p['dicomweb']}\nmetrics_port = 0\n",
    )
    cfg = load_config(config, environ={})
    stack = LocalStack(cfg)
    procs: list[subprocess.Popen] = []
    result: dict[str, Any] = {}
    orthanc_home: dict[str, str] = {}
    try:
        t0 = time.monotonic()
        corpus = make_corpus(work / "corpus", args.find_instances, args.series, args.study)
        print(f"corpus: {corpus['files']} files in {time.monotonic() - t0:.0f} s ({work})", flush=True)
        stack.reset()
        stack.start()
        env = bench_env(config)
        subprocess.run(
            [sys.executable, "-m", "diana.cli", "--config", str(config), "topics"], check=True, cwd=REPO, env=env
        )
        names = ("receive", "aggregate", "sink archive", "sink opensearch", "sink metadata", "serve --only web")
        (work / "logs").mkdir()
        for n in names:
            log = open(work / "logs" / f"{n.replace(' ', '-')}.log", "ab")
            procs.append(diana(config, *n.split(), stdout=log, stderr=subprocess.STDOUT))
        scp = start_storescp(work, p["storescp"])
        procs.append(scp)
        if args.orthanc_dir:
            orthanc_dir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=args.orthanc_dir))
            orthanc_home = {"StorageDirectory": str(orthanc_dir), "IndexDirectory": str(orthanc_dir)}
        orthanc = start_orthanc(
            work,
            p,
            **orthanc_home,
            Plugins=[PLUGIN],
            DicomWeb={"Enable": True, "Root": "/dicom-web/"},
            # Orthanc answers C-FIND and C-MOVE only to the modalities it knows.
            DicomModalities={"STORESCP": ["STORESCP", "127.0.0.1", p["storescp"]], "BENCH": ["BENCH", "127.0.0.1", 1]},
        )
        assert orthanc is not None
        procs.append(orthanc)
        if not wait_for_echo("DIANA", p["diana"]):
            raise RuntimeError("the diana-star receiver did not start")

        files = sorted((work / "corpus").rglob("*.dcm"))
        pipeline_files = sorted((work / "corpus" / "series").glob("*.dcm")) + sorted(
            (work / "corpus" / "study").glob("*.dcm")
        )
        # Orthanc loads while diana-star does (the two loading times are not a comparison).
        orthanc_load: dict[str, Any] = {}
        orthanc_loader = threading.Thread(
            target=_load_orthanc,
            args=(orthanc_load, pipeline_files, work / "corpus" / "fill", p["orthanc"]),
            daemon=True,  # an interrupted bench does not wait for it
        )
        orthanc_loader.start()
        t0 = time.monotonic()
        imported = (
            [work / "corpus"] if args.fill == "import" else [work / "corpus" / "series", work / "corpus" / "study"]
        )
        imp = subprocess.run(
            [
                sys.executable,
                "-m",
                "diana.cli",
                "--config",
                str(config),
                "import",
                "--no-progress",
                *map(str, imported),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        if imp.returncode != 0:
            raise RuntimeError(imp.stdout[-2000:] + imp.stderr[-2000:])
        import_s = time.monotonic() - t0
        big, ct = corpus["study"], corpus["series"]
        imported_n = len(files) if args.fill == "import" else len(pipeline_files)
        indexed_s = wait_indexed(cfg.opensearch.url, imported_n, timeout=7200) + import_s
        print(f"diana-star: {imported_n} imported in {import_s:.0f} s, indexed after {indexed_s:.0f} s", flush=True)
        wait_prepared(cfg.path(cfg.storage.archive_dir), big["study"], big["series"], timeout=600)
        fill_load: dict[str, Any] = {}
        if args.fill == "events":
            fill_load = _index_filler_events(cfg, config, env, procs[1:5], work / "corpus" / "fill")
            indexed = wait_indexed(cfg.opensearch.url, len(files), timeout=600)
            print(f"diana-star: fillers as events: {fill_load}; {len(files)} indexed {indexed:.0f} s after", flush=True)
        orthanc_loader.join()
        if "error" in orthanc_load:
            raise RuntimeError(orthanc_load["error"])
        orthanc_load_s = orthanc_load["s"]
        print(f"Orthanc: stored in {orthanc_load_s:.0f} s", flush=True)

        patients = [f["patient"] for f in corpus["fillers"]] or [big["patient"]]
        profiles: dict[str, Any] = {}
        args.out.mkdir(parents=True, exist_ok=True)
        find, find_nagle = {}, {}
        for name, aec, port in (("diana-star", "DIANA", p["diana"]), ("orthanc", "ORTHANC", p["orthanc"])):
            profiler = Profiler(procs[0].pid, args.out / "profile-c-find.txt")
            if args.profile and name == "diana-star":
                profiler.start()
            latencies, matches, nagle = cfind_latencies(aec, port, patients, args.queries, with_nagle=True)
            if args.profile and name == "diana-star":
                profiles["c_find (receive)"] = profiler.stop()
            find[name] = summary(latencies) | {"matches": matches}
            find_nagle[name] = summary(nagle)
        # One study of --study instances: what a per-query aggregation over its instances costs.
        find_big = {}
        for name, aec, port in (("diana-star", "DIANA", p["diana"]), ("orthanc", "ORTHANC", p["orthanc"])):
            latencies, matches, _ = cfind_latencies(aec, port, [big["patient"]], max(5, args.queries // 10))
            find_big[name] = summary(latencies) | {"matches": matches}
        find_handler = {"diana-star": summary(find_in_process(cfg, patients, args.queries))}

        # Retrieval of the CT series: the floor is storescu sending the same files to storescp.
        ct_files = sorted((work / "corpus" / "series").glob("*.dcm"))
        ct_mb = sum(f.stat().st_size for f in ct_files) / 1e6
        storescp_s = send(ct_files, p["storescp"], "ANY", 1)
        move = {"reference: storescu → storescp": {"s": round(storescp_s, 2), "completed": len(ct_files), "failed": 0}}
        for name, aec, port in (("diana-star", "DIANA", p["diana"]), ("orthanc", "ORTHANC", p["orthanc"])):
            profiler = Profiler(procs[0].pid, args.out / "profile-c-move.txt")
            if args.profile and name == "diana-star":
                profiler.start()
            wall, completed, failed = cmove_series(aec, port, ct["study"], ct["series"][0])
            if args.profile and name == "diana-star":
                profiles["c_move_series (receive)"] = profiler.stop()
            move[name] = {"s": round(wall, 2), "completed": completed, "failed": failed}
        for row in move.values():
            row["inst_per_s"] = round(row["completed"] / row["s"], 1)

        diana_web = f"http://127.0.0.1:{p['dicomweb']}"
        orthanc_web = f"http://127.0.0.1:{p['orthanc_http']}/dicom-web"
        multipart = 'multipart/related; type="application/dicom"'
        path = f"/studies/{ct['study']}/series/{ct['series'][0]}"
        wado = {}
        servers = (("diana-star", diana_web), ("orthanc", orthanc_web))
        for _, base in servers:  # one untimed retrieval each: first-request costs are not the rate
            http_get(base + path, multipart)
        profiler = Profiler(procs[5].pid, args.out / "profile-wado-rs.txt")
        if args.profile:
            profiler.start()
        # The servers take turns, round by round, so that a change of the machine's load falls on both.
        rounds = [
            {name: http_get(base + path, multipart) for name, base in servers} for _ in range(max(1, args.wado_repeats))
        ]
        if args.profile:
            profiles["wado_series (serve --only web; Orthanc's turns too)"] = profiler.stop()
        for name, _ in servers:
            runs = [r[name] for r in rounds]
            wall, size = sorted(runs)[len(runs) // 2]
            wado[name] = {
                "s": round(wall, 2),
                "MB": round(size / 1e6, 1),
                "inst_per_s": round(len(ct_files) / wall, 1),
                "runs_s": [round(r[0], 3) for r in runs],
            }

        qido = {
            name: summary([http_get(f"{base}/studies?PatientID={pid}", "application/dicom+json")[0] for pid in sample])
            for name, base in (("diana-star", diana_web), ("orthanc", orthanc_web))
            for sample in [random.Random(5).choices(patients, k=args.queries)]
        }

        meta_path = f"/studies/{big['study']}/metadata"
        metadata = {
            "diana-star (prepared)": summary(repeat(diana_web + meta_path, "application/dicom+json", 5)),
        }
        # The same request answered one index document per instance: the prepared files set aside.
        from diana.schemas.layout import series_metadata_path

        archive = cfg.path(cfg.storage.archive_dir)
        prepared = [archive / series_metadata_path(big["study"], s) for s in big["series"]]
        for f in prepared:
            f.rename(f.with_name(".bench-aside"))
        metadata["diana-star (per instance)"] = summary(repeat(diana_web + meta_path, "application/dicom+json", 3))
        for f in prepared:
            f.with_name(".bench-aside").rename(f)
        metadata["orthanc"] = summary(repeat(orthanc_web + meta_path, "application/dicom+json", 3))

        d_move, o_move = move["diana-star"], move["orthanc"]
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "load_at_end": os.getloadavg(),
            },
            "corpus": {
                "instances": len(files),
                "ct_series": len(ct_files),
                "ct_series_MB": round(ct_mb, 1),
                "large_study": big["instances"],
                "filler_studies": len(corpus["fillers"]),
                "diana_fill": args.fill,
                "diana_import_s": round(import_s, 1),
                "diana_indexed_s": round(indexed_s, 1),
                "diana_fill_events": fill_load,
                "orthanc_store_s": round(orthanc_load_s, 1),
                "orthanc_dir": str(args.orthanc_dir or "the bench's temporary folder"),
            },
            "c_find_study": find,
            "c_find_study_client_nagle_on": find_nagle,
            "c_find_large_study": find_big,
            "c_find_handler_in_process": find_handler,
            "c_move_series": move,
            "wado_series": wado,
            "qido_studies": qido,
            "wado_metadata_study": metadata,
            "profiles": profiles,
            "targets": [
                {
                    "target": "study-level C-FIND p95 < 200 ms over at least 100,000 indexed instances",
                    "result": f"p95 {find['diana-star']['p95_ms']} ms over {len(files)} instances",
                    "met": find["diana-star"]["p95_ms"] < 200 and len(files) >= 100_000,
                },
                {
                    "target": "C-MOVE of the CT series at least Orthanc's rate",
                    "result": f"{d_move['inst_per_s']} vs {o_move['inst_per_s']} inst/s",
                    "met": d_move["failed"] == 0 and d_move["inst_per_s"] >= o_move["inst_per_s"],
                },
                {
                    "target": "C-MOVE within 2× storescu → storescp",
                    "result": f"{round(d_move['s'] / storescp_s, 2)}×",
                    "met": d_move["s"] <= 2 * storescp_s,
                },
                {
                    "target": "WADO-RS series at least Orthanc's rate",
                    "result": f"{wado['diana-star']['inst_per_s']} vs {wado['orthanc']['inst_per_s']} inst/s",
                    "met": wado["diana-star"]["inst_per_s"] >= wado["orthanc"]["inst_per_s"],
                },
                {
                    "target": "WADO-RS series within 2× storescu → storescp",
                    "result": f"{round(wado['diana-star']['s'] / storescp_s, 2)}×",
                    "met": wado["diana-star"]["s"] <= 2 * storescp_s,
                },
            ],
        }
    finally:
        stop_processes(procs)
        stop_stack(stack, None if args.keep else work)
        if args.keep:
            print(f"kept {work}", flush=True)
        if orthanc_home:
            shutil.rmtree(orthanc_home["StorageDirectory"], ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    table = render(result)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


def render(result: dict[str, Any]) -> str:
    c, m = result["corpus"], result["machine"]
    lines = [
        f"Corpus: {c['instances']} instances ({c['filler_studies']} studies of {SMALL_STUDY} small instances, a "
        f"{c['large_study']}-instance study, a {c['ct_series']}-instance CT series of {c['ct_series_MB']} MB); "
        f"{m['cpus']} CPUs, load {', '.join(f'{x:.2f}' for x in m['load_at_end'])} at the end; {result['when']}. "
        f"Loading: diana-star import {c['diana_import_s']} s (indexed {c['diana_indexed_s']} s)"
        + (f", fillers as events ({c['diana_fill_events']})" if c.get("diana_fill", "import") == "events" else "")
        + f", Orthanc storescu ×4 {c['orthanc_store_s']} s (in parallel with diana-star's loading).",
        "",
        "| measure | server | p50 ms | p95 ms | n |",
        "|---|---|---:|---:|---:|",
    ]
    for title, key in (
        ("C-FIND study level", "c_find_study"),
        ("C-FIND study level, bench client with Nagle on", "c_find_study_client_nagle_on"),
        ("C-FIND study level, the large study", "c_find_large_study"),
        ("C-FIND handler alone (in process: parse, OpenSearch, responses)", "c_find_handler_in_process"),
        ("QIDO-RS /studies?PatientID", "qido_studies"),
        ("WADO-RS study metadata", "wado_metadata_study"),
    ):
        for server, s in result.get(key, {}).items():
            lines.append(f"| {title} | {server} | {s['p50_ms']} | {s['p95_ms']} | {s['n']} |")
    lines += ["", "| retrieval of the CT series | s | inst/s | completed | failed |", "|---|---:|---:|---:|---:|"]
    for server, r in result["c_move_series"].items():
        lines.append(
            f"| {server if 'storescp' in server else 'C-MOVE ' + server} | {r['s']} | {r['inst_per_s']} | {r['completed']} | {r['failed']} |"
        )
    for server, r in result["wado_series"].items():
        lines.append(f"| WADO-RS {server} ({r['MB']} MB) | {r['s']} | {r['inst_per_s']} | - | - |")
    lines += ["", "| target | result | met? |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['result']} | {'met' if t['met'] else 'not met'} |")
    for what, prof in (result.get("profiles") or {}).items():
        if not prof:
            continue
        lines += ["", f"Profile of {what}: {prof['samples']} samples (py-spy, running threads only)", ""]
        lines += ["| own % | frame | | inclusive % | frame |", "|---:|---|---|---:|---|"]
        for own, inc in zip(prof["own"], prof["inclusive"], strict=False):
            lines.append(f"| {own['percent']} | {own['frame']} | | {inc['percent']} | {inc['frame']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
