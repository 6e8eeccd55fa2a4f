"""The site's zone: where `diana report`'s days start at midnight and the dose survey's today is.

``site_time_zone``: ``[report] time_zone``, else this host's zone (``host_zone``): its IANA name from
``TZ``, the link /etc/localtime, the zoneinfo file whose bytes /etc/localtime copies (container images
and some VMs copy it instead of linking it), or /etc/timezone; else, said as such in the log and the
report, its UTC offset now, which does not follow summer time.
"""

from __future__ import annotations

import functools
import os
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import structlog

from diana.config import time_zone_info

__all__ = ["SiteZone", "site_time_zone", "host_zone"]

log = structlog.get_logger("diana.report")

_LOCALTIME = Path("/etc/localtime")
_TIMEZONE = Path("/etc/timezone")
# Files of a zoneinfo folder that name no zone: the trees with other leap-second rules, the link to
# /etc/localtime itself, the rules for POSIX TZ strings (a copy of America/New_York), the zone of no place.
_NOT_ZONES = frozenset({"posix", "right", "localtime", "posixrules", "Factory"})
_FIX = 'set [report] time_zone to an IANA name such as "Europe/Zurich"'


@dataclass(frozen=True)
class SiteZone:
    """A zone as OpenSearch takes it: an IANA name or a UTC offset "+HH:MM"."""

    name: str
    # The host named no zone: ``name`` is its UTC offset when this ran, fixed (no summer time).
    fixed_offset: bool = False

    def today(self, now: datetime | None = None) -> date:
        """The date in this zone now (or at ``now``, an aware time)."""
        zone = time_zone_info(self.name)
        return (now.astimezone(zone) if now else datetime.now(zone)).date()

    @property
    def note(self) -> str:
        """What a reader must know of a fixed offset the host fell back to ("" otherwise)."""
        if not self.fixed_offset:
            return ""
        return (
            f"This host names no time zone: every day is cut at its UTC offset when this ran, {self.name}, "
            f"which does not follow summer time; {_FIX}."
        )


def site_time_zone(setting: str) -> SiteZone:
    """``[report] time_zone`` (checked at start-up), else this host's zone."""
    return SiteZone(setting) if setting else host_zone()


def host_zone(
    *,
    localtime: Path = _LOCALTIME,
    timezone_file: Path = _TIMEZONE,
    zoneinfo_dirs: Sequence[str | Path] | None = None,
) -> SiteZone:
    """This host's zone: its IANA name where the system names it (TZ; else the link ``localtime``, the
    name of the zoneinfo file it copies, or ``timezone_file``), else its UTC offset now, logged as a warning.
    ``zoneinfo_dirs``: where the copy's name is looked for (default: those Python reads, zoneinfo.TZPATH)."""
    tz = os.environ.get("TZ")
    if tz is not None:  # TZ rules this process's local time, whatever the system's files say
        candidates = [tz.lstrip(":")]
    else:
        named = _read_name(timezone_file)
        candidates = []
        if localtime.is_symlink():
            candidates.append(str(localtime.resolve()).partition("/zoneinfo/")[2])
        elif localtime.is_file():
            folders = tuple(str(d) for d in (zoneinfo.TZPATH if zoneinfo_dirs is None else zoneinfo_dirs))
            same = zones_like(str(localtime), folders)
            # /etc/timezone's name first when it is one of them (the host's own choice among aliases)
            candidates += sorted(same, key=lambda name: name != named)
        candidates.append(named)
    for name in filter(None, candidates):
        try:
            time_zone_info(name)  # a POSIX rule such as "CET-1CEST" is no zone name
            return SiteZone(name)
        except ValueError:
            continue
    offset = datetime.now().astimezone().strftime("%z")
    zone = SiteZone(f"{offset[:3]}:{offset[3:]}", fixed_offset=True)
    log.warning("report.time_zone_fixed_offset", offset=zone.name, fix=_FIX)
    return zone


def _read_name(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


@functools.lru_cache(maxsize=8)
def zones_like(localtime: str, folders: tuple[str, ...]) -> tuple[str, ...]:
    """The zone names, best first, whose file in the first of ``folders`` that has any holds the same bytes
    as ``localtime``: canonical names first (a zone of the folder's tzdata.zi, zone1970.tab or zone.tab),
    then files before links, names with a region ("Europe/Zurich") before bare ones ("Japan"), then by name.
    Sizes are compared before bytes; the answer is kept for the process."""
    try:
        wanted = Path(localtime).read_bytes()
    except OSError:
        return ()
    for folder in folders:
        found: list[tuple[str, bool]] = []
        for directory, subfolders, files in os.walk(folder):
            top = directory == folder  # os.walk gives the folder first as it was given
            subfolders[:] = sorted(d for d in subfolders if not (top and d in _NOT_ZONES))
            prefix = Path(os.path.relpath(directory, folder)).as_posix()
            for file in files:
                if top and file in _NOT_ZONES:
                    continue
                path = os.path.join(directory, file)
                try:
                    if os.stat(path).st_size != len(wanted) or Path(path).read_bytes() != wanted:
                        continue
                except OSError:
                    continue
                found.append((file if prefix == "." else f"{prefix}/{file}", os.path.islink(path)))
        if found:
            canonical = _canonical_names(Path(folder))
            ranked = sorted(found, key=lambda f: (f[0] not in canonical, f[1], "/" not in f[0], f[0]))
            return tuple(name for name, _ in ranked)
    return ()


def _canonical_names(folder: Path) -> frozenset[str]:
    """The zones (not links) a zoneinfo folder lists: tzdata.zi's "Z" lines, the tables' third column."""
    names: set[str] = set()
    for table, column in (("tzdata.zi", 1), ("zone1970.tab", 2), ("zone.tab", 2)):
        try:
            lines = (folder / table).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            fields = line.split()
            if table == "tzdata.zi" and fields[:1] != ["Z"]:
                continue
            if len(fields) > column and not line.startswith("#"):
                names.add(fields[column])
    return frozenset(names)
