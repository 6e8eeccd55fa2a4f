"""A mail the relay accepted is delivered, whatever the relay answers to QUIT afterwards: a 421 or a
slow answer there once made the alert count as failed, sent again at every try (the same Message-ID,
which mailboxes do not all fold) and, withdrawn later, never corrected (no DELIVERED). Real SMTP
server (aiosmtpd, in this process)."""

from __future__ import annotations

import asyncio

from diana.access.alerts.channels import SmtpServer, send_email
from tests.support.smtp_relay import Mailbox, start_relay

ALERT = {"alert_id": "a-1", "rule": "ct-head", "metric": "ctdivol", "value": 80.0, "message": "over the DRL"}


class _RudeRelay(Mailbox):
    """Takes every mail, then answers QUIT badly: ``quit`` is "421" or "slow"."""

    def __init__(self, quit: str) -> None:
        super().__init__()
        self.quit = quit

    async def handle_QUIT(self, server, session, envelope):
        if self.quit == "slow":
            await asyncio.sleep(3)
            return "221 Bye"
        return "421 closing the channel"


def _send_through(quit: str) -> tuple[str, int]:
    relay = _RudeRelay(quit)
    controller = start_relay(relay)
    try:
        server = SmtpServer("127.0.0.1", controller.port, "diana@example.org", "none")
        answer = send_email(server, "physicist@example.org", ALERT, "k1", timeout=1)
        return answer, len(relay.messages)
    finally:
        controller.stop()


def test_a_421_to_quit_after_the_mail_was_accepted_is_a_delivery():
    answer, taken = _send_through("421")
    assert taken == 1
    assert answer.startswith("accepted by 127.0.0.1:")


def test_a_quit_answered_after_the_timeout_is_a_delivery():
    answer, taken = _send_through("slow")
    assert taken == 1
    assert answer.startswith("accepted by 127.0.0.1:")
