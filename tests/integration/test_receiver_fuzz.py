"""Fuzz over the real DICOM network: 1,200 mutated data sets against the running receiver.

Invariants: the receiver never crashes; every answer is a named status (never the catch-all);
it never answers success for an object it did not store (each success has its event and its
archived object with exactly the bytes the receiver must have stored); nothing is written
outside the archive and landing roots, whose every path is built from validated UIDs or hashes.
"""

from __future__ import annotations

import random
import re
from io import BytesIO

from pydicom.uid import generate_uid

from diana.producers.scp import STATUS
from diana.schemas.topics import INSTANCES
from diana.schemas.uid import is_valid_uid
from diana.sinks.archive import archive_relative_path
from tests.support.dicomgen import make_instance
from tests.support.helpers import RawStoreSender, stored_sha256, topic_records, wait_until_caught_up

CASES = 1200
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _valid_body(study: str, series: str, case: int) -> tuple[str, bytes]:
    ds = make_instance(study, series, case, patient_id=f"FUZZ{case}", study_date="20240901", rows=8)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    # the data set starts after preamble, prefix and the file meta group
    meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) group length value
    return ds.SOPInstanceUID, raw[144 + meta_len :]


def _mutate(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    kind = rng.randrange(7)
    header_end = min(len(data), 700)  # mostly hit the header, not the pixel noise
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == 1:  # truncate
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2:  # insert junk
        at = rng.randrange(header_end)
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # a length that runs past the end
        at = rng.randrange(header_end - 4)
        data[at : at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\xf0\xff\x00\x00", b"\xff\xff\xff\xff"])
    elif kind == 4:  # a wrong VR
        for m in rng.sample(list(re.finditer(rb"[A-Z]{2}", bytes(data[:header_end]))), k=2):
            data[m.start() : m.start() + 2] = rng.choice([b"SQ", b"UN", b"OB", b"XX", b"\x00\x00", b"UT"])
    elif kind == 5:  # duplicate a chunk
        a = rng.randrange(header_end)
        data[a:a] = data[a : a + rng.randint(8, 200)]
    else:  # random bytes only
        data = bytearray(rng.randbytes(rng.randint(0, 2000)))
    return bytes(data)


def _paths_are_ours(cfg) -> None:
    archive = cfg.path(cfg.storage.archive_dir)
    for path in archive.rglob("*"):
        parts = path.relative_to(archive).parts
        assert all(is_valid_uid(p) for p in parts[:-1]), path
        # a folder named by a UID, <SOP>.dcm, a temporary .name, or <SOP>.<sha256[:12]>.dcm (a KEEP_BOTH
        # version, from the conflict tests)
        name = parts[-1]
        version = re.fullmatch(r"(.+?)(\.[0-9a-f]{12})?\.dcm", name)
        assert is_valid_uid(name) or (version is not None and is_valid_uid(version.group(1))) or name.startswith("."), (
            path
        )
    landing = cfg.path(cfg.storage.landing_dir)
    for path in landing.rglob("*"):
        rel = path.relative_to(landing).parts
        assert rel[0] == ".incoming" or re.fullmatch(r"[0-9a-f]{2}", rel[0]), path
        if len(rel) == 2 and rel[0] != ".incoming":
            assert re.fullmatch(r"\.?[0-9a-f]{64}\.dcm(\.[0-9a-f]+\.tmp)?", rel[1]), path


def test_mutated_data_sets_never_crash_the_receiver_or_fake_a_success(pipeline, tmp_path):
    cfg = pipeline.cfg
    study, series = generate_uid(), generate_uid()
    sender = RawStoreSender(cfg, aet="FUZZER")
    outcomes: dict[int, list] = {}
    successes: list[tuple[int, str]] = []
    try:
        for case in range(CASES):
            rng = random.Random(case)
            sop_uid, body = _valid_body(study, series, case)
            mutated = _mutate(body, rng)
            status = sender.send(sop_uid, mutated)
            outcomes.setdefault(status, []).append(case)
            if status == STATUS.SUCCESS:
                successes.append((case, stored_sha256(CT, sop_uid, EXPLICIT_LE, mutated)))
    finally:
        sender.close()

    assert pipeline.procs["receiver"].poll() is None, "the receiver died"
    allowed = {STATUS.SUCCESS, STATUS.INVALID_DATASET, STATUS.CANNOT_UNDERSTAND}
    summary = {hex(k) if k is not None else None: len(v) for k, v in outcomes.items()}
    assert set(outcomes) <= allowed, f"unexpected statuses: {summary}"
    # The mix shows the fuzzer reached both sides of the decision.
    assert len(outcomes.get(STATUS.SUCCESS, [])) > 50 and len(outcomes.get(STATUS.CANNOT_UNDERSTAND, [])) > 50, summary

    wait_until_caught_up(cfg, timeout=240)
    events = {e["sha256"]: e for _, e in topic_records(cfg, INSTANCES.name)}
    archive = cfg.path(cfg.storage.archive_dir)
    for case, sha in successes:
        assert sha in events, f"case {case}: success without an event for the stored bytes"
        stored = archive / archive_relative_path(events[sha])
        from diana.durable import sha256_file

        assert stored.exists() and sha256_file(stored)[0] == sha, f"case {case}: success but not archived"
    _paths_are_ours(cfg)
