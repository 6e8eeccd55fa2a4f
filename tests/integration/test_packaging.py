"""A non-editable install, as the Dockerfile does it, works on its own: every command answers --help and
the commands that read package data find it (no walking up from __file__ into a checkout)."""

from __future__ import annotations

import configparser
import json
import subprocess
import venv
from pathlib import Path

import pytest

from tests.support.paths import REPO

# Lists every command and sub-action of the installed parser, e.g. ["run"], ["cohort", "find"].
LIST_COMMANDS = """
import argparse, json
from diana.cli import build_parser

def walk(parser, prefix):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [path for name, p in subs[0].choices.items() for path in walk(p, prefix + [name])]

print(json.dumps(walk(build_parser(), [])))
"""


def _package_folders() -> dict[str, str]:
    """setup.cfg's package_dir, plus every folder below a mapped one that is a package."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    mapped = dict(
        (part.strip() for part in line.split("=", 1)) for line in config["options"]["package_dir"].strip().splitlines()
    )
    folders = {}
    for package, folder in mapped.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            name = ".".join([package, *relative.parts])
            folders.setdefault(name, str(init.parent.relative_to(REPO)))
    return folders


PACKAGE_FOLDERS = _package_folders()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with `pip install .` of the checkout (not -e): returns its bin folder."""
    env_dir = tmp_path_factory.mktemp("wheel-venv")
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    result = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return bin_dir


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    where = _run(
        installed, "python", "-c", "import diana.producers, diana.cli; print(diana.producers.__file__)", cwd=tmp_path
    )
    assert where.returncode == 0, where.stderr
    assert str(installed.parent) in where.stdout and str(REPO) not in where.stdout


def test_every_module_of_the_checkout_is_installed(installed, tmp_path):
    # setup.cfg lists each subpackage; a folder added without being listed would be missing here.
    code = "import diana, pkgutil; print('\\n'.join(m.name for m in pkgutil.walk_packages(diana.__path__, 'diana.')))"
    listed = _run(installed, "python", "-c", code, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    installed_modules = {"diana", *listed.stdout.split()}
    expected = set()
    for package, folder in PACKAGE_FOLDERS.items():
        for path in (REPO / folder).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            if name != "diana.cli.__main__":
                expected.add(name)
    assert expected - installed_modules == set()


def test_every_command_answers_help(installed, tmp_path):
    listed = _run(installed, "python", "-c", LIST_COMMANDS, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    commands = json.loads(listed.stdout)
    assert ["run"] in commands and ["cohort", "export"] in commands and len(commands) >= 16
    for command in [[], *commands]:
        result = _run(installed, "diana", *command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "usage: diana" in result.stdout, (command, result.stderr)


def test_dashboards_export_finds_its_declarations(installed, tmp_path):
    result = _run(installed, "diana", "dashboards", "export", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / "compose" / "dashboards" / "diana-star.ndjson").read_text()


def test_acceptance_finds_the_shared_reports_from_the_checkout(installed):
    # From the checkout's root, as the README says: the default folder is ../shared/acceptance/dose.
    result = _run(installed, "diana", "acceptance", cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " 0 mismatches" in result.stdout.splitlines()[-1]


def test_the_local_stack_finds_its_maven_pom(installed, tmp_path):
    # `diana stack install` copies the packaged pom to the cache before running Maven on it.
    code = (
        "from importlib import resources; "
        "print(len((resources.files('diana.compose.local') / 'kafka-pom.xml').read_bytes()))"
    )
    result = _run(installed, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0 and int(result.stdout) > 100, result.stderr
