"""Unit: a failure while an S3 object's bytes arrive is the store's StorageError (retried), as one before them is.

botocore's own StreamingBody over a socket that resets half-way (urllib3's ProtocolError, which
botocore raises as ResponseStreamingError): not an OSError, so before, the archive sink took it for
the message's fault and dead-lettered the event. The S3 server itself is exercised by the S3Proxy
integration tests; this is the error mapping on bytes no server can be made to cut on cue.
"""

from __future__ import annotations

import io

import pytest
from botocore.response import StreamingBody
from urllib3.exceptions import ProtocolError

from diana.storage import S3Store, StorageError

DATA = b"DICM" * 4096


class _ResetAfterHalf(io.RawIOBase):
    def __init__(self) -> None:
        self.sent = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.sent:
            raise ProtocolError("Connection broken: ConnectionResetError(104, 'Connection reset by peer')")
        self.sent = True
        half = DATA[: len(DATA) // 2]
        buffer[: len(half)] = half
        return len(half)


class _Client:
    def __init__(self, raw: io.RawIOBase, length: int):
        self.raw, self.length = raw, length

    def get_object(self, Bucket: str, Key: str) -> dict:
        return {"Body": StreamingBody(self.raw, self.length)}


def test_a_connection_reset_mid_body_is_a_storage_error():
    store = S3Store(_Client(_ResetAfterHalf(), len(DATA)), "bucket", "landing/")
    with pytest.raises(StorageError, match="get a/b.dcm: .*reset by peer"), store.open("a/b.dcm") as stream:
        stream.read()


def test_a_body_shorter_than_announced_is_a_storage_error_and_a_whole_one_reads_as_a_file():
    short = S3Store(_Client(io.BytesIO(DATA[:100]), len(DATA)), "bucket")
    with pytest.raises(StorageError), short.open("k") as stream:
        stream.read()
    whole = S3Store(_Client(io.BytesIO(DATA), len(DATA)), "bucket")
    with whole.open("k") as stream:
        assert stream.read(4) == b"DICM" and stream.read() == DATA[4:]


def test_an_object_the_store_refuses_is_told_from_a_store_that_does_not_answer():
    """A 4xx that may be this object's alone (AccessDenied: an SSE-KMS key, another account's object, a Deny
    on one prefix; InvalidObjectState: cold storage; an SSE-C InvalidRequest; codes not named): StorageRefused,
    which a caller with a limit gives up on (before, AccessDenied and unknown codes were StorageError, retried
    for ever: one such object stalled the archive sink). Credentials, clock and timeout answers, 408/429,
    SlowDown and 5xx: StorageError, waited out. Both stay OSErrors."""
    from botocore.exceptions import ClientError

    from diana.storage import StorageRefused

    def answering(status: int, code: str):
        class Client:
            def get_object(self, Bucket: str, Key: str) -> dict:
                raise ClientError(
                    {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                    "GetObject",
                )

        return S3Store(Client(), "bucket")

    for status, code, kind in [
        (403, "InvalidObjectState", StorageRefused),  # this object moved to cold storage
        (400, "KeyTooLongError", StorageRefused),
        (403, "AccessDenied", StorageRefused),  # an SSE-KMS key, another account's object, a Deny on a prefix
        (403, "403", StorageRefused),  # a HEAD's refusal has no body: no code
        (400, "InvalidRequest", StorageRefused),  # SSE-C without its key
        (409, "SomethingNew", StorageRefused),  # a code not named
        # Credentials, the clock, a timeout, the store's load: they pass, retried, never dead-lettered.
        (403, "InvalidAccessKeyId", StorageError),
        (403, "SignatureDoesNotMatch", StorageError),
        (403, "RequestTimeTooSkewed", StorageError),
        (400, "ExpiredToken", StorageError),
        (400, "TokenRefreshRequired", StorageError),
        (400, "RequestTimeout", StorageError),
        (408, "RequestTimeout", StorageError),
        (408, "408", StorageError),
        (429, "TooManyRequests", StorageError),
        (503, "SlowDown", StorageError),
        (500, "InternalError", StorageError),
    ]:
        with pytest.raises(StorageError) as raised, answering(status, code).open("k"):
            pass
        assert type(raised.value) is kind, (status, code, type(raised.value))
    from diana.storage import ObjectNotFound

    with pytest.raises(ObjectNotFound), answering(404, "NoSuchKey").open("k"):  # a FileNotFoundError
        pass
