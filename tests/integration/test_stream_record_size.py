"""A series of 40,000 instances on the real broker (stream_apps/README.md, "Record size", "Bounded state").

Before, its completed digest was one changelog record of 1,066,670 bytes: the worker's producer,
at librdkafka's default message.max.bytes (1,000,000), refused it at produce(), and the batch was
aborted and done again for ever. Now the producer takes [kafka] max_message_bytes and the digest
is kept in parts. A worker of its own (its own app id, so its own group and changelog, and local
state files) gets the events written straight to dicom.instances; checked on its changelog, what a
restart reads: the series completes, its digest is 5 parts, no record reaches 1,000,000 bytes;
after a kill -9 and restart (state from the local files: the parts are read from disk) a re-send
is found in its part and counted once, a late instance amends the series, and the parts are
written again.
"""

from __future__ import annotations

import uuid

from pydicom.uid import generate_uid

from diana.stream_apps.digest import digest_count
from tests.integration.test_stream_bounded_state import Changelog
from tests.support.helpers import read_messages
from tests.support.paths import TEST_HOME, port
from tests.support.stream_events import AggregatesWorker, instance_event
from tests.support.stream_events import send_events as _send
from tests.support.stream_events import wait_for as _wait_for

INSTANCES_IN_SERIES = 40_000
PARTS = 5  # 8,192 instances a part (digest.PART_ENTRIES)


def _event(study: str, series: str, number: int, sop: str | None = None) -> dict:
    return instance_event(study, series, number, "RECORDSIZE", sop=sop)


def test_a_series_of_40000_instances_completes_with_its_digest_in_parts_and_amends_after_a_restart(
    stack, cfg, test_config_file
):
    app_id = f"recsize-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-state-changelog"
    logs = TEST_HOME / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker = AggregatesWorker(
        test_config_file,
        logs / f"{app_id}.log",
        {
            "DIANA_STREAM_APP_ID": app_id,
            "DIANA_STREAM_WEB_PORT": str(port(16078)),
            "DIANA_STREAM_STATE_DIR": str(TEST_HOME / "aggregates-state"),
        },
    )
    worker.start()
    try:
        _wait_for(lambda: worker.count("partitions.assigned") >= 1, what="the worker assigned")
        study, series = generate_uid(), generate_uid()
        events = [_event(study, series, n) for n in range(1, INSTANCES_IN_SERIES + 1)]
        _send(cfg, events)

        # 1. Completed (quiet time 4 s): the digest is an index and 5 parts, every record under 1 MB.
        log1 = _wait_for(
            lambda: (
                (c := Changelog(cfg, changelog)).state.get(f"series/{series}", {}).get("status") == "COMPLETED" and c
            ),
            timeout=180,
            what="the 40,000-instance series completed in the changelog",
        )
        assert log1.state[f"series/{series}"]["instance_count"] == INSTANCES_IN_SERIES
        assert log1.state[f"digest/{series}"]["parts"] == PARTS
        counts = [digest_count(log1.state[f"digest/{series}/{n}"]) for n in range(PARTS)]
        assert sum(counts) == INSTANCES_IN_SERIES and max(counts) == 8192
        assert not [k for k in log1.state if k.startswith("seen/")]
        largest = max(len(m.key() or b"") + len(m.value() or b"") for m in read_messages(cfg, changelog))
        assert largest < 1_000_000, largest
        assert worker.count("record_too_large") == 0

        # 2. kill -9 and restart, then a re-send of instance 12,345 and a late new instance.
        restores = worker.count("state.restored")
        worker.stop(kill=True)
        worker.start()
        _wait_for(lambda: worker.count("state.restored") > restores, what="the restarted worker restored its state")
        resend = _event(study, series, 12_345, sop=events[12_344]["sop_instance_uid"])
        _send(cfg, [resend, _event(study, series, INSTANCES_IN_SERIES + 1)])
        log2 = _wait_for(
            lambda: (c := Changelog(cfg, changelog)).state.get(f"series/{series}", {}).get("status") == "AMENDED" and c,
            what="the amended series",
        )
        amended = log2.state[f"series/{series}"]
        assert (amended["instance_count"], amended["version"]) == (INSTANCES_IN_SERIES + 1, 2)
        assert log2.state[f"digest/{series}"]["parts"] == PARTS
        assert sum(digest_count(log2.state[f"digest/{series}/{n}"]) for n in range(PARTS)) == INSTANCES_IN_SERIES + 1
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
