"""A GET through an ASGI app in-process, as uvicorn on 127.0.0.1:8088 would pass it (the DICOMweb tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]  # (lower-case name, value), in order
    body: bytes
    # What the app raised once its answer had begun (the body is cut), None if it ended well.
    error: BaseException | None


def asgi_get(
    app: Any,
    path: str,
    query: str = "",
    headers: dict[str, str] | None = None,
    on_first_body: Callable[[], None] | None = None,
) -> Answer:
    """The app's answer to a GET of ``path``. ``on_first_body`` runs in a worker thread when the first body
    bytes are sent, before the app reads on (to change the archive under a streamed answer)."""
    sent: list[dict[str, Any]] = []

    async def run() -> BaseException | None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {"host": "127.0.0.1:8088"}).items()],
            "server": ("127.0.0.1", 8088),
            "client": ("127.0.0.1", 50000),
        }
        done = anyio.Event()
        requested = False
        first_body = True

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # a streamed answer listens for the client going away meanwhile
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal first_body
            sent.append(message)
            if message["type"] == "http.response.body" and first_body:
                first_body = False
                if on_first_body is not None:
                    await anyio.to_thread.run_sync(on_first_body)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        try:
            await app(scope, receive, send)
        except Exception as exc:  # raised once the answer had begun: the body is cut
            if not sent:
                raise
            return exc
        return None

    error = anyio.run(run)
    start = sent[0]
    head = [(name.decode().lower(), value.decode()) for name, value in start["headers"]]
    body = b"".join(bytes(m.get("body", b"")) for m in sent[1:])
    return Answer(start["status"], head, body, error)
