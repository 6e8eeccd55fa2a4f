"""Bad input on the command line gets one line naming what is wrong (the fix where there is one) and a
non-zero exit status: never a traceback. Run in this process; no command here reaches a service."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.cli import main


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_folder_given_as_the_configuration_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path), "status"]) == 2
    assert _one_line(capsys) == f"diana: configuration file: Is a directory: {tmp_path}"


def test_a_folder_or_a_missing_folder_where_a_file_is_written(config, tmp_path, capsys):
    assert main(["--config", str(config), "dashboards", "export", "-o", str(tmp_path)]) == 1
    assert _one_line(capsys) == f"diana dashboards: Is a directory: {tmp_path}"
    missing = tmp_path / "nowhere" / "x.ndjson"
    assert main(["--config", str(config), "dashboards", "export", "-o", str(missing)]) == 1
    assert _one_line(capsys) == f"diana dashboards: No such file or directory: {missing}"


@pytest.mark.parametrize(
    "argv, said",
    [
        (["import", "--workers", "0", "x"], "argument --workers: at least 1, not 0"),
        (["cohort", "find", "--limit", "-1"], "argument --limit: at least 1, not -1"),
        (["reindex", "--processes", "-2"], "argument --processes: at least 0, not -2"),
        (["replay", "--to-offset", "x", "g"], "argument --to-offset: invalid whole number value: 'x'"),
    ],
)
def test_counts_below_their_floor_are_usage_errors(config, capsys, argv, said):
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config), *argv])
    assert exited.value.code == 2
    assert said in _one_line(capsys)


def test_a_retention_of_0_days_still_means_kept_for_ever(tmp_path):
    from diana.config import ConfigError, load_config

    path = tmp_path / "diana.toml"
    path.write_text("[stream]\nstate_retention_days = 0\n")
    assert load_config(path, environ={}).stream.state_retention_days == 0
    path.write_text("[stream]\nstate_retention_days = -1\n")
    with pytest.raises(ConfigError, match="use 0 \\(kept for ever\\) or more"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "setting, said",
    [
        ("[receiver]\nport = 70000\n", "[receiver] port = 70000: a TCP port is 0 to 65535"),
        ('[receiver]\nae_title = "THIS_AE_TITLE_IS_WAY_TOO_LONG"\n', "an AE title is 1 to 16 ASCII characters"),
        ('[kafka]\nbootstrap = ""\n', "[kafka] bootstrap is empty"),
        ("[kafka]\npartitions = 0\n", "[kafka] partitions = 0: use 1 or more"),
        ('[opensearch]\nurl = ["http://a:9200", "http://b:9200"]\n', "several values go comma-separated"),
    ],
)
def test_settings_a_service_would_refuse_later_are_configuration_errors(tmp_path, capsys, setting, said):
    path = tmp_path / "diana.toml"
    path.write_text(setting)
    assert main(["--config", str(path), "status"]) == 2
    line = _one_line(capsys)
    assert line.startswith("diana: configuration error: ") and said in line, line


def test_an_unknown_option_shows_the_commands_own_usage(config, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config), "import", "--wokers", "2", "x"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: diana import ") and "unrecognized arguments: --wokers" in err, err


def test_the_configuration_file_may_follow_the_command(tmp_path, capsys):
    assert main(["status", "--config", str(tmp_path)]) == 2  # a folder: refused, so it was read
    assert _one_line(capsys) == f"diana: configuration file: Is a directory: {tmp_path}"


def test_a_stream_worker_says_at_once_that_it_waits_for_kafka(config):
    """`diana aggregate` with no broker said nothing for 60 s before its message; now it says at once."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    env["DIANA_STREAM_DATA_DIR"] = str(config.parent / "stream")
    proc = subprocess.Popen(
        [sys.executable, "-m", "diana.cli", "--config", str(config), "aggregate"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        line = ""
        for line in proc.stderr:  # type: ignore[union-attr]
            if "stream.waiting_for_kafka" in line:
                break
        assert "stream.waiting_for_kafka" in line and "127.0.0.1:1" in line, line
    finally:
        proc.kill()
        proc.wait()


def test_a_sink_says_it_waits_for_kafka_naming_the_address(config):
    """`diana sink ...` with no broker printed only librdkafka's connection lines; it now says once
    which address it waits for ([kafka] bootstrap)."""
    import os
    import queue
    import subprocess
    import sys
    import threading
    import time

    config.write_text(config.read_text() + "[sinks]\nsession_timeout_s = 2.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIANA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diana.cli", "--config", str(config), "sink", "opensearch"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    # Read on a thread: the deadline holds even while the process prints nothing. The warning comes
    # 10 s (KAFKA_UNREACHABLE_S) after the first statistics report; the rest is the process's start,
    # which took over 60 s once on a machine busy with other suites.
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    deadline = time.monotonic() + 180
    try:
        line = ""
        while "sink.waiting_for_kafka" not in line and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None and lines.empty():
                    break
        assert "sink.waiting_for_kafka" in line and "bootstrap=127.0.0.1:1" in line, line
    finally:
        proc.kill()
        proc.wait()


def test_the_watch_counts_the_time_without_a_broker_connection():
    from diana.group_membership import GroupActivity, GroupWatch

    watch = GroupWatch(limit_s=30, interval_s=1)
    assert watch.unconnected_for(100.0) == 0
    watch.observe(GroupActivity(requests=0, awaiting=0, connected=False), 100.0)
    watch.observe(GroupActivity(requests=0, awaiting=0, connected=False), 101.0)
    assert watch.unconnected_for(112.0) == 12.0
    watch.observe(GroupActivity(requests=1, awaiting=0, connected=True), 113.0)
    assert watch.unconnected_for(114.0) == 0
