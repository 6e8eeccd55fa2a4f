"""The research-export choices on the command line, and the de-identifier they build.

`add_arguments` declares the options of PS3.15 E.3 the user can choose (one flag each), the
project name that salts the pseudonyms and the opt-in for risky objects; `deidentifier_from`
checks the secret and builds the Deidentifier. The CLI only wires them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from diana.access.deid_options import DateOption, ProfileOptions
from diana.access.keyfiles import KeyFileError, read_site_secret

if TYPE_CHECKING:
    from diana.access.deid import Deidentifier

__all__ = ["add_arguments", "options_from", "deidentifier_from", "load_safe_private"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("research export (PS3.15 Annex E Basic Profile and its options; docs/COHORT.md)")
    g.add_argument(
        "--project", metavar="NAME", help="project name: pseudonyms, UIDs and date offsets are salted per project"
    )
    g.add_argument(
        "--dates",
        choices=[d.value for d in DateOption],
        default=DateOption.MODIFIED.value,
        help="modified: shift every date by the patient's offset (Retain Longitudinal, Modified Dates; default); "
        "full: keep dates (Full Dates); remove: the Basic Profile's table actions",
    )
    g.add_argument(
        "--retain-patient-characteristics",
        action="store_true",
        help="keep age, sex, size, weight... as they are (otherwise an age over 89 left anywhere, e.g. in an SR, is written 90)",
    )
    g.add_argument(
        "--retain-device-identity", action="store_true", help="keep station names, serial numbers, device UIDs"
    )
    g.add_argument("--retain-uids", action="store_true", help="keep the original UIDs")
    g.add_argument(
        "--retain-institution-identity", action="store_true", help="keep institution name, address, department"
    )
    g.add_argument(
        "--retain-safe-private",
        metavar="FILE",
        help="keep the private elements this file lists, one 'CREATOR,EE' or 'CREATOR,EE,VR' per line "
        "(EE: element byte, hex; VR: how to read it when the file says UN, e.g. SQ)",
    )
    g.add_argument(
        "--clean-descriptors", action="store_true", help="keep descriptions and comments, identifiers redacted"
    )
    g.add_argument(
        "--retain-descriptions", dest="clean_descriptors", action="store_true", help="the same as --clean-descriptors"
    )
    g.add_argument(
        "--clean-structured-content", action="store_true", help="keep SR content trees, identifiers redacted"
    )
    g.add_argument("--clean-graphics", action="store_true", help="keep graphic annotations, identifiers redacted")
    g.add_argument(
        "--allow-risky",
        action="store_true",
        help="also export burned-in, ultrasound, secondary capture, document, video and photo objects "
        "(marked PatientIdentityRemoved NO and listed: check their pixels by hand)",
    )


# The VRs a safe list may give (PS3.5 6.2): a third field that is none of them is not a VR.
_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
})  # fmt: skip
_WITH_VR = re.compile(r"(.+),\s*([0-9A-Fa-f]{1,2})\s*,\s*([A-Z]{2})")


def load_safe_private(path: Path) -> frozenset[tuple[str, int, str]]:
    """(creator, element byte, VR or "") of each line 'CREATOR,EE' or 'CREATOR,EE,VR' of ``path``."""
    entries: dict[tuple[str, int], str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _WITH_VR.fullmatch(line)
        if m and m[3] in _VRS:
            creator, sep, element, vr = m[1], ",", m[2], m[3]
        else:
            (creator, sep, element), vr = line.rpartition(","), ""
        try:
            value = int(element.strip(), 16)
        except ValueError:
            value = -1
        if not sep or not creator.strip() or not 0 <= value <= 0xFF:
            raise KeyFileError(
                f"{path} line {number}: expected 'CREATOR,EE' or 'CREATOR,EE,VR' (EE: the element byte in hex, "
                "e.g. 10; VR: e.g. SQ)"
            )
        key = (creator.strip(), value)
        before = entries.get(key, "")
        if before and vr and before != vr:
            raise KeyFileError(f"{path} line {number}: {key[0]},{value:02X} is listed before with another VR")
        entries[key] = before or vr
    if not entries:
        raise KeyFileError(f"{path} lists no private element: nothing would be retained")
    return frozenset((creator, element, vr) for (creator, element), vr in entries.items())


def options_from(args: argparse.Namespace) -> ProfileOptions:
    safe = load_safe_private(Path(args.retain_safe_private)) if args.retain_safe_private else frozenset()
    return ProfileOptions(
        dates=DateOption(args.dates),
        retain_patient_characteristics=args.retain_patient_characteristics,
        retain_device_identity=args.retain_device_identity,
        retain_uids=args.retain_uids,
        retain_safe_private=frozenset((creator, element) for creator, element, _ in safe),
        safe_private_vrs=frozenset(entry for entry in safe if entry[2]),
        retain_institution_identity=args.retain_institution_identity,
        clean_descriptors=args.clean_descriptors,
        clean_structured_content=args.clean_structured_content,
        clean_graphics=args.clean_graphics,
    )


def deidentifier_from(args: argparse.Namespace, secret_file: Path) -> Deidentifier:
    """Raise KeyFileError (or ValueError) with the fix when a choice is missing or unsafe."""
    if not args.project:
        raise KeyFileError("a research export needs --project NAME: pseudonyms are salted per project")
    # pydicom's modules: imported when an export needs them, not whenever the CLI declares its options
    from diana.access.deid import Deidentifier
    from diana.access.pseudonyms import ProjectKeys

    secret = read_site_secret(secret_file)
    return Deidentifier(ProjectKeys(secret, args.project), options_from(args), allow_risky=args.allow_risky)
