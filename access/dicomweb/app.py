"""The DICOMweb application: QIDO-RS and WADO-RS routes (PS3.18), on Starlette.

Queries go through access/qr (the same identifier checks and OpenSearch matching as C-FIND);
retrieval reads the archive, never the landing store. Every refused request gets a status with a
reason: 400 naming the parameter, 401 (auth.py), 404 for what is not held, 406 for a media type
this service does not produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import structlog
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import RequestError, TransportError
from prometheus_client import Counter
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from diana.access.dicomweb.auth import Credentials, RequireAuth
from diana.access.dicomweb.negotiation import AS_STORED, EXPLICIT_LE, NotAcceptable, dicom_syntax, frame_syntax
from diana.access.dicomweb.prepared import current_files, prepared_body
from diana.access.dicomweb.qido import QidoError, parameter_message, parse_qido
from diana.access.dicomweb.stow import (
    StowError,
    StowTooLarge,
    boundary_of,
    receive_body,
    response_json,
    split_and_store,
)
from diana.access.dicomweb.transcoded import decoded_frames, multipart_explicit_le
from diana.access.dicomweb.wado import (
    CorruptObject,
    frame_bytes,
    frame_numbers,
    metadata,
    multipart_dicom,
    new_boundary,
    transfer_syntax,
)
from diana.access.qr.identifier import IdentifierError, Query, parse_identifier
from diana.access.qr.index_reader import PAGE, RETRIEVE_PAGE, IndexReader
from diana.access.qr.response import build_response, header_fields
from diana.access.qr.retrieve import archive_key
from diana.access.transcode import TranscodeError
from diana.config import DEFAULT_MAX_STOW_BYTES
from diana.producers.ingest import Ingest
from diana.storage import ObjectNotFound, ObjectStore, local_file

__all__ = ["build_app"]

log = structlog.get_logger("diana.dicomweb")
REQUESTS = Counter("diana_dicomweb_requests_total", "DICOMweb requests answered", ["service", "status"])
METADATA_SOURCE = Counter(
    "diana_dicomweb_metadata_total", "WADO-RS metadata answers, by source (prepared files or per instance)", ["source"]
)
DICOM_JSON = "application/dicom+json"


def _error(status: int, reason: str, service: str) -> Response:
    REQUESTS.labels(service, str(status)).inc()
    return PlainTextResponse(reason + "\n", status_code=status)


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
    ):
        self.ingest = ingest
        self.max_stow_bytes = max_stow_bytes
        self.max_retrieve = max_retrieve  # instances one retrieve or metadata request may cover
        self.reader = reader
        self.archive = archive
        self.ae_title = ae_title
        self.max_results = max_results

    @staticmethod
    def _base(request: Request) -> str:
        """This service's URL as the client reached it. Some clients (dicomweb-client) send a Host
        header without the port: the port the request came in on is added then."""
        base = str(request.base_url).rstrip("/")
        host = request.headers.get("host", "")
        server = request.scope.get("server")
        default = 443 if request.url.scheme == "https" else 80
        if host and ":" not in host.rsplit("]", 1)[-1] and server and server[1] != default:
            base = f"{request.url.scheme}://{host}:{server[1]}{request.scope.get('root_path', '')}"
        return base

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
        try:
            results: list[dict[str, Any]] = []
            # includefield=all returns every element of each header; otherwise only the keys asked for.
            header = None if qido.include_all else header_fields(query)
            for number, match in enumerate(self.reader.find(query, qido.offset + qido.limit, header=header)):
                if number < qido.offset:
                    continue
                if qido.include_all:
                    query.return_tags = sorted(
                        {*query.return_tags, *(int(k, 16) for k in (match.document.get("dicom") or {}))}
                    )
                ds = build_response(query, match, self.ae_title)
                del ds.QueryRetrieveLevel
                results.append(self._json(ds, request, match.document))
        except RequestError as exc:  # OpenSearch's 400: the query, not the index, is at fault
            return _error(400, f"the index refuses this query ({exc.error}): ask with fewer values", "qido")
        except (OSConnectionError, TransportError):
            return _error(503, "the index does not answer; retry later", "qido")
        REQUESTS.labels("qido", "200" if results else "204").inc()
        if not results:
            return Response(status_code=204)
        return Response(json.dumps(results, separators=(",", ":")), media_type=DICOM_JSON)

    def _json(self, ds: Dataset, request: Request, doc: dict[str, Any]) -> dict[str, Any]:
        model = ds.to_json_dict(bulk_data_threshold=1 << 30)
        url = f"{self._base(request)}/studies/{doc.get('study_instance_uid')}"
        if "SOPInstanceUID" in ds:
            url += f"/series/{doc.get('series_instance_uid')}/instances/{doc.get('sop_instance_uid')}"
        elif "SeriesInstanceUID" in ds and "NumberOfStudyRelatedSeries" not in ds:
            url += f"/series/{doc.get('series_instance_uid')}"
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
            result = await anyio.to_thread.run_sync(split_and_store, self.ingest, body, boundary, study)
        except StowError as exc:
            return _error(400, str(exc), "stow")
        finally:
            body.unlink(missing_ok=True)
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
            with local_file(self.archive, key) as path:
                stored = str(transfer_syntax(read_file_meta_info(path)))
                syntax, part_type = frame_syntax(request.headers.get("accept"), stored)
                if syntax == AS_STORED or stored in (EXPLICIT_LE, str(ImplicitVRLittleEndian)):
                    frames = frame_bytes(path, numbers)  # as stored, or native already
                else:
                    frames = decoded_frames(path, numbers)  # a sync endpoint: in starlette's thread pool
        except FileNotFoundError:  # ObjectNotFound
            return _error(404, "not archived yet: retry later", "frames")
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
) -> Starlette:
    web = DicomWeb(reader, archive, ae_title, max_results, ingest, max_stow_bytes, max_retrieve)
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
