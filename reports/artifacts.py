"""Publish a report as Prefect artifacts (only inside a flow or task run: a no-op elsewhere).

- a table artifact with the key figures (one row per figure; for a compliance report one
  row per VPG),
- a link artifact to the HTML file (when it has been written),
- a markdown artifact: verdict, reasons and where the files are.

Keys are stable per subject (`dr-test-<vpg>`, `compliance-<vpgs>`), so the Prefect UI
shows each report's history under one key.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from uuid import UUID

from reports.report import Report, slug

if TYPE_CHECKING:
    from reports.mail import Delivery

log = logging.getLogger(__name__)


def in_run_context() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _cell(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, default=str)


def table_rows(report: Report) -> list[dict[str, Any]]:
    f = report.figures
    if report.kind == "compliance":
        keep = ("vpg", "verdict", "samples", "rpo_met_share", "rpo_p95_seconds", "rpo_max_seconds",
                "rpo_target_seconds", "history_met_share", "history_min_seconds", "last_test_at",
                "last_test_success", "test_overdue", "tests", "failovers", "moves", "alerts", "reasons")
        return [{k: _cell(s.get(k)) for k in keep} for s in f["vpgs"].values()]
    return [{"figure": k, "value": _cell(v)} for k, v in f.items()]


def artifact_key(report: Report) -> str:
    if report.kind == "dr_test":
        return slug(f"dr-test-{report.vpgs[0] if report.vpgs else 'vpg'}", 100)
    return slug(f"{report.kind}-{'-'.join(report.vpgs)}", 100)


def markdown(report: Report) -> str:
    f = report.figures
    lines = [f"# {report.title}", "", f"**Verdict: {report.verdict or f.get('verdict', '')}**", ""]
    reasons = f.get("reasons") or []
    if report.kind == "compliance":
        lines += ["| VPG | verdict | why |", "|---|---|---|"]
        for s in f["vpgs"].values():
            why = "; ".join(s.get("reasons") or []) or "-"
            lines.append(f"| {_md(s['vpg'])} | {s['verdict']} | {_md(why)} |")
    else:
        lines += [f"- {_md(r)}" for r in reasons]
    if report.paths:
        lines += ["", "Files:"] + [f"- {name}: `{p}`" for name, p in report.paths.items()]
    return "\n".join(lines)


def _md(text: Any) -> str:
    """Markdown-inert text (names come from users: no links, no HTML, no table breaks)."""
    s = str(text)
    for ch in "\\`*_[]<>|#!":
        s = s.replace(ch, "\\" + ch)
    return s


def publish_artifacts(report: Report) -> list[UUID] | None:
    """Create the artifacts when running inside a Prefect flow/task run; else do nothing.

    Returns the artifact ids, or None outside a run. Failures to publish are logged, not
    raised: artifacts are a view, the report files are the record.
    """
    if not in_run_context():
        return None
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    key = artifact_key(report)
    ids: list[UUID] = []
    try:
        ids.append(create_table_artifact(table=table_rows(report), key=key,
                                         description=report.subject, _sync=True))
        html = report.paths.get("html")
        if html is not None:
            ids.append(create_link_artifact(link=html.resolve().as_uri(), link_text=f"{_md(report.title)} (HTML)",
                                            key=f"{key}-html", description=str(html), _sync=True))
        ids.append(create_markdown_artifact(markdown=markdown(report), key=f"{key}-summary",
                                            description=report.subject, _sync=True))
    except Exception:
        log.exception("could not publish the artifacts of %r", report.subject)
    return ids


def publish_email_outcome(report: Report, d: Delivery) -> None:
    """Make the email's outcome visible in the Prefect UI beside the report's artifacts
    (an `<key>-email` markdown artifact); outside a run, or when it fails, nothing."""
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


__all__ = ["publish_artifacts", "publish_email_outcome", "in_run_context", "artifact_key", "table_rows"]
