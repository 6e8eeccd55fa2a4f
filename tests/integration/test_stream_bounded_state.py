"""The aggregates worker's bounded state on the real broker (stream_apps/README.md, "Bounded state").

A worker of its own (its own app id, so its own group and changelog; a retention of 20 s) gets
events written straight to dicom.instances. Checked on its changelog, which is what a restart
reads: a completed series' per-instance entries are deleted (tombstones) into one digest; a
re-send and a late instance are counted once; after the retention the study leaves the state
(tombstones, a marker stays); after a kill -9 and restart, a late instance of it is dead-lettered
with the reason and not counted, and a new study is aggregated as usual.

Assertions read this worker's changelog and dead letters, not dicom.series: when this file runs
in one session with the pipeline fixture, the pipeline's own aggregates worker (no retention)
publishes revisions of the same series there too.
"""

from __future__ import annotations

import json
import uuid

from pydicom.uid import generate_uid

from diana.schemas.codec import default_codec
from diana.schemas.topics import DEADLETTER, INSTANCES
from diana.stream_apps.digest import digest_count
from tests.support.helpers import read_messages
from tests.support.paths import TEST_HOME, port
from tests.support.stream_events import AggregatesWorker, instance_event
from tests.support.stream_events import send_events as _send
from tests.support.stream_events import wait_for as _wait_for

RETENTION_S = 20


def _event(study: str, series: str, number: int, sop: str | None = None) -> dict:
    return instance_event(study, series, number, "BOUNDED", sop=sop)


class Changelog:
    """The worker's changelog as a restart reads it: the last value per key, and every record."""

    def __init__(self, cfg, topic: str) -> None:
        self.records = [
            (m.key().decode(), None if m.value() is None else json.loads(m.value())) for m in read_messages(cfg, topic)
        ]
        self.state = {}
        for key, value in self.records:
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value

    def written(self, key: str) -> list:
        return [value for k, value in self.records if k == key]


def _deadletters(cfg, sop: str) -> list:
    codec = default_codec()
    out = []
    for m in read_messages(cfg, DEADLETTER.name):
        try:
            _, event = codec.decode(m.value())
        except Exception:
            continue
        if isinstance(event, dict) and event.get("sop_instance_uid") == sop:
            out.append(dict(m.headers() or []))
    return out


def test_completed_series_shrink_to_a_digest_and_retired_studies_refuse_late_instances_across_a_restart(
    stack, cfg, test_config_file
):
    app_id = f"bounded-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-state-changelog"
    logs = TEST_HOME / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker = AggregatesWorker(
        test_config_file,
        logs / f"{app_id}.log",
        {
            "DIANA_STREAM_APP_ID": app_id,
            "DIANA_STREAM_WEB_PORT": str(port(16075)),
            "DIANA_STREAM_STATE_RETENTION_DAYS": str(RETENTION_S / 86400),
        },
    )
    worker.start()
    try:
        _wait_for(lambda: worker.count("partitions.assigned") >= 1, what="the worker assigned")
        study, series = generate_uid(), generate_uid()
        first = [_event(study, series, n) for n in (1, 2, 3)]
        _send(cfg, first)

        # 1. Completed: its three ``seen`` entries are deleted (tombstones) into one digest.
        log1 = _wait_for(
            lambda: (
                (c := Changelog(cfg, changelog)).state.get(f"series/{series}", {}).get("status") == "COMPLETED" and c
            ),
            what="the series completed in the changelog",
        )
        for event in first:
            key = f"seen/{event['sop_instance_uid']}"
            assert log1.written(key)[0][3] == series  # it was there while the series was open...
            assert log1.written(key)[-1] is None and key not in log1.state  # ...and is deleted now
        assert digest_count(log1.state[f"digest/{series}"]) == 3
        assert not [k for k in log1.state if k.startswith("seen/")]

        # 2. A re-send of instance 1 (found in the digest) and a late new instance: counted once each.
        _send(cfg, [_event(study, series, 1, sop=first[0]["sop_instance_uid"]), _event(study, series, 4)])
        log2 = _wait_for(
            lambda: (c := Changelog(cfg, changelog)).state.get(f"series/{series}", {}).get("status") == "AMENDED" and c,
            what="the amended series",
        )
        amended = log2.state[f"series/{series}"]
        assert (amended["instance_count"], amended["version"]) == (4, 2)
        assert digest_count(log2.state[f"digest/{series}"]) == 4

        # 3. The retention passes (event time, moved by the idle ticks): the study leaves the state.
        log3 = _wait_for(
            lambda: (c := Changelog(cfg, changelog)).state.get(f"gone_study/{study}") and c,
            timeout=RETENTION_S + 60,
            what="the study retired",
        )
        for key in (f"study/{study}", f"series/{series}", f"digest/{series}", f"retire/{study}"):
            assert key not in log3.state and log3.written(key)[-1] is None, key
        assert f"gone_series/{series}" in log3.state

        # 4. kill -9 and restart: the state restored from the changelog has the marker, not the study.
        restores = worker.count("state.restored")
        worker.stop(kill=True)
        worker.start()
        _wait_for(lambda: worker.count("state.restored") > restores, what="the restarted worker restored its state")
        late = _event(study, series, 5)
        _send(cfg, [late])
        # Only this worker's letter: in the whole suite the session's pipeline runs too, and its archive
        # sink parks the same event for another reason (an event with no landed object).
        [letter] = _wait_for(
            lambda: [
                d
                for d in _deadletters(cfg, late["sop_instance_uid"])
                if b"state_retention_days" in d.get("reason", b"")
            ],
            what="the late instance dead-lettered",
        )
        assert letter["origin"].startswith(INSTANCES.name.encode())

        # A new study after the restart is aggregated as usual; the retired one stayed retired.
        other_study, other_series = generate_uid(), generate_uid()
        _send(cfg, [_event(other_study, other_series, n) for n in (1, 2)])
        log4 = _wait_for(
            lambda: (
                (c := Changelog(cfg, changelog)).state.get(f"series/{other_series}", {}).get("status") == "COMPLETED"
                and c
            ),
            what="a new study completed after the restart",
        )
        assert log4.state[f"series/{other_series}"]["instance_count"] == 2
        assert f"series/{series}" not in log4.state and f"study/{study}" not in log4.state
        assert log4.written(f"series/{series}")[-1] is None  # no new aggregate started for the late one
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
