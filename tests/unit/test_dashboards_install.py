"""`diana dashboards install`: the credentials and CA of [opensearch] go to Dashboards, over https only."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from diana.cli import main


class Answer:
    def __init__(self, status: int):
        self.status_code = status

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise requests.HTTPError(f"{self.status_code} Client Error", response=self)  # type: ignore[arg-type]

    def json(self) -> dict:
        return {"success": True, "successCount": 25}


class Dashboards:
    """Stands in for requests.post to Dashboards: records each request, answers ``status``."""

    def __init__(self):
        self.sent: list[dict] = []
        self.status = 200

    def __call__(self, url: str, **kwargs) -> Answer:
        self.sent.append({"url": url, **kwargs})
        return Answer(self.status)


@pytest.fixture
def dashboards(monkeypatch) -> Dashboards:
    stand_in = Dashboards()
    monkeypatch.setattr(requests, "post", stand_in)
    monkeypatch.setenv("DIANA_OPENSEARCH_PASSWORD", "s3cret-pass")
    return stand_in


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "diana.toml"
    ca = tmp_path / "ca.pem"
    ca.write_text("not read by the stand-in\n")
    path.write_text(f'[opensearch]\nurl = "https://127.0.0.1:9200"\nusername = "diana"\nca_file = "{ca}"\n')
    return path


def test_install_sends_the_opensearch_credentials_and_ca_over_https(tmp_path, dashboards, capsys):
    config = _config(tmp_path)
    assert main(["--config", str(config), "dashboards", "install", "--url", "https://dash:5601"]) == 0
    [sent] = dashboards.sent
    assert sent["auth"] == ("diana", "s3cret-pass") and sent["verify"] == str(tmp_path / "ca.pem")
    assert "s3cret-pass" not in capsys.readouterr().out


def test_install_never_sends_them_in_the_clear(tmp_path, dashboards):
    assert main(["--config", str(_config(tmp_path)), "dashboards", "install", "--url", "http://127.0.0.1:5601"]) == 0
    assert dashboards.sent[0].get("auth") is None  # a guard: the password never goes over http


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_named_as_such(tmp_path, dashboards, capsys, status):
    dashboards.status = status
    assert main(["--config", str(_config(tmp_path)), "dashboards", "install", "--url", "https://dash:5601"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"diana dashboards: https://dash:5601 refused the credentials (HTTP {status}): check [opensearch] "
        "username (diana) and its password, and the user's rights"
    )
    assert "s3cret-pass" not in err
