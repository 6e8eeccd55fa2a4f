"""Two dose workers (Faust) in one group on the session stack, one of them killed (-9) mid-stream:
every dose report's record, events and alerts are indexed exactly once, and what a worker sent again
is byte for byte what was first sent (the fault suite's dose invariants, docs/RELIABILITY.md "Dose").

The session's dose worker and a second one, ``dose-b`` (its own Faust data folder and web port, as on
a host of its own), share the partitions of dicom.instances; both must hold some before anything is
sent. Half the reports go, then ``dose-b`` is killed with SIGKILL, the other half go while the group
waits out its session and hands its partitions to the survivor, and ``dose-b`` is started again.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from pydicom.uid import generate_uid

from diana.clients import kafka_admin
from diana.config import Config
from diana.schemas.codec import default_codec
from diana.schemas.topics import DOSE_ALERTS, DOSE_BY_PATIENT, DOSE_STUDIES, INSTANCES
from tests.integration.test_dose_redelivery import end_offsets
from tests.support import dosebuilder as b
from tests.support.helpers import group_lag, os_search, read_messages, storescu
from tests.support.paths import TEST_HOME, port

STUDIES = 6


def shares(cfg: Config) -> tuple[str, list[int]]:
    """The dose group's state and the partitions of dicom.instances each member holds now."""
    admin = kafka_admin(cfg.kafka)  # held until the answer: a collected client never answers
    try:
        group = admin.describe_consumer_groups([cfg.dose.app_id])[cfg.dose.app_id].result(timeout=10)
    except Exception as exc:  # the coordinator is busy: ask again
        return type(exc).__name__, []
    counts = [sum(1 for tp in m.assignment.topic_partitions if tp.topic == INSTANCES.name) for m in group.members]
    return str(group.state), sorted(counts)


def wait_for_shares(cfg: Config, members: int, timeout: float = 300.0) -> list[int]:
    """Until the group is stable with ``members`` workers, each holding partitions (a Faust join under
    load takes a rebalance or two, each with its table recovery)."""
    deadline = time.monotonic() + timeout
    state, found = "", []
    while time.monotonic() < deadline:
        state, found = shares(cfg)
        if state.endswith("STABLE") and len(found) == members and all(found):
            return found
        time.sleep(1.0)
    raise AssertionError(
        f"the dose group is not {members} workers with partitions after {timeout:.0f} s: {state} {found}"
    )


def dose_docs(cfg: Config, kind: str, studies: list[str]) -> list[dict]:
    """The studies' documents in diana-dose-KIND; none while the sink has not created the index yet."""
    from opensearchpy.exceptions import NotFoundError

    try:
        return os_search(cfg, f"diana-dose-{kind}", {"terms": {"study_instance_uid": studies}})
    except NotFoundError:
        return []


def report(folder: Path, index: int, run: str) -> tuple[str, Path]:
    """A CT dose report of two events for a study of its own (one over the CTDIvol level, the study over
    the DLP level of tests/support/data/dose-rules.yaml), one study per patient."""
    study_uid = generate_uid()
    events = [
        b.ct_event(generate_uid(), ctdivol="0.3", dlp="10", kind=b.CONSTANT_ANGLE),
        b.ct_event(generate_uid(), ctdivol="18.5", dlp="800"),
    ]
    ds = b.ct_report(events, total_dlp="810", study_uid=study_uid, patient_id=f"DOSE2W-{run}-{index}")
    return study_uid, b.save(ds, folder / f"rdsr-{index}.dcm")


def test_two_dose_workers_one_killed_give_each_record_and_alert_once(pipeline, tmp_path: Path):
    cfg: Config = pipeline.cfg
    run = uuid.uuid4().hex[:8]
    second = {
        "DIANA_DOSE_WEB_PORT": str(port(16070)),
        "DIANA_STREAM_DATA_DIR": str(TEST_HOME / "faust-dose-b"),
    }
    before = {topic: end_offsets(cfg, topic) for topic in (DOSE_STUDIES.name, DOSE_ALERTS.name)}
    wait_for_shares(cfg, 1)  # the session's dose worker has joined: then the second one joins it
    pipeline.start("dose-b", "dose", settings=second)
    try:
        print("dose group before sending:", wait_for_shares(cfg, 2))
        reports = [report(tmp_path, i, run) for i in range(STUDIES)]
        first, rest = reports[: STUDIES // 2], reports[STUDIES // 2 :]
        sent = storescu(cfg, [path for _, path in first])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        pipeline.stop("dose-b", kill=True)
        sent = storescu(cfg, [path for _, path in rest])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        pipeline.start("dose-b", "dose", settings=second)
        print("dose group after the restart:", wait_for_shares(cfg, 2))

        studies = [uid for uid, _ in reports]
        deadline = time.monotonic() + 180
        while True:
            found = {kind: dose_docs(cfg, kind, studies) for kind in ("studies", "events", "alerts")}
            lag = group_lag(cfg, cfg.dose.app_id, [INSTANCES.name, DOSE_BY_PATIENT.name])
            per_study = {
                uid: {kind: [d for d in docs if d["study_instance_uid"] == uid] for kind, docs in found.items()}
                for uid in studies
            }
            complete = all(
                len(d["studies"]) == 1 and len(d["events"]) == 2 and len(d["alerts"]) >= 2 for d in per_study.values()
            )
            if (complete and lag == 0) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        assert lag == 0, f"dose group lag {lag}"
        for uid, docs in per_study.items():
            assert len(docs["studies"]) == 1, (uid, docs["studies"])
            record = docs["studies"][0]
            assert record["report_count"] == 1 and record["events"] == 2, record
            assert len(docs["events"]) == 2, (uid, len(docs["events"]))

        # On the topics: every copy of a record (study, revision) or alert (alert id; its withdrawal, if any,
        # is its own message) is the first one again, and OpenSearch holds one document per standing alert.
        codec, resent = default_codec(), 0
        for topic, identity in (
            (DOSE_STUDIES.name, ("study_instance_uid", "revision")),
            (DOSE_ALERTS.name, ("alert_id", "superseded_by")),
        ):
            copies: dict[tuple, bytes] = {}
            for msg in read_messages(cfg, topic, before[topic]):
                _, record = codec.decode(msg.value())
                if record["study_instance_uid"] not in studies:
                    continue
                key = tuple(record.get(name) for name in identity)
                if key in copies:
                    resent += 1
                    assert msg.value() == copies[key], f"{topic}: {key} sent again with other content"
                copies.setdefault(key, msg.value())
            if topic == DOSE_ALERTS.name:
                for uid, docs in per_study.items():
                    of_study = [
                        key for key, value in copies.items() if codec.decode(value)[1]["study_instance_uid"] == uid
                    ]
                    ids = {key[0] for key in of_study} - {key[0] for key in of_study if key[1]}
                    assert len(ids) >= 2 and {d["alert_id"] for d in docs["alerts"]} == ids, uid
                    assert len(docs["alerts"]) == len(ids), uid
        print(f"{STUDIES} studies exact; {resent} copies sent again, each byte-identical")
    finally:
        if "dose-b" in pipeline.procs:
            pipeline.stop("dose-b")
