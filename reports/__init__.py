"""Reports from vmrep's state database: DR-test and compliance reports as HTML (CSS
inlined, charts inline, no scripts), plain text and CSV; emailed and published as Prefect
artifacts.

    report = build_dr_test_report(store.engine, None, config)     # the latest test
    report.write(Path("reports-out"))                             # HTML + CSVs
    email_owners(report, config, store)                           # email_to, default_to
    publish_artifacts(report)                                     # inside a flow run

The names below are imported on first use: the `vmrep` command imports `reports.period`
at start-up, and pandas and matplotlib (the builders') would make every command slow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reports.artifacts import publish_artifacts
    from reports.compliance import build_compliance_report
    from reports.dr_test import build_dr_test_report
    from reports.frames import ReportError
    from reports.mail import Delivery, MailError, email_owners, report_recipients, send_report
    from reports.report import Report

_WHERE = {
    "publish_artifacts": "reports.artifacts",
    "build_compliance_report": "reports.compliance",
    "build_dr_test_report": "reports.dr_test",
    "ReportError": "reports.frames",
    "Delivery": "reports.mail",
    "MailError": "reports.mail",
    "email_owners": "reports.mail",
    "report_recipients": "reports.mail",
    "send_report": "reports.mail",
    "Report": "reports.report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'reports' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value
