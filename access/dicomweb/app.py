"""The DICOMweb application: QIDO-RS and WADO-RS routes (PS3.18), on Starlette.

Queries go through access/qr (the same identifier checks and OpenSearch matching as C-FIND);
retrieval reads the archive, never the landing store. Every refused request gets a status with a
reason: 400 naming the parameter, 401 (auth.py), 404 for what is not held, 406 for a media type
this service does not produce.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import structlog
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import RequestError, TransportError
from prometheus_client import Counter
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ImplicitVRLittleEndian
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from diana.access.dicomweb.auth import Credentials, RequireAuth
from diana.access.dicomweb.negotiation import (
    AS_STORED,
    EXPLICIT_LE,
    NotAcceptable,
    bulk_multipart,
    dicom_syntax,
    frame_syntax,
)
from diana.access.dicomweb.prepared import current_files, prepared_body
from diana.access.dicomweb.qido import QidoError, ignored_keys, parameter_message, parse_qido, within_level
from diana.access.dicomweb.stow import (
    StowError,
    StowTooLarge,
    boundary_of,
    receive_body,
    response_json,
    split_and_store,
)
from diana.access.dicomweb.transcoded import decoded_frames, iter_decoded_frames, multipart_explicit_le
from diana.access.dicomweb.wado import (
    BulkTooLarge,
    CorruptObject,
    EncapsulatedPixels,
    bulk_chunks,
    bulk_is_encapsulated_pixels,
    bulk_steps,
    frame_bytes,
    frame_numbers,
    metadata,
    multipart_dicom,
    new_boundary,
    read_bulk,
    stored_frames,
    stored_syntax,
)
from diana.access.qr.identifier import IdentifierError, Query, parse_identifier
from diana.access.qr.index_reader import PAGE, RETRIEVE_PAGE, IndexReader
from diana.access.qr.response import build_response, header_fields
from diana.access.qr.retrieve import archive_key
from diana.access.transcode import TranscodeError
from diana.config import DEFAULT_MAX_STOW_BYTES
from diana.producers.ingest import Ingest
from diana.schemas.series_metadata import absolute_bulk_uris
from diana.storage import ObjectChanged, ObjectNotFound, ObjectStore

__all__ = ["build_app"]

log = structlog.get_logger("diana.dicomweb")
REQUESTS = Counter("diana_dicomweb_requests_total", "DICOMweb requests answered", ["service", "status"])
METADATA_SOURCE = Counter(
    "diana_dicomweb_metadata_total", "WADO-RS metadata answers, by source (prepared files or per instance)", ["source"]
)
DICOM_JSON = "application/dicom+json"


# An archived object replaced (archive REPLACE) while a request read it: the next request reads the new one.
_CHANGED = "the archived object changed while it was read; retry"


def _error(status: int, reason: str, service: str) -> Response:
    REQUESTS.labels(service, str(status)).inc()
    return PlainTextResponse(reason + "\n", status_code=status)


# A Host header as clients send it: a name or an IPv4 address, or an IPv6 one in brackets, and a port.
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"^(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


def _with_whole_level(query: Query, document: dict[str, Any], level: str) -> Query:
    """``query`` returning, besides its own keys, every attribute of ``document``'s stored header that
    belongs to ``level`` or a level above (includefield=all); a copy, so no match adds to another's keys."""
    asked = set(query.return_tags)
    extra = []
    for key in document.get("dicom") or {}:
        try:
            tag = int(key, 16)
        except ValueError:
            continue
        if tag not in asked and within_level(tag, level):
            extra.append(tag)
    return dataclasses.replace(query, return_tags=[*query.return_tags, *sorted(extra)])


def _has_bulk_uri(model: Any) -> bool:
    """Whether a stored element's DICOM JSON holds a BulkDataURI (its own, or in its items)."""
    if isinstance(model, dict):
        return "BulkDataURI" in model or any(_has_bulk_uri(v) for v in model.values())
    if isinstance(model, list):
        return any(_has_bulk_uri(v) for v in model)
    return False


def _said_if_cut(docs: Iterator[dict[str, Any]], service: str) -> Iterator[dict[str, Any]]:
    """``docs``; if the index stops answering once the answer has begun (its status is sent), the
    answer is cut short, and the log says why before the server's traceback."""
    try:
        yield from docs
    except (OSConnectionError, TransportError) as exc:
        log.error("wado.cut_short", service=service, reason="the index stopped answering", detail=type(exc).__name__)
        raise


class DicomWeb:
    def __init__(
        self,
        reader: IndexReader,
        archive: ObjectStore,
        ae_title: str,
        max_results: int,
        ingest: Ingest | None = None,
        max_stow_bytes: int = DEFAULT_MAX_STOW_BYTES,
        max_retrieve: int = 65535,
        public_url: str = "",
    ):
        self.ingest = ingest
        self.max_stow_bytes = max_stow_bytes
        self.max_retrieve = max_retrieve  # instances one retrieve or metadata request may cover
        self.reader = reader
        self.archive = archive
        self.ae_title = ae_title
        self.max_results = max_results
        self.public_url = public_url.rstrip("/")

    def _base(self, request: Request) -> str:
        """This service's URL for the URLs its answers carry: ``[dicomweb] public_url`` when set (behind a
        reverse proxy); else as the client reached it: its Host header and the request's scheme, with the
        port the request came in on when the Host header names none and that port is not the scheme's
        default (Python's dicomweb-client sends the host name alone). So a proxy on 443 in front of 8088 is
        answered right only with public_url. A Host header that is no host[:port] is not echoed: the
        address the request came in on stands for it then."""
        if self.public_url:
            return self.public_url
        scheme = request.url.scheme
        root = request.scope.get("root_path", "").rstrip("/")
        host = request.headers.get("host", "")
        server = request.scope.get("server") or ("127.0.0.1", None)
        if not _HOST.match(host):
            address = f"[{server[0]}]" if ":" in str(server[0]) else str(server[0])
            host = address if server[1] is None else f"{address}:{server[1]}"
        elif ":" not in host.rpartition("]")[2] and server[1] not in (None, _DEFAULT_PORTS.get(scheme)):
            # Python's dicomweb-client sends its URL's host name alone as Host (no port), so a direct
            # client of :8088 gets that port back; behind a proxy, [dicomweb] public_url says the URL.
            host = f"{host}:{server[1]}"
        return f"{scheme}://{host}{root}"

    # ------------------------------------------------------------------ QIDO-RS
    def qido(self, request: Request) -> Response:
        p = request.path_params
        if "series" in p or request.url.path.endswith("/instances"):
            level = "IMAGE"
        elif request.url.path.endswith("/series"):
            level = "SERIES"
        else:
            level = "STUDY"
        path_uids = {
            k: v for k, v in (("StudyInstanceUID", p.get("study")), ("SeriesInstanceUID", p.get("series"))) if v
        }
        try:
            qido = parse_qido(list(request.query_params.multi_items()), level, path_uids, self.max_results)
            query = parse_identifier(qido.identifier, "STUDY", hierarchical=False)
        except QidoError as exc:
            return _error(400, str(exc), "qido")
        except IdentifierError as exc:
            return _error(400, parameter_message(qido, exc.tag, str(exc)), "qido")
        base = self._base(request)
        cut = False
        try:
            results: list[dict[str, Any]] = []
            # includefield=all returns the attributes of the level and above of each match's header;
            # otherwise only the keys asked for are read.
            header = None if qido.include_all else header_fields(query)
            # One more than the page when the server's maximum bounds it: whether results were cut.
            wanted = qido.offset + qido.limit + (1 if qido.capped else 0)
            for number, match in enumerate(self.reader.find(query, wanted, header=header)):
                if number < qido.offset:
                    continue
                if len(results) == qido.limit:
                    cut = True
                    break
                answered = _with_whole_level(query, match.document, level) if qido.include_all else query
                ds = build_response(answered, match, self.ae_title)
                del ds.QueryRetrieveLevel
                results.append(self._json(ds, base, match.document, level))
        except RequestError as exc:  # OpenSearch's 400: the query, not the index, is at fault
            return _error(400, f"the index refuses this query ({exc.error}): ask with fewer values", "qido")
        except (OSConnectionError, TransportError):
            return _error(503, "the index does not answer; retry later", "qido")
        # PS3.18 8.3.4.4 and 6.7.1.2: what was not done as asked is said in Warning headers (299).
        warnings = []
        ignored = ignored_keys(qido)
        if ignored:
            warnings.append(f"The following query keys are not supported and matched every value: {', '.join(ignored)}")
        if cut:
            warnings.append(
                "The number of results exceeded the maximum supported by the server. Additional results can be requested."
            )
        REQUESTS.labels("qido", "200" if results else "204").inc()
        if not results:
            response = Response(status_code=204)
        else:
            response = Response(json.dumps(results, separators=(",", ":")), media_type=DICOM_JSON)
        agent = urlsplit(base).netloc or "diana-star"
        for text in warnings:
            response.headers.append("Warning", f'299 {agent} "{text}"')
        return response

    @staticmethod
    def _json(ds: Dataset, base: str, doc: dict[str, Any], level: str) -> dict[str, Any]:
        """The match as DICOM JSON with its RetrieveURL: the study's, series' or instance's, by the query's level."""
        model = ds.to_json_dict(bulk_data_threshold=1 << 30)
        # A bulk data value is no C-FIND return value: build_response leaves it empty. Here it keeps its
        # BulkDataURI (PS3.18 F.2.7), absolute as the metadata route's, and not an empty {"vr":"OW"}.
        stored = doc.get("dicom") or {}
        for key in model:
            if key in stored and _has_bulk_uri(stored[key]):
                model[key] = absolute_bulk_uris({key: stored[key]}, base)[key]
        url = f"{base}/studies/{doc.get('study_instance_uid')}"
        if level in ("SERIES", "IMAGE"):
            url += f"/series/{doc.get('series_instance_uid')}"
        if level == "IMAGE":
            url += f"/instances/{doc.get('sop_instance_uid')}"
        model["00081190"] = {"vr": "UR", "Value": [url]}
        return model

    # ------------------------------------------------------------------ STOW-RS
    async def stow(self, request: Request) -> Response:
        if self.ingest is None:
            return _error(405, "this service does not store (no landing store configured)", "stow")
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
        except StowError as exc:
            return _error(415, str(exc), "stow")
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_stow_bytes:
            return _error(413, str(StowTooLarge(self.max_stow_bytes)), "stow")
        try:
            body = await receive_body(request.stream(), self.ingest.landing.incoming, self.max_stow_bytes)
        except StowTooLarge as exc:
            return _error(413, str(exc), "stow")
        except ClientDisconnect:
            log.info("stow.client_gone")  # nothing of the body kept; no one to answer
            return _error(400, "the client went away before the body arrived whole", "stow")
        try:
            study = request.path_params.get("study")
            result = await anyio.to_thread.run_sync(split_and_store, self.ingest, body.path, boundary, study)
        except StowError as exc:
            return _error(400, str(exc), "stow")
        finally:
            body.remove()
        status = 200 if not result.failed else 202 if result.stored else 409
        for _, _, reason, why in result.failed:
            log.warning("stow.refused", reason=f"0x{reason:04X}", detail=why)
        log.info("stow.done", stored=len(result.stored), failed=len(result.failed))
        REQUESTS.labels("stow", str(status)).inc()
        return Response(
            json.dumps(response_json(result, self._base(request)), separators=(",", ":")),
            status_code=status,
            media_type=DICOM_JSON,
        )

    # ------------------------------------------------------------------ WADO-RS
    def _query(self, request: Request) -> Query | Response:
        """The study, series or instance of the URL as a query, or the 400 refusing its UIDs."""
        p = request.path_params
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if "instance" in p else "SERIES" if "series" in p else "STUDY"
        ds.StudyInstanceUID = p["study"]
        if "series" in p:
            ds.SeriesInstanceUID = p["series"]
        if "instance" in p:
            ds.SOPInstanceUID = p["instance"]
        try:
            return parse_identifier(ds, "STUDY", hierarchical=False)
        except IdentifierError as exc:
            return _error(400, str(exc), "wado")

    def _refused(self, found: int) -> Response | None:
        """The answer to a retrieve of ``found`` instances when it is refused, else None."""
        if not found:
            return _error(404, "no such study, series or instance here", "wado")
        if found > self.max_retrieve:
            # Refused whole, as C-MOVE refuses it (A701): a body silently cut short would pass for the study.
            return _error(
                400,
                f"more than {self.max_retrieve} instances ([query_retrieve] max_retrieve): retrieve it series by series",
                "wado",
            )
        return None

    def _selected(self, request: Request, source: list[str], page: int = PAGE) -> list[dict[str, Any]] | Response:
        query = self._query(request)
        if isinstance(query, Response):
            return query
        try:
            docs = list(self.reader.documents(query, source, self.max_retrieve + 1, page))
        except (OSConnectionError, TransportError):
            return _error(503, "the index does not answer; retry later", "wado")
        return self._refused(len(docs)) or docs

    def retrieve(self, request: Request) -> Response:
        try:
            syntax = dicom_syntax(request.headers.get("accept"))
        except NotAcceptable as exc:
            return _error(406, str(exc), "wado")
        docs = self._selected(
            request,
            ["study_instance_uid", "series_instance_uid", "sop_instance_uid", "transfer_syntax_uid"],
            RETRIEVE_PAGE,
        )
        if isinstance(docs, Response):
            return docs
        keys = [key for key in (archive_key(d) for d in docs) if key is not None]
        try:
            # 404 only when none is archived; the body leaves out any other not archived yet (wado.py),
            # so only the keys up to the first archived one are looked up here, not every one.
            if not any(self.archive.exists(key) for key in keys):
                return _error(404, "not archived yet: retry later", "wado")
        except OSError:  # the object store does not answer
            return _error(503, "the archive does not answer; retry later", "wado")
        boundary = new_boundary()
        REQUESTS.labels("wado", "200").inc()
        # As stored when asked (transfer-syntax=*) or when the index says every object is Explicit VR Little
        # Endian already; else each object is made so (transcoded.py), the stored ones still streamed as they are.
        as_stored = syntax == AS_STORED or all(d.get("transfer_syntax_uid") == EXPLICIT_LE for d in docs)
        log.info("wado.retrieve", instances=len(keys), invalid=len(docs) - len(keys), as_stored=as_stored)
        if as_stored:
            body = multipart_dicom(self.archive, keys, boundary)
        else:
            body = multipart_explicit_le(self.archive, keys, boundary)
        media = 'multipart/related; type="application/dicom"'
        if syntax == EXPLICIT_LE:
            media += f"; transfer-syntax={EXPLICIT_LE}"
        return StreamingResponse(body, media_type=f"{media}; boundary={boundary}")

    def metadata(self, request: Request) -> Response:
        p = request.path_params
        if "instance" not in p:
            try:
                files = current_files(self.reader.client, self.reader.index, self.archive, p["study"], p.get("series"))
            except (OSConnectionError, TransportError):
                return _error(503, "the index does not answer; retry later", "wado-metadata")
            if files is not None:
                METADATA_SOURCE.labels("prepared").inc()
                REQUESTS.labels("wado-metadata", "200").inc()
                log.info("wado.metadata", source="prepared", series=len(files))
                return StreamingResponse(prepared_body(self.archive, files, self._base(request)), media_type=DICOM_JSON)
        # Counted first, then read a page at a time as the answer is sent: the headers of a study of
        # max_retrieve instances never sit in memory together.
        query = self._query(request)
        if isinstance(query, Response):
            return query
        try:
            found = self.reader.count(query)
        except (OSConnectionError, TransportError):
            return _error(503, "the index does not answer; retry later", "wado-metadata")
        refused = self._refused(found)
        if refused is not None:
            return refused
        METADATA_SOURCE.labels("per-instance").inc()
        REQUESTS.labels("wado-metadata", "200").inc()
        log.info("wado.metadata", source="per-instance", instances=found)
        docs = _said_if_cut(self.reader.documents(query, ["dicom"], self.max_retrieve, PAGE), "wado-metadata")
        return StreamingResponse(metadata(docs, self._base(request)), media_type=DICOM_JSON)

    def frames(self, request: Request) -> Response:
        try:
            numbers = frame_numbers(request.path_params["frames"])
        except ValueError as exc:
            return _error(400, str(exc), "frames")
        docs = self._selected(request, ["study_instance_uid", "series_instance_uid", "sop_instance_uid"])
        if isinstance(docs, Response):
            return docs
        key = archive_key(docs[0])
        try:
            if key is None:
                raise ObjectNotFound("invalid UIDs")
            # Opened once, read where the frames are (on S3 by ranged requests, not downloaded whole):
            # the file meta, the header and the frames all of the version found when it was opened.
            with self.archive.open_seekable(key) as stream:
                stored = str(stored_syntax(stream))
                syntax, part_type = frame_syntax(request.headers.get("accept"), stored)
                if syntax == AS_STORED or stored in (EXPLICIT_LE, str(ImplicitVRLittleEndian)):
                    frames = frame_bytes(stream, numbers)  # as stored, or native already
                else:
                    frames = decoded_frames(stream, numbers)  # a sync endpoint: in starlette's thread pool
        except FileNotFoundError:  # ObjectNotFound
            return _error(404, "not archived yet: retry later", "frames")
        except ObjectChanged:
            return _error(503, _CHANGED, "frames")
        except OSError:
            return _error(503, "the archive does not answer; retry later", "frames")
        except (CorruptObject, InvalidDicomError) as exc:
            reason = str(exc) if isinstance(exc, CorruptObject) else "its file meta information is not DICOM"
            log.error("wado.corrupt_object", reason=reason)
            return _error(500, f"the archived object cannot be read: {reason}", "frames")
        except NotAcceptable as exc:
            return _error(406, str(exc), "frames")
        except TranscodeError as exc:
            return _error(406, f"{exc}; ask for the frames as stored (transfer-syntax=*)", "frames")
        except (LookupError, IndexError) as exc:
            return _error(404, str(exc), "frames")
        boundary = new_boundary()
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + frame + b"\r\n" for frame in frames
            )
            + f"--{boundary}--\r\n".encode()
        )
        REQUESTS.labels("frames", "200").inc()
        outer = part_type.split(";")[0]
        return Response(body, media_type=f'multipart/related; type="{outer}"; boundary={boundary}')

    def bulk(self, request: Request) -> Response:
        """One bulk data value a stored header's BulkDataURI names (PS3.18 10.4.1.1.5), read from the archived
        object: ``multipart/related; type="application/octet-stream"`` (one part), or a single part when
        ``application/octet-stream`` alone is asked first. Encapsulated pixel data is sent frame by frame,
        as the frames route sends every frame (native by default, as stored when asked); frames as stored are
        read from the open object one at a time as the body is sent.

        The Accept header is settled before any value is read. The object is opened once
        (``open_seekable``): its file meta, its header and the value are read through that one handle, of
        the version it was opened on. A top-level value is streamed from its offset in the object, which
        stays open until the body is sent (on S3 read by ranged requests, never downloaded whole); head,
        value and tail are separate chunks, never joined. A
        deflated object's value is read through pydicom (its offsets are in the inflated data set), capped
        as a value inside a sequence is (413). A big-endian object's OW, OF, OL, OD and
        OV values are sent in little endian (the default transfer syntax, Explicit VR Little Endian)."""
        try:
            steps = bulk_steps(request.path_params["path"])
        except ValueError as exc:
            return _error(400, str(exc), "bulk")
        docs = self._selected(request, ["study_instance_uid", "series_instance_uid", "sop_instance_uid"])
        if isinstance(docs, Response):
            return docs
        key = archive_key(docs[0])
        accept = request.headers.get("accept")
        files = ExitStack()  # the object's open stream, closed once the body is sent
        try:
            if key is None:
                raise ObjectNotFound("invalid UIDs")
            # Opened once: the file meta, the header and the streamed bytes all come from this one open
            # object. An archive REPLACE meanwhile never has the old version's offsets applied to the new
            # bytes: a file renamed over leaves the old one readable through the open file; on S3 every
            # read asks for the version first seen (If-Match), and fails (ObjectChanged) when it is gone.
            stream = files.enter_context(self.archive.open_seekable(key))
            encapsulated = bulk_is_encapsulated_pixels(stream, steps)
            syntax = EXPLICIT_LE
            if encapsulated is not None:
                syntax, part_type = frame_syntax(accept, encapsulated)
                multipart = True
            else:
                multipart, part_type = bulk_multipart(accept), "application/octet-stream"
            found = read_bulk(stream, steps)
            if isinstance(found, EncapsulatedPixels):
                numbers = list(range(1, found.count + 1))
                # Read (and decoded) frame by frame from the open file as the body is sent.
                if syntax == AS_STORED:
                    chunks: Iterator[Any] = stored_frames(stream, numbers)
                else:
                    chunks = iter_decoded_frames(stream, numbers)
            else:
                chunks = bulk_chunks(stream, found)
        except FileNotFoundError:  # ObjectNotFound
            files.close()
            return _error(404, "not archived yet: retry later", "bulk")
        except ObjectChanged:
            files.close()
            return _error(503, _CHANGED, "bulk")
        except OSError:
            files.close()
            return _error(503, "the archive does not answer; retry later", "bulk")
        except (CorruptObject, InvalidDicomError) as exc:
            files.close()
            reason = str(exc) if isinstance(exc, CorruptObject) else "its file meta information is not DICOM"
            log.error("wado.corrupt_object", reason=reason)
            return _error(500, f"the archived object cannot be read: {reason}", "bulk")
        except NotAcceptable as exc:
            files.close()
            return _error(406, str(exc), "bulk")
        except TranscodeError as exc:
            files.close()
            return _error(406, f"{exc}; ask for the frames as stored (transfer-syntax=*)", "bulk")
        except BulkTooLarge as exc:
            files.close()
            return _error(413, f"the value is too large to send: {exc}", "bulk")
        except LookupError as exc:
            files.close()
            return _error(404, str(exc).strip("'\""), "bulk")
        REQUESTS.labels("bulk", "200").inc()
        done = BackgroundTask(files.close)  # also when the body was never started (the client went away)
        if not multipart:
            return StreamingResponse(_closing(chunks, files), media_type="application/octet-stream", background=done)
        boundary = new_boundary()
        outer = part_type.split(";")[0]
        return StreamingResponse(
            _closing(_bulk_parts(chunks, encapsulated is not None, boundary, part_type), files),
            media_type=f'multipart/related; type="{outer}"; boundary={boundary}',
            background=done,
        )


def _bulk_parts(chunks: Iterator[Any], each_a_part: bool, boundary: str, part_type: str) -> Iterator[Any]:
    """The multipart body: a part per chunk (frames), or one part of all the chunks (a value)."""
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
    if each_a_part:
        for chunk in chunks:
            yield head
            yield chunk
            yield b"\r\n"
    else:
        yield head
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _closing(chunks: Iterator[Any], files: ExitStack) -> Iterator[Any]:
    try:
        yield from chunks
    except (CorruptObject, TranscodeError, OSError) as exc:
        # The status went out with the first bytes: the connection is cut, so the client sees the body end
        # without its closing boundary (a short body), never a shorter value passed off as whole.
        log.error("wado.body_cut", reason=type(exc).__name__ if isinstance(exc, OSError) else str(exc))
        raise
    finally:
        files.close()


def build_app(
    reader: IndexReader,
    archive: ObjectStore,
    ae_title: str,
    credentials: Credentials,
    cors_origins: tuple = (),
    max_results: int = 1000,
    ingest: Ingest | None = None,
    max_stow_bytes: int = DEFAULT_MAX_STOW_BYTES,
    max_retrieve: int = 65535,
    public_url: str = "",
) -> Starlette:
    web = DicomWeb(reader, archive, ae_title, max_results, ingest, max_stow_bytes, max_retrieve, public_url)
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    routes = [
        Route("/studies", web.qido, methods=["GET"]),
        Route("/studies", web.stow, methods=["POST"]),
        Route(study, web.stow, methods=["POST"]),
        Route("/series", web.qido),
        Route("/instances", web.qido),
        Route(study + "/series", web.qido),
        Route(study + "/instances", web.qido),
        Route(series + "/instances", web.qido),
        Route(study, web.retrieve, methods=["GET"]),
        Route(series, web.retrieve),
        Route(instance, web.retrieve),
        Route(study + "/metadata", web.metadata),
        Route(series + "/metadata", web.metadata),
        Route(instance + "/metadata", web.metadata),
        Route(instance + "/frames/{frames}", web.frames),
        Route(instance + "/bulk/{path:path}", web.bulk),
    ]
    middleware = [Middleware(RequireAuth, credentials=credentials)]
    if cors_origins:
        # Outermost, so a browser's preflight (which carries no credentials) is answered.
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Accept", "Content-Type"],
            ),
        )
    return Starlette(routes=routes, middleware=middleware)
