"""A real SMTP relay in this process (aiosmtpd) for the unit tests of alert e-mail: it keeps every
mail it takes, on a free port of 127.0.0.1."""

from __future__ import annotations

import socket
from typing import Any

from aiosmtpd.controller import Controller


class Mailbox:
    """An aiosmtpd handler that takes every mail: ``messages`` are their bytes, in order."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content)
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_relay(handler: Any, **options: Any) -> Controller:
    """``handler`` serving SMTP on a free port (``options``: aiosmtpd's, e.g. TLS); stop it with ``.stop()``."""
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
    controller.start()
    return controller
