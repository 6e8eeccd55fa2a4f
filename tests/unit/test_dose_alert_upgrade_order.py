"""Upgrade order of DoseAlert v3: a reader of the release before (delivery worker, OpenSearch sink)
still reads every alert a v3 dose worker writes without the v3 fields.

Before: the dose worker wrote every alert with v3; a reader of the release before knows writer
schemas by fingerprint only, so it could decode none ("unknown writer schema fingerprint"), logged
each undecodable and committed past it: alerts never sent. The reader here is the real Codec built
from the schema folder of that release (cb030e9: every current file, with dose_alert.avsc as it was
then, which is today's dose_alert.v2.avsc, byte for byte)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diana.schemas.codec import Codec, DecodeError, EncodeError, default_codec
from diana.stream_apps.dose.agent import alert_bytes
from tests.support.schema_versions import DOSE_ALERT as _ALERT
from tests.support.schema_versions import codec_of_release_before


@pytest.fixture
def reader_before(tmp_path: Path) -> Codec:
    """The codec of the release before DoseAlert v3."""
    return codec_of_release_before(tmp_path, "dose_alert.v2.avsc")


def test_a_reader_of_the_release_before_reads_a_plain_alert(reader_before):
    _, record = reader_before.decode(alert_bytes(default_codec(), _ALERT), expect="DoseAlert")
    assert record["alert_id"] == "a1" and record["value"] == 1200.0 and record["superseded_by"] is None


def test_a_reader_of_the_release_before_reads_a_withdrawal_without_a_reason(reader_before):
    withdrawal = {**_ALERT, "revision": 2, "superseded_by": "1.2.3.9"}
    _, record = reader_before.decode(alert_bytes(default_codec(), withdrawal), expect="DoseAlert")
    assert record["superseded_by"] == "1.2.3.9"


def test_a_withdrawal_with_a_reason_is_v3_which_only_an_upgraded_reader_reads(reader_before):
    withdrawal = {**_ALERT, "superseded_by": "1.2.3.9", "withdrawn_reason": "under_limit", "replaced_value": 800.0}
    data = alert_bytes(default_codec(), withdrawal)
    _, record = default_codec().decode(data, expect="DoseAlert")
    assert (record["withdrawn_reason"], record["replaced_value"]) == ("under_limit", 800.0)
    with pytest.raises(DecodeError, match="unknown writer schema"):
        reader_before.decode(data, expect="DoseAlert")  # hence readers first (docs/DOSE.md)


def test_a_plain_alert_read_by_the_current_codec_has_the_v3_fields_null():
    _, record = default_codec().decode(alert_bytes(default_codec(), _ALERT), expect="DoseAlert")
    assert record["withdrawn_reason"] is None and record["replaced_value"] is None and record["alert_id"] == "a1"


def test_encode_with_a_version_the_codec_does_not_have_is_refused():
    with pytest.raises(EncodeError, match="v9"):
        default_codec().encode("DoseAlert", _ALERT, version=9)
