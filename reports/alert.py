"""A short notification email as a Report, so an alert goes through the same mailer as
the reports and is recorded in email_deliveries (kind 'alert')."""

from __future__ import annotations

import html

from reports.report import Report, slug
from vmrep.stamps import utcnow


def alert_report(vpg: str, subject: str, text: str, *, event: str | None = None,
                 occurred: str | None = None, ref: str | None = None) -> Report:
    """The email about one event of VPG `vpg`: `text`, the event's name and time, and
    where to look next."""
    lines = [text, "", f"VPG: {vpg}"]
    if event:
        lines.append(f"Event: {event}")
    if occurred:
        lines.append(f"Occurred: {occurred}")
    lines += ["", "See `vmrep status` and `vmrep alerts`, or the Prefect UI (Events, Flow runs)."]
    body = "\n".join(lines)
    page = ("<!doctype html><html><body style=\"font-family:sans-serif\">"
            f"<h2>{html.escape(subject)}</h2><pre style=\"white-space:pre-wrap\">{html.escape(body)}</pre>"
            "</body></html>")
    return Report(kind="alert", ref=(ref or f"{vpg}:{event or 'notify'}")[:200], title=subject,
                  subject=f"[vmrep] {subject}", html=page, text=body, figures={}, frames={},
                  vpgs=[vpg] if vpg else [], basename=f"alert-{slug(vpg or 'vmrep', 40)}",
                  generated_at=utcnow(), verdict="")
