"""As root, the local stack keeps OpenSearch under /var/lib/diana-star, one folder per stack home; the
folders of homes that are gone are removed when a stack starts (compose/local/stack.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from diana.compose.local.stack import STACK_HOME_MARK, prune_orphaned_opensearch_dirs


def _folder(root: Path, name: str, home: Path | None) -> Path:
    folder = root / f"opensearch-{name}"
    (folder / "opensearch-2.19.4" / "bin").mkdir(parents=True)
    (folder / "data").mkdir()
    if home is not None:
        (folder / STACK_HOME_MARK).write_text(str(home))
    return folder


def test_only_the_folders_of_homes_that_are_gone_and_unused_are_removed(tmp_path: Path):
    root, live_home = tmp_path / "var-lib", tmp_path / "clone" / "var" / "test"
    live_home.mkdir(parents=True)
    gone = _folder(root, "gone", tmp_path / "deleted-clone" / "var" / "test")
    live = _folder(root, "live", live_home)
    unmarked = _folder(root, "unmarked", None)  # made before the mark existed: whose it is, unknown
    running = _folder(root, "running", tmp_path / "deleted-bench-work" / "stack")
    # A process naming the folder on its command line, as OpenSearch's java names its home.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(running / "opensearch-2.19.4")])
    try:
        assert prune_orphaned_opensearch_dirs(root) == [gone]
    finally:
        proc.kill()
        proc.wait()
    assert not gone.exists() and live.exists() and unmarked.exists() and running.exists()
    assert prune_orphaned_opensearch_dirs(root) == [running]  # once its process has ended
