"""The S3-compatible object store (boto3): one bucket, each store a key prefix in it.

Verification: the store hashes (SHA-256) every byte it sends and sends each request's or part's
Content-MD5, which the server checks on receipt; the SHA-256 goes with the object as metadata
(``x-amz-meta-sha256``). A multipart upload is completed only when the whole stream had the
expected SHA-256, otherwise aborted, so a wrong object never becomes visible. A single PUT of a
wrong stream is never sent: below the part size the bytes are hashed before the request.

Atomicity and concurrent writers: S3 makes an object visible whole at the end of its PUT or
CompleteMultipartUpload, and the last one to finish wins. Content-addressed keys are therefore
idempotent without conditional requests (S3Proxy 2.6 ignores ``If-None-Match``).

Incomplete multipart uploads: a failed upload is aborted; an abort that fails too (the store went
away) is logged (``s3.abort_failed``) and the upload's parts stay stored, invisible and billed, as they
do when the process dies mid-upload. ``abort_stale_uploads`` aborts those of this store's prefix
started more than a day before (the archive sink runs it when it starts); the bucket's
``AbortIncompleteMultipartUpload`` lifecycle rule (docs/OPERATIONS.md) is the lasting remedy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn, cast

import structlog

from diana.storage.base import (
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageRefused,
    check_key,
)

__all__ = ["S3Store", "S3_MAX_COPY_BYTES", "STALE_UPLOAD_S", "READ_AHEAD"]

log = structlog.get_logger("diana.storage.s3")

# CopyObject copies at most 5 GiB; larger objects are copied part by part (UploadPartCopy).
S3_MAX_COPY_BYTES = 5 * 1024**3
# S3 parts are at least 5 MiB (but the last).
_MIN_PART = 5 * 1024**2
# A multipart upload of diana's started this long ago is dead: its writer failed or died (an object's
# upload takes minutes at most).
STALE_UPLOAD_S = 24 * 3600.0
# A seekable read (open_seekable) fetches at least this much per request: pydicom reads a header in many
# small reads, each of which would otherwise be a request.
READ_AHEAD = 1 << 20


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


# The 4xx answers that are not about the object asked for: credentials, the clock, a timeout, which pass
# (refreshed credentials, a fixed clock, a retry), retried as the store's trouble (StorageError), with 408,
# 429, 5xx and SlowDown. Every other 4xx (AccessDenied, InvalidObjectState, an SSE-C InvalidRequest, codes
# not named here) is StorageRefused: it may be this object's alone (an SSE-KMS key it cannot use, another
# account's object, a Deny policy on one prefix, Object Lock refusing a delete), and a caller with a limit
# gives up on it rather than stall every later object. A store refusing every object is bounded by the
# caller (the archive sink pauses giving up after ten: sinks/archive.py).
_PASSING_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "RequestTimeout",
        "SlowDown",
    }
)


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _refused(exc: Exception) -> bool:
    """A 4xx answer other than credentials, the clock, a timeout or a slow-down (408, 429): the store is
    there and says no to this object (AccessDenied, InvalidObjectState for one moved to cold storage).
    (NoSuchKey / 404 is ObjectNotFound, checked before.)"""
    response = getattr(exc, "response", None) or {}
    status = _status(exc)
    code = str(response.get("Error", {}).get("Code", ""))
    return 400 <= status < 500 and status not in (408, 429) and code not in _PASSING_CODES


class _Errors:
    """Turns botocore's failures into the store's: NotFound → ObjectNotFound, a failed If-Match (412: only
    the reads pinned to one version ask it) → ObjectChanged, an object's own refusal → StorageRefused, the
    rest → StorageError (retry)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or isinstance(exc, (ObjectNotFound, IntegrityError, ValueError, StorageError)):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, SSLError

        if isinstance(exc, ClientError) and _is_not_found(exc):
            raise ObjectNotFound(f"no object {self.what}") from None
        if isinstance(exc, SSLError):
            # A server certificate the client does not trust: say which setting decides it.
            raise StorageError(
                f"object store: {self.what}: TLS verification failed ({exc}); the S3 server's certificate is "
                "not signed by the CA in [storage] s3_ca_file (the system's CAs when it is empty): set "
                "s3_ca_file to the CA that signed it"
            ) from None
        if isinstance(exc, ClientError) and _status(exc) == 412:
            raise ObjectChanged(
                f"object store: {self.what}: the object was replaced while it was read (its ETag changed)"
            ) from None
        if isinstance(exc, ClientError) and _refused(exc):
            raise StorageRefused(f"object store: {self.what}: {exc}") from None
        if isinstance(exc, (ClientError, BotoCoreError)):
            # botocore's messages name the operation and the error code, never the credentials.
            raise StorageError(f"object store: {self.what}: {exc}") from None
        from urllib3.exceptions import HTTPError

        if isinstance(exc, HTTPError):
            # Raised by the connection while a body is read (an SSLError, a protocol error): botocore's
            # StreamingBody passes it on as it is, and unmapped it read as the object's fault.
            raise StorageError(f"object store: {self.what}: the connection failed ({type(exc).__name__})") from None
        return False


class _Body(io.RawIOBase):
    """A GET's body whose failures while its bytes arrive (a connection reset, a read timeout, a body
    shorter than announced: botocore's ResponseStreamingError, ReadTimeoutError, IncompleteReadError)
    are the store's StorageError, as a failure before them is: the caller retries, where an unknown
    error would have had the sink dead-letter the event."""

    def __init__(self, body: Any, what: str):
        self.body, self.what = body, what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with _Errors(self.what):
            return int(self.body.readinto(buffer))

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class _RangedObject(io.RawIOBase):
    """One version of an S3 object, read-only and seekable, read by ranged GETs (``open_seekable``).

    The first GET (its first ``read_ahead`` bytes) gives the object's size (Content-Range) and its ETag;
    every later GET carries ``If-Match`` with that ETag, so an object replaced meanwhile fails the read
    (412: ObjectChanged) rather than give the new version's bytes at the old one's offsets. Every later
    answer must carry that ETag too: one of another ETag (a server that ignores If-Match) is ObjectChanged
    as well; one without an ETag is refused (StorageError, logged as ``s3.answer_without_etag``: such a
    server answers every retry so), as is one of another range than asked (a server that ignores Range). A read of ``read_ahead`` bytes or more is one GET of exactly those bytes, straight into
    the caller's buffer; a smaller one fetches ``read_ahead`` bytes from where it starts and keeps them
    (the window) for the reads after it (pydicom reads a header 4 and 8 bytes at a time). The first
    ``read_ahead`` bytes stay too while it is open: readers come back to the header (pydicom's
    pixel_array reads it again for each frame). A read returns every byte asked for up to the end of
    the object, as a buffered file's does. ``read_exact`` reads without reading ahead, for a reader
    that knows the bytes after what it reads are of no use to it.

    Not an io.BufferedReader, and without a ``name``, on purpose: pydicom reads a value it deferred from
    a BufferedReader by opening its ``name`` again as a local file, and from any other stream through that
    stream (pydicom.dataset.FileDataset), here this one. ``requests`` and ``fetched`` count the GETs and
    the bytes they brought."""

    def __init__(self, client: Any, bucket: str, full_key: str, key: str, read_ahead: int = READ_AHEAD):
        if read_ahead < 1:
            raise ValueError(f"read_ahead is at least 1 byte, not {read_ahead}")
        super().__init__()
        self._client, self._bucket, self._full_key, self._key = client, bucket, full_key, key
        self._what = f"get {key}"
        self.read_ahead = read_ahead
        self.requests = 0
        self.fetched = 0
        self._position = 0
        self._head = b""  # the object's first bytes, from the first request
        self._window = b""  # bytes of the object from _window_start, fetched ahead
        self._window_start = 0
        self.size, self.etag = self._first_window()

    # -------------------------------------------------------------- io.RawIOBase
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence}; 0, 1 or 2)")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        wanted = max(0, min(len(view), self.size - self._position))
        done = 0
        for held_start, held in ((0, self._head), (self._window_start, self._window)):
            offset = self._position + done - held_start
            if done < wanted and 0 <= offset < len(held):
                count = min(wanted - done, len(held) - offset)
                view[done : done + count] = held[offset : offset + count]
                done += count
        rest, start = wanted - done, self._position + done
        if rest >= self.read_ahead:  # a large read: one request, into the caller's buffer
            self._fetch_into(start, view[done:wanted])
        elif rest:
            self._window = self._fetch(start, min(self.read_ahead, self.size - start))
            self._window_start = start
            view[done:wanted] = self._window[:rest]
        self._position += wanted
        return wanted

    def read_exact(self, size: int) -> bytes:
        """``read(size)`` without reading ahead: bytes not held are fetched alone, in one request of exactly
        those bytes (at most ``size``, fewer at the end of the object), and the window is left as it is. For
        a reader that knows the bytes after these are of no use to it (wado.py's walk of an encapsulated
        value's item headers over fragments longer than ``read_ahead``: a window would be the data it skips)."""
        self._check_open()
        wanted = max(0, min(size, self.size - self._position))
        start = self._position
        for held_start, held in ((0, self._head), (self._window_start, self._window)):
            if held_start <= start and start + wanted <= held_start + len(held):
                self._position += wanted
                return bytes(held[start - held_start : start - held_start + wanted])
        buffer = bytearray(wanted)
        if wanted:
            self._fetch_into(start, memoryview(buffer))
        self._position += wanted
        return bytes(buffer)

    def readall(self) -> bytes:
        """The rest of the object, in one request."""
        buffer = bytearray(max(0, self.size - self.tell()))
        return bytes(buffer[: self.readinto(buffer)])

    def close(self) -> None:
        self._head = self._window = b""
        super().close()

    # -------------------------------------------------------------- requests
    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed object view")

    def _first_window(self) -> tuple[int, str]:
        """(size, ETag) of the object as it is now, its first bytes kept (the head)."""
        from botocore.exceptions import ClientError

        with _Errors(self._what):
            try:
                answer = self._get(Range=f"bytes=0-{self.read_ahead - 1}")
            except ClientError as exc:
                if _status(exc) != 416:
                    raise
                answer = None  # an empty object: no byte for a range to name
            if answer is None:
                head = self._client.head_object(Bucket=self._bucket, Key=self._full_key)
                return int(head["ContentLength"]), self._etag_of(head)
            etag = self._etag_of(answer)
            found = _CONTENT_RANGE.match(str(answer.get("ContentRange") or ""))
            # Without a Content-Range the server sent the whole object: its first bytes are the window.
            size = int(found.group(3)) if found else int(answer["ContentLength"])
            if found and int(found.group(1)) != 0:
                answer["Body"].close()
                raise StorageError(f"object store: {self._what}: answered {found.group(0)} for bytes from 0")
            self._head = self._receive(answer, min(self.read_ahead, size))
            return size, etag

    def _fetch(self, start: int, count: int) -> bytes:
        buffer = bytearray(count)
        self._fetch_into(start, memoryview(buffer))
        return bytes(buffer)

    def _fetch_into(self, start: int, into: memoryview) -> None:
        """Fill ``into`` with the object's bytes from ``start``, of the version first read (If-Match)."""
        end = start + len(into) - 1
        try:
            with _Errors(self._what):
                answer = self._get(Range=f"bytes={start}-{end}", IfMatch=self.etag)
        except ObjectNotFound:
            raise ObjectChanged(f"object store: {self._what}: the object was deleted while it was read") from None
        with _Errors(self._what):
            # Checked whatever If-Match did: a server (or a proxy before it) that ignores If-Match answers
            # the new version. An answer without an ETag cannot be shown to be of the version first read:
            # never stitched to the bytes already read. Not "changed; retry" either: such a server
            # answers every retry so; a storage error, logged with its cause.
            etag = answer.get("ETag")
            if not etag:
                answer["Body"].close()
                self._no_etag("a later answer")
            if etag != self.etag:
                answer["Body"].close()
                raise ObjectChanged(f"object store: {self._what}: the object was replaced while it was read")
            found = _CONTENT_RANGE.match(str(answer.get("ContentRange") or ""))
            if not found or (int(found.group(1)), int(found.group(2)), int(found.group(3))) != (start, end, self.size):
                answer["Body"].close()
                got = found.group(0) if found else "no Content-Range"
                raise StorageError(f"object store: {self._what}: asked bytes {start}-{end}/{self.size}, answered {got}")
            self._receive_into(answer, into)

    def _get(self, **conditions: str) -> dict:
        self.requests += 1
        return cast(dict, self._client.get_object(Bucket=self._bucket, Key=self._full_key, **conditions))

    def _etag_of(self, answer: dict) -> str:
        etag = answer.get("ETag")
        if not etag:
            if "Body" in answer:
                answer["Body"].close()
            self._no_etag("the first answer")
        return str(etag)

    def _no_etag(self, which: str) -> NoReturn:
        """StorageError for an answer without an ETag, logged: the server's (or a proxy's) doing, which a
        retry does not change. The log names the bucket and the store's prefix, not the key (its UIDs)."""
        log.error(
            "s3.answer_without_etag",
            bucket=self._bucket,
            prefix=self._full_key[: len(self._full_key) - len(self._key)],
            answer=which,
            fix="the object store or a proxy before it drops the ETag header; ranged reads need it on every answer",
        )
        raise StorageError(
            f"object store: {self._what}: {which} has no ETag, so its ranged reads cannot be kept to one version"
        )

    def _receive(self, answer: dict, count: int) -> bytes:
        buffer = bytearray(count)
        self._receive_into(answer, memoryview(buffer))
        return bytes(buffer)

    def _receive_into(self, answer: dict, into: memoryview) -> None:
        """Fill ``into`` from the answer's body, then close it: read to its end, its connection goes back to
        the pool (a whole object sent for a range is cut there, its connection closed)."""
        body = answer["Body"]
        try:
            filled = 0
            while filled < len(into):
                count = body.readinto(into[filled:])
                if not count:
                    raise StorageError(f"object store: {self._what}: the answer ended {len(into) - filled} bytes short")
                filled += count
                self.fetched += count
        finally:
            body.close()


class S3Store:
    def __init__(self, client: Any, bucket: str, prefix: str = "", part_size: int = 16 * 1024**2):
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"an S3 store prefix ends with '/': {prefix!r}")
        if part_size < _MIN_PART:
            raise ValueError(f"S3 parts are at least 5 MiB; part size {part_size} is too small")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.max_copy_bytes = S3_MAX_COPY_BYTES

    def __repr__(self) -> str:
        return f"S3Store({self.uri('')!r})"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    # ------------------------------------------------------------------ put
    def put_file(self, key: str, source: Path, sha256: str | None = None, link: bool = False) -> str:
        with open(source, "rb") as stream:
            return self.put_stream(key, stream, sha256)

    def put_stream(self, key: str, stream: BinaryIO, sha256: str | None = None) -> str:
        full = self._key(key)
        first = _read_full(stream, self.part_size)
        second = _read_full(stream, self.part_size) if len(first) == self.part_size else b""
        with _Errors(f"put {key}"):
            if not second:
                actual = hashlib.sha256(first).hexdigest()
                if sha256 is not None and actual != sha256:
                    raise IntegrityError(f"the bytes for {key} do not have the expected SHA-256; not stored")
                self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=first, ContentMD5=_md5_b64(first), Metadata={"sha256": actual}
                )
                return actual
            return self._multipart(full, key, first, second, stream, sha256)

    def _multipart(
        self, full: str, key: str, first: bytes, second: bytes, stream: BinaryIO, expected: str | None
    ) -> str:
        # The SHA-256 is known only at the end: it goes into the metadata if the caller gave it (the
        # upload is completed only if the bytes match it); without it, readers hash the bytes.
        metadata = {"sha256": expected} if expected else {}
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata=metadata)["UploadId"]
        digest = hashlib.sha256()
        parts = []
        try:
            chunk, number = first, 1
            pending = second
            while chunk:
                digest.update(chunk)
                etag = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload,
                    PartNumber=number,
                    Body=chunk,
                    ContentMD5=_md5_b64(chunk),
                )["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
                chunk, number = pending, number + 1
                pending = _read_full(stream, self.part_size) if pending else b""
            actual = digest.hexdigest()
            if expected is not None and actual != expected:
                raise IntegrityError(f"the bytes for {key} do not have the expected SHA-256; not stored")
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self._abort(full, upload)
            raise
        return actual

    def _abort(self, full: str, upload: str) -> None:
        """Abort a failed upload; an abort that fails is logged and the upload's own failure raised, not
        the abort's (its parts stay until ``abort_stale_uploads`` or the bucket's lifecycle rule)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload)
        except Exception as exc:
            log.warning(
                "s3.abort_failed",
                key=full,
                error=f"{type(exc).__name__}: {exc}"[:300],
                fix="left for the AbortIncompleteMultipartUpload lifecycle rule or the archive sink's next start",
            )

    def abort_stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, now: datetime | None = None) -> list[str]:
        """Abort the multipart uploads under this store's prefix started more than ``older_than_s``
        before ``now``; returns their keys. Only under the prefix (a store without one refuses: the
        bucket's other uploads are not diana's). An upload gone meanwhile (NoSuchUpload) is skipped.

        Dated by the listing's ``Initiated``: true on AWS S3; S3Proxy reports the time of the listing for
        every upload, so there nothing is ever old enough (docs/OPERATIONS.md: the lifecycle rule, or by hand)."""
        if not self.prefix:
            raise ValueError("a store without a prefix does not sweep uploads: the bucket's others are not diana's")
        cutoff = (now or datetime.now(UTC)) - timedelta(seconds=older_than_s)
        aborted = []
        with _Errors(f"list multipart uploads under {self.prefix}"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    if not upload["Key"].startswith(self.prefix) or upload["Initiated"] >= cutoff:
                        continue
                    try:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    except Exception as exc:
                        code = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
                        if code not in ("NoSuchUpload", "404"):
                            raise
                        continue
                    aborted.append(upload["Key"][len(self.prefix) :])
        return aborted

    # ------------------------------------------------------------------ read
    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._open(key)

    @contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        with _Errors(f"get {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        # Buffered, so readers get a file's semantics: lines (a StreamingBody iterates in 1 KiB chunks) and cheap small reads.
        stream = io.BufferedReader(_Body(body, f"get {key}"), buffer_size=1 << 20)
        try:
            yield stream
        finally:
            stream.close()

    def open_seekable(self, key: str, read_ahead: int = READ_AHEAD) -> AbstractContextManager[BinaryIO]:
        """The object as it is now, read by ranged GETs as it is read (``_RangedObject``): a reader that
        seeks to what it needs (a frame of a multi-frame object) fetches that, not the whole object. Every
        read is of the version found when it was opened; the object replaced meanwhile makes a later read
        raise ObjectChanged."""
        return self._open_seekable(key, read_ahead)

    @contextmanager
    def _open_seekable(self, key: str, read_ahead: int) -> Iterator[BinaryIO]:
        view = _RangedObject(self.client, self.bucket, self._key(key), key, read_ahead)
        try:
            yield cast(BinaryIO, view)
        finally:
            view.close()

    def _head(self, key: str) -> dict:
        with _Errors(f"head {key}"):
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def modified(self, key: str) -> float:
        return self._head(key)["LastModified"].timestamp()

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.open(key) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def list(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        with _Errors(f"list {prefix or '(all)'}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    # S3Proxy's filesystem backend lists its folders as keys ending in '/': not objects.
                    if not item["Key"].endswith("/"):
                        yield item["Key"][len(self.prefix) :]

    # ------------------------------------------------------------------ copy, delete
    def copy(self, source_key: str, target_key: str, sha256: str | None = None) -> str:
        return self.copy_from(self, source_key, target_key, sha256)

    def copy_from(self, other: ObjectStore, source_key: str, target_key: str, sha256: str | None = None) -> str:
        if not (isinstance(other, S3Store) and other.client.meta.endpoint_url == self.client.meta.endpoint_url):
            with other.open(source_key) as stream:
                return self.put_stream(target_key, stream, sha256)
        head = other._head(source_key)
        recorded = head.get("Metadata", {}).get("sha256")
        if sha256 is not None and recorded != sha256:
            # Without a recorded hash (an object not written by us) the bytes are read to check.
            if recorded is not None or other.sha256(source_key) != sha256:
                raise IntegrityError(f"{source_key} does not have the expected SHA-256; not copied")
        source = {"Bucket": other.bucket, "Key": other._key(source_key)}
        full = self._key(target_key)
        with _Errors(f"copy {source_key} to {target_key}"):
            if int(head["ContentLength"]) <= self.max_copy_bytes:
                self.client.copy_object(Bucket=self.bucket, Key=full, CopySource=source, MetadataDirective="COPY")
            else:
                self._copy_parts(source, full, int(head["ContentLength"]), head.get("Metadata", {}))
        return recorded or sha256 or self.sha256(target_key)

    def _copy_parts(self, source: dict, full: str, size: int, metadata: dict) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata=metadata)["UploadId"]
        parts = []
        try:
            for number, start in enumerate(range(0, size, self.part_size), start=1):
                end = min(start + self.part_size, size) - 1
                result = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                )
                parts.append({"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self._abort(full, upload)
            raise

    def delete(self, key: str) -> None:
        with _Errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: short only at the end of the stream (a socket may return less per read)."""
    chunks = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
