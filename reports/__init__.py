"""Reports from vmrep's state database: DR-test and compliance reports as HTML (CSS
inlined, charts inline, no scripts), plain text and CSV; emailed and published as Prefect
artifacts.

    report = build_dr_test_report(store.engine, None, config)     # the latest test
    report.write(Path("reports-out"))                             # HTML + CSVs
    send_report(report, report_recipients(report, config), config.notifications, store)
    publish_artifacts(report)                                     # inside a flow run
"""

from reports.artifacts import publish_artifacts
from reports.compliance import build_compliance_report
from reports.dr_test import build_dr_test_report
from reports.frames import ReportError
from reports.mail import Delivery, MailError, report_recipients, send_report
from reports.report import Report

__all__ = [
    "Delivery",
    "MailError",
    "Report",
    "ReportError",
    "build_compliance_report",
    "build_dr_test_report",
    "publish_artifacts",
    "report_recipients",
    "send_report",
]
