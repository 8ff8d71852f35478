"""Email a report: SMTP (plain relay, STARTTLS or SSL), retried, every attempt recorded.

The message is multipart/mixed:

    multipart/alternative
        text/plain                 Report.text
        multipart/related
            text/html              Report.html, charts referenced as cid:
            image/png ...          the charts (email clients do not show data: URIs)
    text/csv ...                   the report's frames, as attachments

Credentials are references: `notifications.password` (a SecretRef resolved by
vmrep.secrets) or a prefect-email `EmailServerCredentials` block named in
`notifications.email_credentials_block` (its server, port, security and login then apply).

A send that still fails after the retries is recorded in `email_deliveries` (ok False,
with the error) and not raised: the report stays on disk and the caller's operation is
not failed by a mail relay being down. `raise_on_failure=True` changes that.
"""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from typing import Any

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from reports.report import Report
from vmrep.errors import SecretError, VmrepError
from vmrep.stamps import utcnow

log = logging.getLogger(__name__)

DATA_URI = re.compile(r"""(src=["'])data:image/(png|jpeg|gif|svg\+xml);base64,([A-Za-z0-9+/=\s]+)(["'])""")


class MailError(VmrepError):
    """The report could not be emailed (only raised with raise_on_failure=True)."""


@dataclass
class Delivery:
    ok: bool
    recipients: list[str]
    subject: str
    attempts: int
    error: str | None = None
    message_id: str | None = None
    delivery_id: int | None = None  # the email_deliveries row
    refused: dict[str, str] = field(default_factory=dict)  # recipients the server refused

    def as_dict(self) -> dict[str, Any]:
        """What a flow returns and Prefect stores about the send (JSON-able)."""
        return {"ok": self.ok, "recipients": self.recipients, "subject": self.subject,
                "attempts": self.attempts, "error": self.error, "delivery_id": self.delivery_id,
                "refused": self.refused}


# --------------------------------------------------------------------------- recipients


def report_recipients(report: Report, config: Any) -> list[str]:
    """VPG.email_to of every VPG the report is about, then notifications.default_to."""
    out: list[str] = []
    vpgs = {v.name: v for v in (getattr(config, "vpgs", None) or [])}
    for name in report.vpgs:
        v = vpgs.get(name)
        if v is not None:
            out += list(v.email_to)
    notif = getattr(config, "notifications", None)
    if notif is not None:
        out += list(notif.default_to)
    return _dedupe(out)


def email_owners(report: Report, config: Any, store: Any, **mail_options: Any) -> Delivery:
    """Send `report` to its recipients (`report_recipients`); recorded in `store`; never
    raises (see `send_report` for `mail_options`)."""
    return send_report(report, report_recipients(report, config), config.notifications, store, **mail_options)


def _dedupe(addresses: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        a = a.strip()
        if a and a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return out


# --------------------------------------------------------------------------- message


def build_message(report: Report, recipients: Sequence[str], sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = " ".join(report.subject.split())  # one line whatever the names hold
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    domain = sender.rpartition("@")[2] or "vmrep.local"
    msg["Message-ID"] = make_msgid("vmrep", domain=domain)
    msg["X-Vmrep-Report"] = f"{report.kind}; ref={report.ref}"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(report.text, subtype="plain", charset="utf-8")

    images: list[tuple[str, str, bytes]] = []

    def to_cid(m: re.Match) -> str:
        cid = make_msgid("chart", domain=domain)
        images.append((cid, m.group(2), base64.b64decode(re.sub(r"\s", "", m.group(3)))))
        return f"{m.group(1)}cid:{cid[1:-1]}{m.group(4)}"

    html = DATA_URI.sub(to_cid, report.html)
    msg.add_alternative(html, subtype="html", charset="utf-8")
    if images:
        html_part = msg.get_payload()[1]
        for cid, subtype, data in images:
            html_part.add_related(data, maintype="image", subtype=subtype, cid=cid,
                                  filename=f"{cid[1:].split('@')[0]}.{subtype.split('+')[0]}")
    for name, data in report.csv_bytes().items():
        msg.add_attachment(data, maintype="text", subtype="csv", filename=name)
    return msg


# --------------------------------------------------------------------------- SMTP


def _permanent(exc: BaseException) -> bool:
    """Not worth retrying: bad credentials/config, or a 5xx answer from the server."""
    if isinstance(exc, (SecretError, smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError)):
        return True
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(400 > code or code >= 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code >= 500
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return False


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, smtplib.SMTPException)) and not _permanent(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        msg = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return f"{type(exc).__name__}: {exc.smtp_code} {msg}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return f"SMTPRecipientsRefused: {', '.join(exc.recipients)}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _open_smtp(notifications: Any, ssl_context: ssl.SSLContext | None, timeout: float) -> smtplib.SMTP:
    if notifications.email_credentials_block:
        return _open_with_block(notifications.email_credentials_block, timeout)
    host, port, security = notifications.smtp_host, int(notifications.smtp_port), notifications.security
    ctx = ssl_context or ssl.create_default_context()
    if security == "ssl":
        server: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=ctx)
    else:
        server = smtplib.SMTP(host, port, timeout=timeout)
    try:
        server.ehlo()
        if security == "starttls":
            server.starttls(context=ctx)
            server.ehlo()
        if notifications.username:
            if notifications.password is None:
                raise SecretError("notifications.password: a username is set but no password reference")
            if security == "plain":
                log.warning("SMTP login to %s:%s over a plain connection", host, port)
            from vmrep.secrets import resolve_secret

            server.login(notifications.username, resolve_secret(notifications.password, "notifications.password"))
    except BaseException:
        _close(server)
        raise
    return server


def _open_with_block(name: str, timeout: float) -> smtplib.SMTP:
    try:
        from prefect_email import EmailServerCredentials

        block = EmailServerCredentials.load(name, _sync=True)
    except Exception as exc:
        raise SecretError(
            f"notifications.email_credentials_block: cannot load the EmailServerCredentials "
            f"block {name!r} ({type(exc).__name__})"
        ) from None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # get_server() gives smtplib no timeout of its own
    try:
        return block.get_server()
    finally:
        socket.setdefaulttimeout(old)


def _close(server: smtplib.SMTP) -> None:
    try:
        server.quit()
    except Exception:
        try:
            server.close()
        except Exception:
            pass


def _send_once(msg: EmailMessage, sender: str, recipients: list[str], notifications: Any,
               ssl_context: ssl.SSLContext | None, timeout: float) -> dict[str, Any]:
    server = _open_smtp(notifications, ssl_context, timeout)
    try:
        refused = server.send_message(msg, from_addr=sender, to_addrs=recipients)
    finally:
        _close(server)
    return refused


def send_report(
    report: Report,
    recipients: Sequence[str] | None,
    notifications_config: Any,
    store: Any,
    *,
    attempts: int = 3,
    wait_initial: float = 2.0,
    wait_max: float = 30.0,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    raise_on_failure: bool = False,
) -> Delivery:
    """Send `report` to `recipients`; retried with exponential backoff; recorded in the store.

    `notifications_config` is `Config.notifications` (or the whole Config). `store` is the
    StateStore (`record_email`); None records nothing. Returns the Delivery; a failure is
    logged, recorded and returned, and raised only with `raise_on_failure`.
    """
    notif = getattr(notifications_config, "notifications", notifications_config)
    sender = notif.sender
    rcpt = _dedupe(recipients or [])
    report_path = str(report.paths["html"]) if report.paths.get("html") else None
    attempted_at = utcnow()
    done = 0
    message_id = None
    refused: dict[str, str] = {}
    error: str | None = None

    bad = [a for _, a in getaddresses(rcpt) if "@" not in a]
    if not rcpt:
        error = "no recipients: set the VPG's email_to or notifications.default_to"
    elif bad:
        error = f"not an email address: {', '.join(bad)}"
    else:
        msg = build_message(report, rcpt, sender)
        message_id = msg["Message-ID"]
        retrying = Retrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential(multiplier=wait_initial, min=wait_initial, max=wait_max),
            retry=retry_if_exception(_retryable),
            reraise=True,
            sleep=time.sleep,
            before_sleep=lambda rs: log.warning(
                "email %r: attempt %d failed (%s), retrying",
                report.subject, rs.attempt_number, _describe(rs.outcome.exception()),
            ),
        )
        try:
            for attempt in retrying:
                with attempt:
                    done = attempt.retry_state.attempt_number
                    result = _send_once(msg, sender, rcpt, notif, ssl_context, timeout)
            refused = {k: _describe_refusal(v) for k, v in (result or {}).items()}
            if refused:
                error = "refused by the server: " + "; ".join(f"{k} ({v})" for k, v in refused.items())
        except RetryError as exc:  # pragma: no cover - reraise=True makes this unusual
            error = _describe(exc.last_attempt.exception())
        except (OSError, smtplib.SMTPException, VmrepError) as exc:
            error = _describe(exc)
    ok = error is None
    # Partly refused: delivered to the others; recorded ok with the refusals as the error.
    if refused and len(refused) < len(rcpt):
        ok = True
    if ok and not refused:
        log.info("emailed %r to %s", report.subject, ", ".join(rcpt))
    else:
        log.error("email %r to %s: %s (report kept at %s)", report.subject,
                  ", ".join(rcpt) or "nobody", error, report_path or "nowhere: not written")

    delivery = Delivery(ok=ok, recipients=rcpt, subject=report.subject, attempts=done,
                        error=error, message_id=message_id, refused=refused)
    if store is not None:
        try:
            delivery.delivery_id = _record(store, report, delivery, attempted_at, report_path)
        except Exception:
            log.exception("could not record the email delivery of %r", report.subject)
            if raise_on_failure:
                raise
    if raise_on_failure and not ok:
        raise MailError(f"email {report.subject!r} to {', '.join(rcpt) or 'nobody'}: {error}")
    return delivery


def _describe_refusal(v: Any) -> str:
    if isinstance(v, tuple) and len(v) == 2:
        code, msg = v
        msg = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
        return f"{code} {msg}"
    return str(v)


def _record(store: Any, report: Report, d: Delivery, attempted_at: datetime, report_path: str | None) -> int:
    return store.record_email(
        report.kind,
        report.ref,
        d.recipients,
        report.subject,
        d.ok,
        error=d.error,
        attempts=d.attempts,
        attempted_at=attempted_at,
        report_path=report_path,
    )


__all__ = ["send_report", "email_owners", "report_recipients", "build_message", "Delivery", "MailError"]
