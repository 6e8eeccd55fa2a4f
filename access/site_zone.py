"""The site's zone: where `diana report`'s days start at midnight and the dose survey's today is.

``site_time_zone``: ``[report] time_zone``, else this host's zone (``host_zone``): its IANA name from
``TZ`` (a name, or a file named as /etc/localtime is), the link /etc/localtime, the zoneinfo file whose
bytes /etc/localtime (or a link's target that names no zone) copies (container images and some VMs copy
it instead of linking it), or /etc/timezone; else, said as such in the log and the report, its UTC
offset now, which does not follow summer time.
"""

from __future__ import annotations

import functools
import itertools
import os
import stat
import zoneinfo
from collections.abc import Iterable, Iterator, Sequence
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
_TZIF = b"TZif"  # what every compiled zoneinfo file starts with (RFC 8536)
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
    A TZ that is a file (``:/etc/localtime``, ``/usr/share/zoneinfo/Europe/Zurich``) is named as
    ``localtime`` is. ``zoneinfo_dirs``: where a copy's name is looked for (default: those Python reads,
    zoneinfo.TZPATH)."""
    folders = tuple(str(d) for d in (zoneinfo.TZPATH if zoneinfo_dirs is None else zoneinfo_dirs))
    tz = os.environ.get("TZ")
    candidates: Iterable[str]
    if tz is not None:  # TZ rules this process's local time, whatever the system's files say
        spec = tz.removeprefix(":")
        candidates = _names_of_file(Path(spec), folders) if spec.startswith("/") else [spec]
    else:
        named = _read_name(timezone_file)
        candidates = itertools.chain(_names_of_file(localtime, folders, preferred=named), [named])
    for name in filter(None, candidates):  # lazily: a copy's search only when no name before it is a zone
        try:
            time_zone_info(name)  # a POSIX rule such as "CET-1CEST" is no zone name
            return SiteZone(name)
        except ValueError:
            continue
    offset = datetime.now().astimezone().strftime("%z")
    zone = SiteZone(f"{offset[:3]}:{offset[3:]}", fixed_offset=True)
    log.warning("report.time_zone_fixed_offset", offset=zone.name, fix=_FIX)
    return zone


def _names_of_file(path: Path, folders: tuple[str, ...], preferred: str = "") -> Iterator[str]:
    """The zone names of the zoneinfo file ``path`` (/etc/localtime, or TZ's file), best first: the
    name of where it lies in a zoneinfo folder (a link's target, which may be in none: a Kubernetes
    ConfigMap's file), then those of the files of ``folders`` with its bytes, ``preferred`` first."""
    if path.is_symlink():
        path = path.resolve()
    yield _name_in_folder(path, folders)
    same = zones_like(str(path), folders)
    # /etc/timezone's name first when it is one of them (the host's own choice among aliases)
    yield from sorted(same, key=lambda name: name != preferred)


def _name_in_folder(path: Path, folders: tuple[str, ...]) -> str:
    """The zone name of a file in one of ``folders`` (else in a folder named zoneinfo), "" if none; without
    a leading posix/ or right/ (OpenSearch's Java knows no "posix/Europe/Zurich")."""
    for folder in folders:
        for root in dict.fromkeys((Path(folder), Path(folder).resolve())):
            if path.is_relative_to(root) and path != root:
                name = path.relative_to(root).as_posix()
                break
        else:
            continue
        break
    else:
        name = path.as_posix().partition("/zoneinfo/")[2]
    first, _, rest = name.partition("/")
    if first in ("posix", "right") and rest:
        name = rest
    return "" if name in _NOT_ZONES else name


def _read_name(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _regular_bytes(path: str) -> bytes | None:
    """The bytes of ``path`` if it is a regular file, else None (a FIFO is opened without waiting and not
    read, a device not read); None too when it cannot be read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since
            return None
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError:
        return None
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=8)
def zones_like(localtime: str, folders: tuple[str, ...]) -> tuple[str, ...]:
    """The zone names, best first, whose file in the first of ``folders`` that has any holds the same bytes
    as ``localtime``, a regular file of TZif data (else none: an empty file would match every empty one):
    zones first (tzdata.zi's "Z" lines; without tzdata.zi, zone1970.tab's), among them zone1970.tab's,
    then files before links, names with a region ("Europe/Zurich") before bare ones ("Japan"), then by
    name. Only regular files are read, sizes compared first; the answer is kept for the process."""
    wanted = _regular_bytes(localtime)
    if not wanted or not wanted.startswith(_TZIF):
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
                    info = os.stat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_size != len(wanted) or _regular_bytes(path) != wanted:
                    continue
                found.append((file if prefix == "." else f"{prefix}/{file}", os.path.islink(path)))
        if found:
            zones, first = _canonical_names(Path(folder))
            ranked = sorted(found, key=lambda f: (f[0] not in zones, f[0] not in first, f[1], "/" not in f[0], f[0]))
            return tuple(name for name, _ in ranked)
    return ()


def _canonical_names(folder: Path) -> tuple[frozenset[str], frozenset[str]]:
    """The zones (not links) of a zoneinfo folder, and zone1970.tab's among them.

    The zones: tzdata.zi's "Z" lines where the folder has tzdata.zi, else zone1970.tab's third column;
    never zone.tab, which lists a country's link (Europe/Guernsey, Europe/Vaduz) as its zone. The second
    set orders zones of the same bytes: built with backzone, tzdata.zi has Europe/Guernsey as a zone of
    its own (other before 1970), zone1970.tab only Europe/London, of GB, GG, IM and JE."""
    zone1970 = _table_names(folder / "zone1970.tab", 2)
    zi = _table_names(folder / "tzdata.zi", 1, kind="Z")
    return (zone1970 if zi is None else zi) or frozenset(), zone1970 or frozenset()


def _table_names(path: Path, column: int, kind: str | None = None) -> frozenset[str] | None:
    """The names in ``column`` of a table's lines (only those whose first field is ``kind``, if given);
    None without the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    names: set[str] = set()
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) <= column or (kind is not None and fields[0] != kind):
            continue
        names.add(fields[column])
    return frozenset(names)
