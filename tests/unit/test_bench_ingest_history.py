"""bench.ingest_history: the record of bench.ingest runs read back, target by target."""

from __future__ import annotations

import json
from pathlib import Path

from bench.ingest_history import main, read_runs, summary


def _write(
    folder: Path, name: str, when: str, storescp_s: float, targets: list[dict], floors: dict[str, float]
) -> None:
    runs = [{"receiver": "storescp", "associations": 1, "wall_s": storescp_s}]
    runs += [{"receiver": f"floor: {step}", "associations": 1, "wall_s": wall} for step, wall in floors.items()]
    runs.append({"receiver": "storescp", "associations": 4, "wall_s": 99.0})  # not the 1-association reference
    (folder / name).mkdir(parents=True)
    (folder / name / "results.json").write_text(json.dumps({"when": when, "runs": runs, "targets": targets}))


def _target(name: str, value: float | None, met: bool | None, floor: float | None, floor_met: bool | None) -> dict:
    return {"target": name, "value": value, "bound": "≤ 2", "met": met, "floor": floor, "floor_met": floor_met}


def test_targets_counted_over_runs_and_floors_as_ratios_to_the_same_runs_storescp(tmp_path: Path) -> None:
    _write(tmp_path, "a/r1", "2026-11-30T01:00:00+00:00", 2.0, [_target("wall", 5.0, False, 3.0, False)], {"bare": 3.0})
    _write(tmp_path, "b/r2", "2026-11-29T01:00:00+00:00", 1.0, [_target("wall", 1.5, True, 1.2, True)], {"bare": 1.5})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"when": "2026-11-30", "events": 1}))  # bench.reindex's

    runs = read_runs(tmp_path)
    assert [run.name for run in runs] == ["b/r2", "a/r1"]  # by time, not by folder
    assert [run.floor_ratios["floor: bare"] for run in runs] == [1.5, 1.5]
    text = summary(runs)
    assert "| wall | ≤ 2 | 2 | 1 | 1.5-5 | 1.2-3 | 1 |" in text
    assert "| bare | 2 | 1.5 |" in text
    assert [run.name for run in read_runs(tmp_path, since="2026-11-30")] == ["a/r1"]


def test_a_run_without_the_reference_has_no_figure_for_that_target(tmp_path: Path) -> None:
    _write(tmp_path, "r1", "2026-11-30T01:00:00+00:00", 1.0, [_target("rate", None, None, None, None)], {})
    _write(tmp_path, "r2", "2026-11-30T02:00:00+00:00", 1.0, [_target("rate", 3.5, True, 4.0, True)], {})
    assert "| rate | ≤ 2 | 1 | 1 | 3.5 | 4 | 1 |" in summary(read_runs(tmp_path))


def test_an_empty_folder_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["--folder", str(tmp_path)]) == 1
    assert "no bench.ingest results" in capsys.readouterr().err
