"""`diana report`: every range and per-day histogram is asked in the site's zone ([report] time_zone, else
this host's), so a day runs from the site's midnight, not UTC's; the page names the zone.

OpenSearch is a recording stand-in answering nothing; the report on the real index is in
tests/integration/test_dashboards_report.py.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import zoneinfo
from datetime import date, datetime
from pathlib import Path

import pytest
import structlog
from opensearchpy.exceptions import AuthenticationException, RequestError
from structlog.testing import capture_logs

import diana.clients
from diana.access import site_zone as report_zone
from diana.access.report import build_report, host_time_zone
from diana.access.site_zone import SiteZone, host_zone, zones_like
from diana.cli import main
from diana.config import ConfigError, load_config


class RecordingOpenSearch:
    """Every alias exists, every search finds nothing; ``bodies`` holds what was asked."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.indices = self

    def exists_alias(self, name: str) -> bool:
        return True

    def search(self, index: str, body: dict) -> dict:
        self.bodies.append(body)
        return {}


def _dated_parts(node, found: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Every range on a date field and every date_histogram in a body."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "date_histogram":
                found.append((key, value))
            elif key == "range":
                found += [(key, bounds) for field, bounds in value.items() if field.endswith("_at")]
            _dated_parts(value, found)
    elif isinstance(node, list):
        for item in node:
            _dated_parts(item, found)
    return found


def test_every_range_and_day_of_the_report_is_in_the_site_zone():
    client = RecordingOpenSearch()
    page = build_report(client, "diana", date(2024, 3, 1), date(2024, 3, 31), time_zone="Europe/Zurich")
    dated = [part for body in client.bodies for part in _dated_parts(body, [])]
    assert {kind for kind, _ in dated} == {"range", "date_histogram"}
    assert all(part.get("time_zone") == "Europe/Zurich" for _, part in dated), json.dumps(dated)
    assert "midnight to midnight in Europe/Zurich" in page


def test_the_host_zone_is_its_iana_name_else_its_utc_offset(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    assert host_time_zone() == "America/New_York"
    monkeypatch.setenv("TZ", "EST+5")  # a POSIX rule: no name OpenSearch knows
    time.tzset()  # the C library's local time, which the offset is read from, follows TZ only when told
    try:
        assert host_time_zone() == "-05:00"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("zone", ["Europe/Zurich", "+05:30", ""])
def test_the_setting_takes_a_zone_name_or_an_offset(zone):
    assert load_config(None, environ={"DIANA_REPORT_TIME_ZONE": zone}).report.time_zone == zone


def test_an_unknown_zone_is_refused_at_start_up():
    with pytest.raises(ConfigError, match=r"\[report\] time_zone = 'Mars/Olympus': no such zone; use an IANA name"):
        load_config(None, environ={"DIANA_REPORT_TIME_ZONE": "Mars/Olympus"})


@pytest.mark.parametrize("offset", ["+19:00", "+23:59", "-18:30"])
def test_an_offset_opensearch_refuses_is_refused_at_start_up(offset):
    # Java's ZoneOffset, which reads OpenSearch's time_zone, takes -18:00 to +18:00; Python up to 23:59.
    with pytest.raises(ConfigError, match=rf"time_zone = '\{offset}': beyond [+-]18:00, .* from -18:00 to \+18:00"):
        load_config(None, environ={"DIANA_REPORT_TIME_ZONE": offset})


@pytest.mark.parametrize("offset", ["+18:00", "-18:00", "-09:30"])
def test_an_offset_within_18_hours_is_taken(offset):
    assert load_config(None, environ={"DIANA_REPORT_TIME_ZONE": offset}).report.time_zone == offset


class RefusingOpenSearch(RecordingOpenSearch):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def search(self, index: str, body: dict) -> dict:
        raise self.error


def _report(tmp_path: Path, monkeypatch, client) -> int:
    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n[report]\ntime_zone = "Asia/Tokyo"\n')
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
    return main(["--config", str(config), "report", "--to", "2024-03-02", "--out", str(tmp_path / "r.html")])


def test_a_refused_search_is_one_line_naming_the_zone_not_a_traceback(tmp_path: Path, monkeypatch, capsys):
    refusal = RequestError(
        400,
        "x_content_parse_exception",
        {"error": {"root_cause": [{"reason": "[1:80] [range] failed to parse field [time_zone]"}]}},
    )
    assert _report(tmp_path, monkeypatch, RefusingOpenSearch(refusal)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(
        "diana report: OpenSearch refused the search (400 x_content_parse_exception: [1:80] [range] failed to "
        "parse field [time_zone]); the days were asked in Asia/Tokyo ([report] time_zone"
    )
    assert 'set [report] time_zone to an IANA name such as "Europe/Zurich"' in err
    assert not (tmp_path / "r.html").exists()


def test_a_missing_index_is_said_as_such_not_as_a_zone_to_fix(tmp_path: Path, monkeypatch, capsys):
    from opensearchpy.exceptions import NotFoundError

    missing = NotFoundError(404, "index_not_found_exception", {"error": {"reason": "no such index [diana-instances]"}})
    assert _report(tmp_path, monkeypatch, RefusingOpenSearch(missing)) == 1
    err = capsys.readouterr().err
    assert "nothing indexed yet?" in err and "time_zone" not in err and len(err.strip().splitlines()) == 1


def test_refused_credentials_are_said_as_every_command_says_them(tmp_path: Path, monkeypatch, capsys, config):
    refusal = AuthenticationException(401, "security_exception", {})
    assert _report(tmp_path, monkeypatch, RefusingOpenSearch(refusal)) == 1
    assert "refused the credentials (HTTP 401): [opensearch] username" in capsys.readouterr().err
    # cohort's refusal goes the same way (it said "refused the search (401 ...); narrow the filters")
    assert main(["--config", str(config), "cohort", "find"]) == 1
    assert "refused the credentials (HTTP 401): [opensearch] username" in capsys.readouterr().err


def test_the_command_asks_in_the_configured_zone_and_names_it(tmp_path: Path, monkeypatch, capsys):
    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n[report]\ntime_zone = "Asia/Tokyo"\n')
    client = RecordingOpenSearch()
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
    out = tmp_path / "r.html"
    argv = ["--config", str(config), "report", "--from", "2024-03-01", "--to", "2024-03-02", "--out", str(out)]
    assert main(argv) == 0
    assert "(Asia/Tokyo days)" in capsys.readouterr().out
    assert "midnight to midnight in Asia/Tokyo" in out.read_text()
    assert all(part.get("time_zone") == "Asia/Tokyo" for body in client.bodies for _, part in _dated_parts(body, []))


# This host's zone when /etc/localtime is a copy of a zoneinfo file (container images, some VMs), not a
# link: the name of the file with the same bytes, in a zoneinfo folder made here.


def _zone_bytes(name: str) -> bytes:
    """The system's zoneinfo file of ``name`` (the one Python's ZoneInfo reads)."""
    for folder in zoneinfo.TZPATH:
        if (Path(folder) / name).is_file():
            return (Path(folder) / name).read_bytes()
    pytest.fail(f"no zoneinfo file for {name} in {zoneinfo.TZPATH}: install tzdata (the test never passes untested)")


def _zoneinfo(root: Path, files: dict[str, str]) -> Path:
    """A zoneinfo folder: each name holds the bytes of the system's file of the zone it maps to."""
    for name, zone in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_zone_bytes(zone))
    return root


@pytest.fixture
def no_tz(monkeypatch):
    monkeypatch.delenv("TZ", raising=False)  # TZ would rule over the files


def _copy_of(tmp_path: Path, zone: str) -> Path:
    localtime = tmp_path / "etc" / "localtime"
    localtime.parent.mkdir(exist_ok=True)
    localtime.write_bytes(_zone_bytes(zone))
    return localtime


def test_a_copied_localtime_is_named_by_the_zoneinfo_file_of_the_same_bytes(tmp_path: Path, no_tz):
    folder = _zoneinfo(
        tmp_path / "zoneinfo",
        {"Europe/Berlin": "Europe/Berlin", "Europe/Zurich": "Europe/Zurich", "Asia/Tokyo": "Asia/Tokyo"},
    )
    localtime = _copy_of(tmp_path, "Europe/Zurich")
    zone = host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[folder])
    assert zone == SiteZone("Europe/Zurich") and zone.note == ""


def test_of_several_names_with_the_same_bytes_the_canonical_one_is_taken_whatever_the_order(tmp_path: Path, no_tz):
    localtime = _copy_of(tmp_path, "Europe/Zurich")
    same = {name: "Europe/Zurich" for name in ("Europe/Vaduz", "Europe/Zurich", "Europe/Busingen")}
    plain = _zoneinfo(tmp_path / "plain", same)
    reversed_order = _zoneinfo(tmp_path / "reversed", dict(reversed(same.items())))
    for folder in (plain, reversed_order):  # none listed as canonical: by name
        assert zones_like(str(localtime), (str(folder),)) == ("Europe/Busingen", "Europe/Vaduz", "Europe/Zurich")
    listed = _zoneinfo(tmp_path / "listed", {**same, "Japan": "Europe/Zurich"})
    (listed / "tzdata.zi").write_text("# version 2024a\nZ Europe/Zurich 0:34:8 - LMT 1853 Jul 16\nL Europe/Zurich X\n")
    assert host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[listed]).name == (
        "Europe/Zurich"
    )
    assert zones_like(str(localtime), (str(listed),))[-1] == "Japan"  # a bare (backward) name last
    linked = tmp_path / "linked"
    _zoneinfo(linked, {"Europe/Zurich": "Europe/Zurich", "Europe/Vaduz": "Europe/Zurich"})
    (linked / "Europe" / "Busingen").symlink_to("Zurich")  # a link is an alias: after the files
    assert zones_like(str(localtime), (str(linked),)) == ("Europe/Vaduz", "Europe/Zurich", "Europe/Busingen")
    # /etc/timezone naming one of the same bytes: the host's own choice
    named = tmp_path / "timezone"
    named.write_text("Europe/Vaduz\n")
    assert host_zone(localtime=localtime, timezone_file=named, zoneinfo_dirs=[listed]).name == "Europe/Vaduz"


def test_the_search_is_kept_for_the_process(tmp_path: Path, no_tz):
    folder = _zoneinfo(tmp_path / "zoneinfo", {"Asia/Tokyo": "Asia/Tokyo"})
    localtime = _copy_of(tmp_path, "Asia/Tokyo")
    assert host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[folder]).name == "Asia/Tokyo"
    (folder / "Asia" / "Tokyo").unlink()
    assert host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[folder]).name == "Asia/Tokyo"


def _local_offset() -> str:
    offset = datetime.now().astimezone().strftime("%z")
    return f"{offset[:3]}:{offset[3:]}"


def test_a_copy_of_no_zone_name_falls_back_to_the_offset_now_and_says_so(tmp_path: Path, monkeypatch, no_tz):
    # A logger a command already used is kept bound to its handler (cache_logger_on_first_use): a fresh one.
    monkeypatch.setattr(report_zone, "log", structlog.get_logger("diana.report"))
    # The same bytes only where no zone is named: other leap-second trees, the POSIX rules, a name of no zone.
    folder = _zoneinfo(
        tmp_path / "zoneinfo",
        {
            "Europe/Zurich": "Europe/Zurich",
            "posixrules": "Asia/Tokyo",
            "posix/Asia/Tokyo": "Asia/Tokyo",
            "right/Asia/Tokyo": "Asia/Tokyo",
            "localtime": "Asia/Tokyo",
            "Mars/Olympus": "Asia/Tokyo",
        },
    )
    localtime = _copy_of(tmp_path, "Asia/Tokyo")
    with capture_logs() as logs:
        zone = host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[folder])
    assert zone == SiteZone(_local_offset(), fixed_offset=True)
    assert [(e["event"], e["log_level"], e["offset"]) for e in logs] == [
        ("report.time_zone_fixed_offset", "warning", zone.name)
    ]
    assert f"its UTC offset when this ran, {zone.name}, which does not follow summer time" in zone.note
    assert "set [report] time_zone to an IANA name" in zone.note


def test_the_report_of_a_fixed_offset_fallback_says_so_and_one_of_a_named_zone_does_not(
    tmp_path: Path, monkeypatch, capsys, no_tz
):
    localtime = _copy_of(tmp_path, "Asia/Tokyo")
    empty = tmp_path / "zoneinfo"
    empty.mkdir()
    fallback = functools.partial(
        report_zone.host_zone, localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[empty]
    )
    monkeypatch.setattr(report_zone, "host_zone", fallback)
    config = tmp_path / "diana.toml"
    config.write_text('[opensearch]\nurl = "http://127.0.0.1:2"\n')
    client = RecordingOpenSearch()
    monkeypatch.setattr(diana.clients, "opensearch_client", lambda *a, **k: client)
    out = tmp_path / "r.html"
    assert main(["--config", str(config), "report", "--to", "2024-03-02", "--out", str(out)]) == 0
    page = out.read_text()
    offset = _local_offset()
    err = capsys.readouterr().err  # the log, configured by the command
    assert "report.time_zone_fixed_offset" in err and f"offset={offset}" in err
    assert f"midnight to midnight in {offset}" in page
    assert (
        f'<p class="warning">This host names no time zone: every day is cut at its UTC offset when this ran, {offset}'
        in page
    )
    assert "set [report] time_zone to an IANA name such as &quot;Europe/Zurich&quot;" in page
    assert all(part.get("time_zone") == offset for body in client.bodies for _, part in _dated_parts(body, []))
    named = build_report(RecordingOpenSearch(), "diana", date(2024, 3, 1), date(2024, 3, 2), time_zone="+01:00")
    assert 'class="warning"' not in named  # an offset set on purpose: no warning


# A TZ that is a file (TZ=:/etc/localtime, TZ=/usr/share/zoneinfo/Europe/Zurich: Docker, systemd units)
# is named as /etc/localtime is: a link by where it points, a file of a zoneinfo folder by its name there,
# a copy elsewhere by the zoneinfo file of the same bytes.


def _tz_file(tmp_path: Path, form: str, folder: Path) -> str:
    localtime = tmp_path / "etc" / "localtime"
    localtime.parent.mkdir(exist_ok=True)
    if form == "link":
        localtime.symlink_to(folder / "Europe" / "Zurich")
        return f":{localtime}"
    if form == "copy":
        localtime.write_bytes(_zone_bytes("Europe/Zurich"))
        return f":{localtime}"
    return str(folder / "Europe" / "Zurich")  # the file itself, in the zoneinfo folder


@pytest.mark.parametrize("form", ["link", "copy", "in the folder"])
def test_a_tz_naming_a_file_is_named_as_localtime_is(tmp_path: Path, monkeypatch, form):
    folder = _zoneinfo(tmp_path / "zoneinfo", {"Europe/Zurich": "Europe/Zurich", "Asia/Tokyo": "Asia/Tokyo"})
    monkeypatch.setenv("TZ", _tz_file(tmp_path, form, folder))
    zone = host_zone(localtime=tmp_path / "none", timezone_file=tmp_path / "none", zoneinfo_dirs=[folder])
    assert zone == SiteZone("Europe/Zurich") and zone.note == ""


def test_a_tz_naming_a_file_of_a_zoneinfo_folder_python_does_not_read_is_named_by_its_path(tmp_path, monkeypatch):
    folder = _zoneinfo(tmp_path / "opt" / "zoneinfo", {"Asia/Tokyo": "Asia/Tokyo"})
    monkeypatch.setenv("TZ", str(folder / "Asia" / "Tokyo"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert host_zone(localtime=tmp_path / "none", timezone_file=tmp_path / "none", zoneinfo_dirs=[empty]) == (
        SiteZone("Asia/Tokyo")
    )


def test_a_localtime_linked_to_a_file_that_names_no_zone_is_named_by_its_bytes(tmp_path: Path, no_tz):
    # A Kubernetes ConfigMap mounted at /etc/tz: /etc/localtime -> /etc/tz/localtime -> ..data/localtime
    folder = _zoneinfo(tmp_path / "zoneinfo", {"Europe/Zurich": "Europe/Zurich", "Asia/Tokyo": "Asia/Tokyo"})
    mount = tmp_path / "tz"
    (mount / "..2024_03_01").mkdir(parents=True)
    (mount / "..2024_03_01" / "localtime").write_bytes(_zone_bytes("Asia/Tokyo"))
    (mount / "..data").symlink_to("..2024_03_01")
    (mount / "localtime").symlink_to("..data/localtime")
    localtime = tmp_path / "localtime"
    localtime.symlink_to(mount / "localtime")
    named = tmp_path / "timezone"
    named.write_text("Europe/Zurich\n")  # the link's bytes come first: they are what the C library reads
    assert host_zone(localtime=localtime, timezone_file=named, zoneinfo_dirs=[folder]) == SiteZone("Asia/Tokyo")


@pytest.mark.parametrize("tree", ["posix", "right"])
def test_a_link_into_posix_or_right_names_the_zone_without_the_tree(tmp_path: Path, no_tz, tree):
    # OpenSearch's Java refuses "posix/Europe/Zurich", which Python's ZoneInfo takes.
    folder = _zoneinfo(tmp_path / "zoneinfo", {f"{tree}/Europe/Zurich": "Europe/Zurich"})
    localtime = tmp_path / "localtime"
    localtime.symlink_to(folder / tree / "Europe" / "Zurich")
    assert host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[folder]) == (
        SiteZone("Europe/Zurich")
    )


@pytest.mark.parametrize("content", [b"", b"not a zoneinfo file\n"])
def test_a_localtime_that_is_no_tzif_data_matches_nothing(tmp_path: Path, no_tz, content):
    folder = _zoneinfo(tmp_path / "zoneinfo", {"Europe/Zurich": "Europe/Zurich"})
    (folder / "Europe" / "Same").write_bytes(content)  # an empty file would match every empty file
    localtime = tmp_path / "localtime"
    localtime.write_bytes(content)
    assert zones_like(str(localtime), (str(folder),)) == ()


def test_a_localtime_that_is_a_fifo_is_not_read(tmp_path: Path):
    folder = _zoneinfo(tmp_path / "zoneinfo", {"Europe/Zurich": "Europe/Zurich"})
    os.mkfifo(folder / "Europe" / "Pipe")
    fifo = tmp_path / "localtime"
    os.mkfifo(fifo)
    answers: list[tuple[str, ...]] = []
    search = threading.Thread(target=lambda: answers.append(zones_like(str(fifo), (str(folder),))), daemon=True)
    search.start()
    search.join(10)
    if search.is_alive():  # blocked opening the FIFO for reading: a writer lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        search.join(10)
    assert not search.is_alive(), "zones_like waited on a FIFO"
    assert answers == [()]


# Byte-identical aliases (hard links or copies, as some images ship them): the zone, not a link that
# zone.tab lists per country (Europe/Guernsey, Jersey, Isle_of_Man share Europe/London's data).
UK = ("Europe/Guernsey", "Europe/Isle_of_Man", "Europe/Jersey", "Europe/London")


def _system_table(name: str) -> Path:
    for folder in zoneinfo.TZPATH:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    pytest.fail(f"no {name} in a zoneinfo folder of {zoneinfo.TZPATH}: install tzdata (the test never passes untested)")


def test_byte_identical_uk_aliases_with_the_system_tables_are_europe_london(tmp_path: Path, no_tz):
    folder = _zoneinfo(tmp_path / "zoneinfo", dict.fromkeys(UK, "Europe/London"))
    for table in ("tzdata.zi", "zone1970.tab", "zone.tab"):
        (folder / table).write_bytes(_system_table(table).read_bytes())
    localtime = _copy_of(tmp_path, "Europe/London")
    assert zones_like(str(localtime), (str(folder),))[0] == "Europe/London"
    assert host_zone(localtime=localtime, timezone_file=tmp_path / "none", zoneinfo_dirs=[folder]).name == (
        "Europe/London"
    )


ZONE_TAB = "".join(f"{cc}\t+0000+00000\t{name}\n" for cc, name in zip(("GG", "IM", "JE", "GB"), UK, strict=True))


@pytest.mark.parametrize(
    "tables",
    [
        # tzdata.zi without backzone: the others are links ("L"); zone.tab still lists them per country
        {"tzdata.zi": "Z Europe/London -0:1:15 - LMT 1847 D\nL Europe/London Europe/Guernsey\n", "zone.tab": ZONE_TAB},
        # no tzdata.zi: zone1970.tab's third column
        {"zone1970.tab": "# comment\nGB,GG,IM,JE\t+513030-0000731\tEurope/London\n", "zone.tab": ZONE_TAB},
    ],
    ids=["tzdata.zi", "zone1970.tab"],
)
def test_zone_tab_names_no_zone(tmp_path: Path, no_tz, tables):
    folder = _zoneinfo(tmp_path / "zoneinfo", dict.fromkeys(UK, "Europe/London"))
    for table, text in tables.items():
        (folder / table).write_text(text)
    localtime = _copy_of(tmp_path, "Europe/London")
    assert zones_like(str(localtime), (str(folder),)) == ("Europe/London", *UK[:3])
