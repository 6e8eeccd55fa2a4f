"""The routing rules file: what it accepts, the errors it gives (naming the rule), and what matches."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.access.routing.rules import RulesError, load_rules, parse_rules
from diana.access.routing.service import destination_topics
from diana.access.routing.worker import study_files
from diana.storage.filesystem import FilesystemStore

DESTS = [
    {"name": "ws", "ae_title": "WS3D", "host": "10.0.0.5", "port": 11112},
    {"name": "web", "stow_url": "https://archive.example/dicom-web/studies", "deidentify_project": "LUNG"},
]
EVENT = {
    "modality": "CT",
    "calling_ae": "CT1",
    "station_name": "CTSTATION1 ",
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "body_part_examined": "CHEST",
    "study_description": "CT Thorax with contrast",
}


def rules(*rule: dict) -> list[dict]:
    return list(rule)


def test_a_rule_matches_when_every_condition_holds_case_and_spaces_ignored():
    parsed = parse_rules(
        {
            "destinations": DESTS,
            "rules": rules(
                {
                    "name": "ct",
                    "match": {
                        "modality": ["ct", "MR"],
                        "calling_ae": "ct1",
                        "station": ["ctstation1"],
                        "sop_class": ["1.2.840.10008.5.1.4.1.1.2"],
                        "body_part": "chest",
                        "study_description": "(?i)thorax",
                    },
                    "destinations": ["ws"],
                }
            ),
        }
    )
    rule = parsed.rules[0]
    assert rule.trigger == "instance"
    assert rule.matches(EVENT)
    assert not rule.matches({**EVENT, "modality": "US"})
    assert not rule.matches({**EVENT, "study_description": "CT head"})
    assert not rule.matches({**EVENT, "body_part_examined": None})  # a condition on a missing field does not hold


def test_triggers_and_the_topics_each_destination_consumes():
    parsed = parse_rules(
        {
            "destinations": DESTS,
            "rules": rules(
                {"name": "a", "match": {"modality": "CT"}, "destinations": ["ws"]},
                {"name": "b", "match": {"modality": "CT"}, "whole_study": True, "destinations": ["ws"]},
                {"name": "c", "match": {"dose_alert": True}, "destinations": ["web"]},
            ),
        }
    )
    assert [r.trigger for r in parsed.rules] == ["instance", "study", "alert"]
    # dose_alert rules also take the study records: the late instances of a study alerted before
    assert destination_topics(parsed) == {
        "ws": ["dicom.instances", "dicom.studies"],
        "web": ["dicom.studies", "dose.alerts"],
    }
    assert parsed.destinations["web"].kind == "stow"
    assert parsed.destinations["ws"].kind == "dicom"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"destinations": DESTS, "rules": [{"match": {}}]}, "rule 1 needs a name"),
        (
            {"destinations": DESTS, "rules": [{"name": "r", "match": {"colour": "red"}, "destinations": ["ws"]}]},
            "rule 'r': unknown match condition 'colour'",
        ),
        (
            {"destinations": DESTS, "rules": [{"name": "r", "match": {"modality": "CT"}, "destinations": ["nowhere"]}]},
            "rule 'r': no destination named 'nowhere'",
        ),
        (
            {
                "destinations": DESTS,
                "rules": [{"name": "r", "match": {"study_description": "(oops"}, "destinations": ["ws"]}],
            },
            "rule 'r': study_description is not a regular expression",
        ),
        (
            {
                "destinations": DESTS,
                "rules": [{"name": "r", "match": {"calling_ae": "X"}, "whole_study": True, "destinations": ["ws"]}],
            },
            "rule 'r': calling_ae is known for single instances only",
        ),
        (
            {"destinations": DESTS, "rules": [{"name": "r", "match": {"modality": []}, "destinations": ["ws"]}]},
            "rule 'r': match modality is a value or a list",
        ),
        ({"destinations": [{"name": "x", "host": "h", "port": 104}], "rules": []}, "destination 'x': needs ae_title"),
        (
            {"destinations": [{"name": "x", "ae_title": "X", "host": "h", "port": 70000}], "rules": []},
            "destination 'x': needs host and a port between 1 and 65535",
        ),
        ({"destinations": [{"name": "x", "stow_url": "ftp://h/"}], "rules": []}, "stow_url must be an http"),
        ({"destinations": [{"name": "bad name", "stow_url": "http://h/"}], "rules": []}, "destination 1 needs a name"),
        ({"destinations": [DESTS[0], DESTS[0]], "rules": []}, "destination 'ws' is defined twice"),
        ({"destinations": DESTS, "rules": []}, "no rules"),
    ],
)
def test_a_bad_rules_file_says_which_rule_and_what_to_change(raw: dict, message: str):
    with pytest.raises(RulesError, match=message.replace("(", r"\(")):
        parse_rules(raw)


def test_a_file_that_is_not_a_rules_file_names_the_file(tmp_path: Path):
    path = tmp_path / "routing.yaml"
    path.write_text("recipients: []\n")
    with pytest.raises(RulesError, match=r"unknown section 'recipients'; sections: destinations, rules"):
        load_rules(path)
    path.write_text("rules: [\n")
    with pytest.raises(RulesError, match="is not valid YAML"):
        load_rules(path)


def test_study_files_lists_archived_instances_by_valid_uid_only(tmp_path: Path):
    series = tmp_path / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    for name in ("1.2.3.4.5.dcm", "1.2.3.4.6.dcm", "1.2.3.4.5.0123456789ab.dcm", "notes.txt"):
        (series / name).write_bytes(b"")
    (tmp_path / "1.2.3" / "..hidden").mkdir()
    archive = FilesystemStore(tmp_path)
    found = study_files(archive, "1.2.3")
    assert sorted(d.sop_instance_uid for d in found) == ["1.2.3.4.5", "1.2.3.4.6"]
    assert {d.key for d in found} == {"1.2.3/1.2.3.4/1.2.3.4.5.dcm", "1.2.3/1.2.3.4/1.2.3.4.6.dcm"}
    assert {archive.path(d.key) for d in found} == {series / "1.2.3.4.5.dcm", series / "1.2.3.4.6.dcm"}
    assert study_files(archive, "../etc") == []


def test_status_shows_each_destinations_lag():
    from diana.operations.status import PipelineStatus, render_status

    text = render_status(PipelineStatus(routes={"workstation": {"dicom.instances": 42}, "qa": {"dose.alerts": 0}}))
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("ROUTING")))
    assert lines[start + 1].split() == ["workstation", "dicom.instances", "42"]
    assert lines[start + 2].split() == ["qa", "dose.alerts", "0"]


def test_a_worker_whose_broker_is_down_logs_one_line_and_starts_again():
    """`diana route` while Kafka was down logged a traceback every ~35 s; it says so in one line instead."""
    import threading

    import structlog
    from confluent_kafka import KafkaError, KafkaException

    from diana.access.routing.service import _run_forever

    stop = threading.Event()

    class BrokerDown:
        name = "PACS"
        runs = 0

        def run(self):
            self.runs += 1
            if self.runs == 2:
                stop.set()
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Connect to ipv4#127.0.0.1:1 failed"))

    worker = BrokerDown()
    with structlog.testing.capture_logs() as logs:
        _run_forever(worker, stop)
    assert worker.runs == 2
    assert [(e["event"], e["log_level"], e["destination"]) for e in logs] == [
        ("route.kafka_unavailable", "warning", "PACS")
    ] * 2
    assert all("exc_info" not in e and "Connect to ipv4#127.0.0.1:1 failed" in e["error"] for e in logs)


def test_route_check_prints_a_stow_url_without_its_password(tmp_path: Path, capsys):
    """`diana route --check` printed a STOW-RS destination's URL as written, its basic-auth password in it."""
    from diana.cli import main

    rules_file = tmp_path / "routing.yaml"
    rules_file.write_text(
        "destinations:\n"
        "  - name: web\n"
        "    stow_url: https://diana:s3cret-stow-pass@archive.example/dicom-web/studies\n"
        "rules:\n"
        "  - name: all-ct\n"
        "    match: {modality: CT}\n"
        "    destinations: [web]\n"
    )
    assert main(["route", "--check", "--rules", str(rules_file)]) == 0
    out = capsys.readouterr().out
    assert "s3cret-stow-pass" not in out
    assert "destination web: https://diana:***@archive.example/dicom-web/studies" in out
