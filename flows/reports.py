"""Reports as Prefect flows: the DR-test report after every test, the compliance report
on a schedule, and a notify flow that an automation runs when an alert is raised.

Every report is written to disk (HTML and CSVs, under `reports.period.reports_dir`),
published as Prefect artifacts (a table, a link to the HTML, a summary) and emailed to
the VPGs' `email_to` and `notifications.default_to`, by the tasks of tasks/reporting.py.
A send that still fails after its retries is recorded in the state database
(`email_deliveries`, `vmrep report emails`), shown as a failed `email-report` task and an
`...-email` artifact in the Prefect UI, and never fails the operation whose report it is:
the report stays on disk and in Prefect.

    from flows.reports import dr_test_report
    dr_test_report(config_path, operation_id)      # at the end of a DR-test flow; never raises
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import flow_run_id
from reports.alert import alert_report
from reports.period import parse_period
from reports.report import Report
from tasks.reporting import email_report, run_logger, write_report
from vmrep.runtime import get_runtime


def _deliver(config: str, report: Report, send: bool) -> dict[str, Any]:
    out = report.summary()
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
    logger = run_logger()
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
        return report.summary()


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


__all__ = ["compliance_report", "dr_test_report", "dr_test_report_flow", "notify"]
