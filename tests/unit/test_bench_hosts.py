"""bench/hosts.py: the two-node layout gives each pipeline process a host of its own (no service needed)."""

from __future__ import annotations

from pathlib import Path

from bench.hosts import NodesSuite, host_names
from diana.config import Config, load_config


def _configs(tmp_path: Path) -> dict[str, Config]:
    suite = NodesSuite(tmp_path, short=True, instances=10, associations=2, nodes=2)
    return {name: load_config(suite.provision(name), environ=suite.s3_keys()) for name in host_names(2)}


def test_two_of_every_pipeline_process_with_two_dose_workers() -> None:
    names = host_names(2)
    for role in ("receiver", "aggregates", "archive-sink", "opensearch-sink", "dose"):
        assert f"{role}-1" in names and f"{role}-2" in names
    assert len(names) == len(set(names)) == 10


def test_no_local_path_is_shared_between_two_hosts(tmp_path: Path) -> None:
    configs = _configs(tmp_path)
    seen: dict[Path, str] = {}
    for name, cfg in configs.items():
        for path in (
            cfg.storage.landing_dir,
            cfg.storage.archive_dir,
            cfg.storage.quarantine_dir,
            cfg.stream.data_dir,
        ):
            resolved = cfg.path(path).resolve()
            assert resolved.is_relative_to(tmp_path / "hosts" / name), (name, resolved)
            assert resolved not in seen, f"{name} and {seen.get(resolved)} share {resolved}"
            seen[resolved] = name


def test_hosts_share_the_bucket_and_the_ae_title_but_not_ports_or_worker_ids(tmp_path: Path) -> None:
    configs = _configs(tmp_path)
    receivers = [configs["receiver-1"], configs["receiver-2"]]
    assert {c.receiver.ae_title for c in receivers} == {"DIANA"}
    assert len({c.receiver.port for c in receivers}) == 2
    workers = [configs["aggregates-1"], configs["aggregates-2"]]
    assert [c.stream.worker_id for c in workers] == ["aggregates-1", "aggregates-2"]
    assert len({c.stream.web_port for c in workers}) == 2
    doses = [configs["dose-1"], configs["dose-2"]]
    assert len({c.dose.web_port for c in doses}) == 2
    assert len({c.path(c.dose.alert_rules) for c in doses}) == 2  # each host its own copy of the rules
    for cfg in configs.values():
        assert cfg.storage.backend == "s3"
        assert cfg.storage.s3_bucket == "diana-faults"
        assert cfg.storage.s3_access_key_id  # from the environment, not a file
        assert not cfg.storage.s3_credentials_file
        assert len(cfg.kafka.bootstrap.split(",")) == 3
