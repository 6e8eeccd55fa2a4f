"""Sending one alert to one address: SMTP e-mail or an HTTP webhook, with retries.

Each message carries a key stable for (alert, recipient, channel) — the e-mail's Message-ID, the
webhook's Idempotency-Key header — so a receiver can recognise a repeat in the one case the
delivery ledger cannot rule out (a crash between the receiver's acceptance and the ledger write).
No patient name, ID or birth date is sent; the alert says study, accession, station and values
(PUBLIC_FIELDS; a site may add the study's date, description and institution: EXTRA_FIELDS).
"""

from __future__ import annotations

import json
import re
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage

__all__ = [
    "Delivery",
    "SmtpServer",
    "send_email",
    "send_webhook",
    "send_correction_email",
    "send_correction_webhook",
    "correction_text",
    "with_retries",
    "failure_detail",
    "permanent_refusal",
    "alert_text",
    "public",
    "PUBLIC_FIELDS",
    "EXTRA_FIELDS",
]

# What leaves the building, as docs/DOSE.md says: the rule and its values, the study's UID and
# accession number (so that the exam can be found in the RIS or PACS), station, scanner model and
# protocol; no patient name, ID or birth date. The study date, the free-text study description and
# the institution were sent too, unlisted: now only when [alerts] message_extra_fields names them.
PUBLIC_FIELDS = (
    "alert_id",
    "rule",
    "rule_type",
    "metric",
    "value",
    "threshold",
    "message",
    "study_instance_uid",
    "accession_number",
    "station_name",
    "manufacturer_model_name",
    "protocol",
    "kind",
    "window_days",
)
EXTRA_FIELDS = ("study_date", "study_description", "institution_name")


@dataclass(frozen=True)
class Delivery:
    ok: bool
    attempts: int
    detail: str
    # The receiver refused this message or address for good (permanent_refusal): not tried again.
    permanent: bool = False
    # The last error was the server not reached (refused, timed out, unknown host): the other deliveries
    # to that server in a retry round are left for the next one.
    unreachable: bool = False
    # Not sent (any more): the alert was found withdrawn before this attempt (with_retries' still_open).
    withdrawn: bool = False


def public(alert: dict, extra: tuple[str, ...] = ()) -> dict:
    """The alert's fields that are sent: PUBLIC_FIELDS and those of ``extra`` (of EXTRA_FIELDS)."""
    fields = PUBLIC_FIELDS + tuple(f for f in extra if f in EXTRA_FIELDS)
    return {k: alert.get(k) for k in fields if alert.get(k) is not None}


def alert_text(alert: dict, extra: tuple[str, ...] = ()) -> str:
    lines = [alert.get("message") or "", ""]
    lines += [f"{k}: {v}" for k, v in public(alert, extra).items() if k != "message"]
    lines += ["", f"Acknowledge: diana alerts ack {alert['alert_id']} --reason REASON --note TEXT"]
    return "\n".join(lines)


def _withdrawn_line(alert: dict) -> str:
    """What a correction says of the withdrawal: why, and the value that stands now when one does."""
    now, metric = alert.get("replaced_value"), alert.get("metric")
    if alert.get("withdrawn_reason") == "under_limit":
        threshold = alert.get("threshold")
        if now is not None and (threshold is None or now > threshold):
            # Never "no longer over the limit T: now X" with X over T (a withdrawal the dose worker makes
            # no more: a raised limit, a rules change); say only what stands.
            return f"WITHDRAWN: the study's {metric} is now {now:g}; the alert sent before no longer stands."
        value = "" if now is None else f": {metric} is now {now:g}"
        return f"WITHDRAWN: the study's value is no longer over the limit {threshold:g}{value}."
    if now is None:
        return "WITHDRAWN: superseded by the study's dose report (RDSR); its values are in the report's own record."
    return f"WITHDRAWN: superseded by the RDSR's value {now:g} ({metric})."


def correction_text(alert: dict, extra: tuple[str, ...] = ()) -> str:
    """The text of a correction: the withdrawal, then the alert as it was sent (``public``: the same
    fields under the same settings, so no more of the patient than the alert said)."""
    fields = public(alert, extra)
    lines = [
        _withdrawn_line(alert),
        f"Dose alert {alert['alert_id']}, sent before with the value {alert.get('value'):g}:",
    ]
    lines += [f"{k}: {v}" for k, v in fields.items()]
    lines += ["", "Do not act on the value of the alert sent before."]
    return "\n".join(lines)


@dataclass(frozen=True)
class SmtpServer:
    """Where and how e-mail goes ([alerts] smtp_*; the password already read from its file)."""

    host: str
    port: int
    sender: str
    security: str = "none"  # "none", "starttls" or "tls"
    ca_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)

    def connect(self, timeout: float) -> smtplib.SMTP:
        """A session ready to send: over TLS unless "none" (STARTTLS refused by the server is an error,
        never a fall back to plain), logged in when a user is set."""
        context = ssl.create_default_context(cafile=self.ca_file or None)
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=timeout)
        try:
            if self.security == "starttls":
                smtp.starttls(context=context)
            if self.username:
                smtp.login(self.username, self.password)
        except BaseException:
            smtp.close()
            raise
        return smtp


def _send_mail(server: SmtpServer, msg: EmailMessage, timeout: float) -> str:
    """Hand ``msg`` to the relay; a recipient it refuses is an error, not a silent drop. Once the relay
    has taken the message, its answer to QUIT changes nothing: a 421 there (SMTP.__exit__ raises on
    anything but 221) made an accepted alert a failure, sent again at each try and never corrected."""
    smtp = server.connect(timeout)
    try:
        refused = smtp.send_message(msg)
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass  # already accepted: the session's end is the relay's business
    finally:
        smtp.close()
    if refused:
        raise smtplib.SMTPRecipientsRefused(refused)
    return f"accepted by {server.host}:{server.port}"


def send_email(server: SmtpServer, to: str, alert: dict, key: str, timeout: float, extra: tuple[str, ...] = ()) -> str:
    msg = EmailMessage()
    msg["From"], msg["To"] = server.sender, to
    msg["Subject"] = f"[diana-star dose alert] {alert.get('rule')}: {alert.get('metric')} {alert.get('value'):g}"
    msg["Message-ID"] = f"<{key}@diana-star>"
    msg.set_content(alert_text(alert, extra))
    return _send_mail(server, msg, timeout)


def send_correction_email(
    server: SmtpServer, to: str, alert: dict, key: str, timeout: float, extra: tuple[str, ...] = ()
) -> str:
    """The correction of a delivered alert that was withdrawn (its own Message-ID: ``key`` is the
    correction's; In-Reply-To the alert's own message, so a mail client threads them)."""
    msg = EmailMessage()
    msg["From"], msg["To"] = server.sender, to
    msg["Subject"] = (
        f"[diana-star dose alert WITHDRAWN] {alert.get('rule')}: {alert.get('metric')} {alert.get('value'):g}"
    )
    msg["Message-ID"] = f"<{key}@diana-star>"
    msg["In-Reply-To"] = f"<{key.removeprefix('correction:')}@diana-star>"
    msg.set_content(correction_text(alert, extra))
    return _send_mail(server, msg, timeout)


def send_correction_webhook(url: str, alert: dict, key: str, timeout: float, extra: tuple[str, ...] = ()) -> str:
    """POSTs ``{"alert": ..., "withdrawn": {...}, "idempotency_key": ...}``: the alert's fields as sent
    before, and the withdrawal (reason, the value that stands now or null, the text)."""
    withdrawn = {
        "reason": alert.get("withdrawn_reason") or "superseded",
        "replaced_value": alert.get("replaced_value"),
        "text": _withdrawn_line(alert),
    }
    return _post(url, {"alert": public(alert, extra), "withdrawn": withdrawn, "idempotency_key": key}, key, timeout)


def send_webhook(url: str, alert: dict, key: str, timeout: float, extra: tuple[str, ...] = ()) -> str:
    return _post(url, {"alert": public(alert, extra), "idempotency_key": key}, key, timeout)


def _post(url: str, payload: dict, key: str, timeout: float) -> str:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "Idempotency-Key": key}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return f"HTTP {response.status}"


# Errors of the network, the SMTP dialogue or HTTP, whose text is the server's answer or the socket's
# error: kept in the detail. Any other error (http.client.BadStatusLine, InvalidURL, a ValueError of a
# malformed URL) is named by its type only: its text can quote the address, with its credentials.
_TRANSPORT_ERRORS = (OSError, smtplib.SMTPException, urllib.error.URLError)
_CREDENTIALS = re.compile(r"(?<=//)[^/@\s]*@")


def failure_detail(exc: BaseException) -> str:
    """What a DELIVERY_FAILED says of ``exc``: its type, and the server's or socket's answer when it is one
    (never the user and password of a URL)."""
    if not isinstance(exc, _TRANSPORT_ERRORS):
        return type(exc).__name__
    return _CREDENTIALS.sub("***@", f"{type(exc).__name__}: {exc}")


def _enhanced_status(message: bytes | str) -> str:
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    return text.strip().split(" ", 1)[0]


# Without an enhanced status code (RFC 3463), a reply that names the address as bad, and one that is
# the relay's view of us (configuration: the same for every alert).
_BAD_ADDRESS = re.compile(r"unknown|no such|does ?n[o']t exist|not exist|invalid|not found|unrouteable", re.I)
_CONFIGURATION = re.compile(r"relay|rcpthosts|auth|policy|not permitted|access denied", re.I)


def _refused_for_good(code: int, message: bytes | str, per_recipient: bool) -> bool:
    # Final only when the recipient's address is bad: 5.1.x (bad mailbox, domain or address syntax).
    # Anything else passes and is retried (bounded history): a full mailbox (5.2.2), content or size
    # refusals, and the 5.7.x policy ones ("relaying denied", "authentication required"), which are
    # configuration and made final would drop every alert until it is fixed. A refusal of one
    # recipient (RCPT) without an enhanced code is final as 551/553 (user not local, mailbox name not
    # allowed) or a 550 whose text names the address as bad, never when it speaks of relaying or policy.
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    status = _enhanced_status(text)
    if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
        return status.startswith("5.1.")
    if not per_recipient or code not in (550, 551, 553) or _CONFIGURATION.search(text):
        return False
    return code != 550 or bool(_BAD_ADDRESS.search(text))


def permanent_refusal(exc: BaseException) -> bool:
    """True when the mail server refused this recipient's address for good (5.1.x, _refused_for_good).

    The relay refusing our sender (MAIL FROM), our login or our greeting is configuration
    ([alerts] smtp_from, smtp_username), the same for every alert: it stays a failure that passes,
    tried again at each retry round, so that the alerts go out once it is fixed."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        answers = list(exc.recipients.values())
        return bool(answers) and all(_refused_for_good(code, msg, True) for code, msg in answers)
    if isinstance(exc, smtplib.SMTPDataError):
        return _refused_for_good(exc.smtp_code, exc.smtp_error, False)
    return False


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)):
        return True
    answered = (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused, urllib.error.HTTPError)
    return isinstance(exc, OSError) and not isinstance(exc, (*answered, smtplib.SMTPNotSupportedError))


def with_retries(
    send: Callable[[], str],
    attempts: int,
    sleep: Callable[[float], None] = time.sleep,
    still_open: Callable[[], bool] | None = None,
) -> Delivery:
    """Try ``attempts`` times, waiting 1, 2, 4 ... s between tries; the last error is the detail. A
    permanent refusal (permanent_refusal) ends the tries at once. ``still_open`` is asked just before
    each try: False (the alert was withdrawn meanwhile) ends them, nothing more sent (``withdrawn``).

    Any exception of the send is a failed try: an error nobody listed (a webhook answering something
    that is not HTTP) used to escape, end the delivery worker, and end it again at every start, so
    every later alert was held."""
    detail, unreachable = "", False
    for attempt in range(1, attempts + 1):
        if still_open is not None and not still_open():
            return Delivery(False, attempt - 1, "not sent: the alert was withdrawn", withdrawn=True)
        try:
            return Delivery(True, attempt, send())
        except Exception as exc:
            detail, unreachable = failure_detail(exc), _unreachable(exc)
            if permanent_refusal(exc):
                return Delivery(False, attempt, detail, permanent=True)
            if attempt < attempts:
                sleep(float(2 ** (attempt - 1)))
    return Delivery(False, attempts, detail, unreachable=unreachable)
