"""Unit: incomplete multipart uploads. A failed upload whose abort fails too raises its own failure (the
abort's is logged); uploads older than a day under the store's prefix are aborted by the sweep, nothing
else. A real boto3 client against botocore's Stubber: the requests are checked against the S3 model, and
no server is needed (S3Proxy is exercised by the integration tests)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import ANY, Stubber

from diana.sinks.archive import sweep_stale_uploads
from diana.storage import FilesystemStore, S3Store, StorageError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PART = 5 * 1024**2


def _client():
    return boto3.client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        endpoint_url="http://s3.invalid",
    )


def _upload(key: str, upload_id: str, age: timedelta) -> dict:
    return {"Key": key, "UploadId": upload_id, "Initiated": NOW - age}


def test_uploads_older_than_a_day_under_the_prefix_are_aborted_and_nothing_else():
    client = _client()
    store = S3Store(client, "bucket", "archive/")
    with Stubber(client) as stub:
        stub.add_response(
            "list_multipart_uploads",
            {
                "Uploads": [
                    _upload("archive/1.2/1.2.3/old.dcm", "u-old", timedelta(days=3)),
                    _upload("archive/1.2/1.2.3/new.dcm", "u-new", timedelta(hours=2)),
                ],
                "IsTruncated": True,
                "NextKeyMarker": "archive/1.2/1.2.3/new.dcm",
                "NextUploadIdMarker": "u-new",
            },
            {"Bucket": "bucket", "Prefix": "archive/"},
        )
        stub.add_response(
            "abort_multipart_upload", {}, {"Bucket": "bucket", "Key": "archive/1.2/1.2.3/old.dcm", "UploadId": "u-old"}
        )
        stub.add_response(
            "list_multipart_uploads",
            {"Uploads": [_upload("archive/9/9/gone.dcm", "u-gone", timedelta(days=2))], "IsTruncated": False},
            {"Bucket": "bucket", "Prefix": "archive/", "KeyMarker": ANY, "UploadIdMarker": ANY},
        )
        # Completed or aborted by someone else meanwhile: skipped.
        stub.add_client_error("abort_multipart_upload", "NoSuchUpload", http_status_code=404)
        assert store.abort_stale_uploads(now=NOW) == ["1.2/1.2.3/old.dcm"]
        stub.assert_no_pending_responses()


def test_a_store_without_a_prefix_does_not_sweep_the_bucket():
    with pytest.raises(ValueError, match="without a prefix"):
        S3Store(_client(), "bucket").abort_stale_uploads(now=NOW)


def test_the_sweep_at_start_skips_folders_and_logs_a_store_that_cannot_be_listed(tmp_path):
    client = _client()
    s3 = S3Store(client, "bucket", "landing/")
    with Stubber(client) as stub:
        stub.add_client_error("list_multipart_uploads", "NotImplemented", http_status_code=501)
        assert sweep_stale_uploads([FilesystemStore(tmp_path), s3]) == 0
        stub.add_response(
            "list_multipart_uploads",
            {"Uploads": [_upload("landing/ab/x.dcm", "u1", timedelta(days=2))], "IsTruncated": False},
        )
        stub.add_response(
            "abort_multipart_upload", {}, {"Bucket": "bucket", "Key": "landing/ab/x.dcm", "UploadId": "u1"}
        )
        assert sweep_stale_uploads([s3]) == 1


def test_a_failed_upload_whose_abort_fails_raises_its_own_failure():
    client = _client()
    store = S3Store(client, "bucket", "archive/", part_size=PART)
    data = b"x" * (PART + 10)
    with Stubber(client) as stub:
        stub.add_response("create_multipart_upload", {"UploadId": "u1"})
        stub.add_client_error("upload_part", "InternalError", http_status_code=500)
        stub.add_client_error("abort_multipart_upload", "ServiceUnavailable", http_status_code=503)
        with pytest.raises(StorageError, match="calling the UploadPart operation"):
            store.put_stream("a/b.dcm", io.BytesIO(data))
        stub.assert_no_pending_responses()
