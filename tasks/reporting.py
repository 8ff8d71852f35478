"""The report tasks: write a report (HTML, CSVs, Prefect artifacts) and email it. The
report flows (flows/reports.py) and the DR-test flows run them.

The email is its own task so that a send that still fails after its retries
(reports.mail retries with backoff) shows as a failed `email-report` task run, while
the delivery is recorded in the state database either way.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from reports.artifacts import publish_artifacts, publish_email_outcome
from reports.compliance import build_compliance_report
from reports.dr_test import build_dr_test_report
from reports.mail import MailError, email_owners
from reports.period import reports_dir
from reports.report import Report
from vmrep.runtime import get_runtime

log = logging.getLogger(__name__)


def run_logger() -> Any:
    """The Prefect run's logger inside a flow or task run, this module's outside one."""
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
    run_logger().info("%s: %s, written to %s", report.title, report.verdict, report.paths["html"])
    return report


@task(name="email-report", cache_policy=NO_CACHE, retries=0, timeout_seconds=600)
def email_report(config: str, report: Report) -> dict[str, Any]:
    """Email the report (reports.mail retries with backoff). Records the delivery; when it
    still fails, raises MailError so this task shows as Failed in the UI (callers wait on
    it with return_state=True: the report and the operation are not failed by it)."""
    rt = get_runtime(config)
    d = email_owners(report, rt.config, rt.store)
    publish_email_outcome(report, d)
    logger = run_logger()
    if d.ok:
        logger.info("emailed %r to %s", report.subject, ", ".join(d.recipients))
        return d.as_dict()
    logger.error("email of %r to %s failed after %d attempt(s): %s (recorded as delivery %s)",
                 report.subject, ", ".join(d.recipients) or "nobody", d.attempts, d.error, d.delivery_id)
    raise MailError(f"email {report.subject!r} failed after {d.attempts} attempt(s): {d.error}")
