"""The two files that can re-identify a research export: the site secret and the key file.

The site secret is refused when anyone but its owner can read it (the fix is printed). The key
file (pseudonym -> original identity) is created private (mode 600 from its first byte, not made
private afterwards), atomically, and never inside the export it de-identifies.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import uuid
from pathlib import Path

from diana.durable import fsync_dir
from diana.spreadsheet_csv import quote_cell

__all__ = ["KeyFileError", "read_site_secret", "check_key_file_place", "write_private"]

KEY_COLUMNS = (
    "project",
    "original_patient_id",
    "original_patient_name",
    "pseudonym_patient_id",
    "pseudonym_patient_name",
)


class KeyFileError(ValueError):
    """A secret or key file that would leak: the message says what to change."""


def read_site_secret(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"site secret {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"site secret {path} is not a regular file")
    if mode & 0o077:
        raise KeyFileError(
            f"site secret {path} can be read by others (mode {stat.S_IMODE(mode):03o}): run 'chmod 600 {path}'"
        )
    secret = path.read_bytes()
    if len(secret) < 16:
        raise KeyFileError(
            f"site secret {path} holds {len(secret)} bytes, at least 16 are needed: "
            f"'head -c 32 /dev/urandom > {path}; chmod 600 {path}'"
        )
    return secret


def check_key_file_place(key_file: Path, export_target: Path) -> None:
    """Refuse a key file inside (or equal to) the export: whoever gets the export would get the key."""
    key = key_file.resolve()
    target = export_target.resolve()
    if key == target or target in key.parents:
        raise KeyFileError(f"the key file {key_file} would be inside the export {export_target}: put it elsewhere")
    # Checked before the export runs: found only when the key is written, the export would be done and its
    # key (the way back to the patients) not kept.
    if key.is_dir():
        raise KeyFileError(f"the key file {key_file} is a folder: name a file, e.g. {key_file}/key.csv")


def key_csv(rows: list[dict]) -> bytes:
    """The key file's CSV; an original ID or name a spreadsheet would run as a formula is quoted
    (diana.spreadsheet_csv: nothing in diana-star reads the key file back)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=KEY_COLUMNS)
    writer.writeheader()
    writer.writerows({k: quote_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue().encode()


def write_private(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, mode 600 from creation (no moment with the umask's mode)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
