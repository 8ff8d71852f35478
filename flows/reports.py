"""Reports as Prefect flows and tasks: the DR-test report after every test, the
compliance report on a schedule, and a notify flow that an automation runs when an
alert is raised.

Every report is written to disk (HTML and CSVs, under `reports_dir(config)`), published
as Prefect artifacts (a table, a link to the HTML, a summary) and emailed to the VPGs'
`email_to` and `notifications.default_to`. The email is its own task: a send that still
fails after its retries (reports.mail retries with backoff) is recorded in the state
database (`email_deliveries`, `vmrep report emails`), shown as a failed `email-report`
task and an `...-email` artifact in the Prefect UI, and never fails the operation whose
report it is: the report stays on disk and in Prefect.

    from flows.reports import dr_test_report
    dr_test_report(config_path, operation_id)      # at the end of a DR-test flow; never raises
"""

from __future__ import annotations

import html
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from reports import Report, build_compliance_report, build_dr_test_report, publish_artifacts
from reports.artifacts import artifact_key, in_run_context
from reports.mail import Delivery, MailError, report_recipients, send_report
from reports.report import slug
from vmrep.cli.report import parse_period, reports_dir  # plain helpers, shared with the CLI
from vmrep.runtime import get_runtime

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Plain helpers (reports_dir and parse_period live in vmrep.cli.report, free of Prefect)


def delivery_dict(d: Delivery | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"ok": d.ok, "recipients": d.recipients, "subject": d.subject, "attempts": d.attempts,
            "error": d.error, "delivery_id": d.delivery_id, "refused": d.refused}


def report_summary(report: Report) -> dict[str, Any]:
    return {"kind": report.kind, "ref": report.ref, "title": report.title, "subject": report.subject,
            "verdict": report.verdict, "vpgs": list(report.vpgs),
            "paths": {k: str(v) for k, v in report.paths.items()}}


def email(report: Report, rt: Any, **mail_options: Any) -> Delivery:
    """Send `report` to its recipients; recorded in the state database; never raises."""
    recipients = report_recipients(report, rt.config)
    return send_report(report, recipients, rt.config.notifications, rt.store, **mail_options)


def _email_artifact(report: Report, d: Delivery) -> None:
    """Make the email's outcome visible in the Prefect UI beside the report's artifacts."""
    if not in_run_context():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        to = ", ".join(d.recipients) or "nobody (no email_to and no notifications.default_to)"
        if d.ok:
            text = f"**Emailed** to {to} ({d.attempts} attempt(s)).\n\nSubject: {report.subject}"
        else:
            text = (f"**Email FAILED** after {d.attempts} attempt(s) to {to}.\n\nError: `{d.error}`\n\n"
                    "The report is on disk and in the other artifacts; the failure is recorded "
                    "(`vmrep report emails`).")
        create_markdown_artifact(markdown=text, key=f"{artifact_key(report)}-email",
                                 description=report.subject, _sync=True)
    except Exception:  # noqa: BLE001 - a view, never the record
        log.exception("could not publish the email artifact of %r", report.subject)


# --------------------------------------------------------------------------------------
# Tasks


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run
        return log


@task(name="write-report", cache_policy=NO_CACHE, retries=0, timeout_seconds=300)
def write_report(config: str, kind: str, operation_id: str | None = None,
                 since: datetime | None = None, until: datetime | None = None,
                 vpgs: list[str] | None = None, out_dir: str | None = None) -> Report:
    """Build the report from the state database, write HTML and CSVs, publish the artifacts."""
    rt = get_runtime(config)
    if kind == "dr_test":
        report = build_dr_test_report(rt.store.engine, operation_id, rt.config)
    elif kind == "compliance":
        if since is None or until is None:
            raise ValueError("a compliance report needs since and until")
        report = build_compliance_report(rt.store.engine, since, until, vpgs, rt.config)
    else:
        raise ValueError(f"no report kind {kind!r}")
    out = Path(out_dir) if out_dir else reports_dir(rt.config)
    report.write(out)
    publish_artifacts(report)
    _logger().info("%s: %s, written to %s", report.title, report.verdict, report.paths["html"])
    return report


@task(name="email-report", cache_policy=NO_CACHE, retries=0, timeout_seconds=600)
def email_report(config: str, report: Report) -> dict[str, Any]:
    """Email the report (reports.mail retries with backoff). Records the delivery; when it
    still fails, raises MailError so this task shows as Failed in the UI (callers wait on
    it with return_state=True: the report and the operation are not failed by it)."""
    rt = get_runtime(config)
    d = email(report, rt)
    _email_artifact(report, d)
    logger = _logger()
    if d.ok:
        logger.info("emailed %r to %s", report.subject, ", ".join(d.recipients))
        return delivery_dict(d) or {}
    logger.error("email of %r to %s failed after %d attempt(s): %s (recorded as delivery %s)",
                 report.subject, ", ".join(d.recipients) or "nobody", d.attempts, d.error, d.delivery_id)
    raise MailError(f"email {report.subject!r} failed after {d.attempts} attempt(s): {d.error}")


def _deliver(config: str, report: Report, send: bool) -> dict[str, Any]:
    out = report_summary(report)
    out["email"] = None
    if send:
        state = email_report(config, report, return_state=True)
        try:
            out["email"] = state.result(raise_on_failure=True)
        except Exception as exc:  # noqa: BLE001 - recorded, visible, not fatal
            out["email"] = {"ok": False, "error": str(exc)}
    return out


def _test_operation(config: str, operation_id: str | None, vpg: str | None) -> str | None:
    """The test operation to report: the id given; else the one this flow run recorded;
    else (with `vpg`) the VPG's latest test if it ended during this flow run or has not
    ended. None: there is nothing to report (a test refused before it started records no
    operation; a stop refused because no test runs ended none)."""
    if operation_id:
        return operation_id
    store = get_runtime(config).store
    from flows._common import flow_run_id

    fr = flow_run_id()
    if fr:
        ops = store.frame("operations", flow_run_id=fr, kind="test")
        if len(ops):
            return str(ops.iloc[-1]["id"])
    if vpg:
        ops = store.frame("operations", vpg=vpg, kind="test")
        if len(ops):
            last = ops.sort_values("started_at").iloc[-1]
            run_start = _run_start()
            ended = last["ended_at"]
            if ended is None or ended != ended or run_start is None or ended >= run_start:  # NaT != NaT
                return str(last["id"])
    return None


def _run_start() -> Any:
    try:
        import pandas as pd
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        run = ctx.flow_run if ctx is not None else None
        start = (run.start_time or run.expected_start_time) if run is not None else None
        return pd.Timestamp(start).tz_convert("UTC") if start else None
    except Exception:  # noqa: BLE001 - outside a run
        return None


def dr_test_report(config: str, operation_id: str | None = None, *, vpg: str | None = None,
                   send_email: bool = True, out_dir: str | None = None) -> dict[str, Any] | None:
    """The DR-test report of one test operation: written, published, emailed.

    Meant for the end of the DR-test flows (inside a flow run), passed or failed. Without
    an id it reports the test this flow run recorded (or, given `vpg`, the VPG's latest).
    Never raises: a report that cannot be built or sent is logged (and the email
    recorded), the test's own result stands. Returns the report's summary, or None.
    """
    logger = _logger()
    try:
        op_id = _test_operation(config, operation_id, vpg)
        if op_id is None:
            logger.warning("no DR test was recorded by this run: no report to send")
            return None
        state = write_report(config, "dr_test", operation_id=op_id, out_dir=out_dir, return_state=True)
        report = state.result(raise_on_failure=True)
    except Exception as exc:  # noqa: BLE001 - the report must never fail the test
        logger.error("DR-test report for operation %s could not be written: %s", operation_id, exc)
        return None
    try:
        return _deliver(config, report, send_email)
    except Exception as exc:  # noqa: BLE001
        logger.error("DR-test report %s: email step failed: %s", report.subject, exc)
        return report_summary(report)


# --------------------------------------------------------------------------------------
# Flows


@flow(name="dr-test-report")
def dr_test_report_flow(config: str = "vmrep.yaml", operation_id: str | None = None,
                        send_email: bool = True) -> dict[str, Any]:
    """Write, publish and email the report of a DR test (the latest when no id is given).

    Runs on its own when a report must be issued again; the DR-test flow does the same
    at the end of every test.
    """
    report = write_report(config, "dr_test", operation_id=operation_id)
    return _deliver(config, report, send_email)


@flow(name="compliance-report")
def compliance_report(config: str = "vmrep.yaml", period: str = "previous-month",
                      vpgs: list[str] | None = None, send_email: bool = True) -> dict[str, Any]:
    """Did every VPG meet its RPO, journal history and test objectives over the period?
    Written, published as artifacts and emailed to the VPGs' owners and default_to."""
    since, until = parse_period(period)
    report = write_report(config, "compliance", since=since, until=until, vpgs=vpgs or None)
    out = _deliver(config, report, send_email)
    out["since"], out["until"] = since.isoformat(), until.isoformat()
    return out


def alert_report(vpg: str, subject: str, text: str, *, event: str | None = None,
                 occurred: str | None = None, ref: str | None = None) -> Report:
    """A short notification email as a Report (so it goes through the same mailer and is
    recorded in email_deliveries with kind 'alert')."""
    now = datetime.now(timezone.utc)
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
                  generated_at=now, verdict="")


@flow(name="notify")
def notify(config: str = "vmrep.yaml", vpg: str = "", subject: str = "vmrep alert",
           text: str = "", event: str | None = None, occurred: str | None = None,
           alert_id: int | None = None) -> dict[str, Any]:
    """Email the VPG's owners (email_to, then notifications.default_to) about an event.

    Prefect's open-source server has no SMTP notification block, so the automation on
    `vmrep.alert.raised` runs this deployment with the event's fields as parameters.
    """
    report = alert_report(vpg, subject, text or subject, event=event, occurred=occurred,
                          ref=f"{vpg}:alert:{alert_id}" if alert_id is not None else None)
    state = email_report(config, report, return_state=True)
    # The notification is the whole purpose here: a failed send fails this run.
    return state.result(raise_on_failure=True)


__all__ = [
    "compliance_report",
    "dr_test_report",
    "dr_test_report_flow",
    "email",
    "email_report",
    "notify",
    "parse_period",
    "reports_dir",
    "write_report",
]
