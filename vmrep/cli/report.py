"""Report commands: `vmrep report dr-test`, `vmrep report compliance`, `vmrep report emails`.

Quick commands: they read the state database directly (no Prefect run, no server), write
the HTML and its CSVs, print the paths, and email the report only when asked (`--email`).
The scheduled flows in flows/reports.py do the same and also publish Prefect artifacts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from reports.period import parse_period, parse_when, reports_dir
from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json
from vmrep.cli.values import require_positive, writable_place
from vmrep.errors import UsageError, VmrepError
from vmrep.stamps import utcnow

__all__ = ["parse_period", "parse_when", "reports_dir", "report_app", "resolve_test_operation"]

report_app = typer.Typer(help="DR-test and compliance reports (HTML + CSV), and their emails.",
                         no_args_is_help=True)
app.add_typer(report_app, name="report")


# reports_dir, parse_when and parse_period are shared with the report flows (reports.period).


def resolve_test_operation(store: Any, run_id: str | None) -> str | None:
    """The test operation a RUN_ID names: an operation id, the Prefect flow run id of the
    DR-test run, or a unique prefix of either (as the UI and logs show them shortened)."""
    if run_id is None:
        return None
    ops = store.frame("operations", kind="test")
    if ops.empty:
        raise VmrepError(f"no DR test {run_id!r}: none has been recorded in the state database yet")
    for col in ("id", "flow_run_id"):
        hit = ops[ops[col].astype(str) == run_id]
        if len(hit):
            return str(hit.iloc[-1]["id"])
    hits = ops[ops["id"].astype(str).str.startswith(run_id) | ops["flow_run_id"].astype(str).str.startswith(run_id)]
    if len(hits) == 1:
        return str(hits.iloc[0]["id"])
    if len(hits) > 1:
        raise VmrepError(f"{run_id!r} matches {len(hits)} DR tests; give more of the id")
    other = store.operation(run_id)
    if other is not None:
        raise VmrepError(f"operation {run_id} is a {other.kind}, not a DR test")
    raise VmrepError(f"no DR test with operation or flow run id {run_id!r} (see `vmrep report emails` "
                     "or the Prefect UI for ids)")


def _show(report: Any, delivery: Any, json_out: bool) -> None:
    out = {"kind": report.kind, "ref": report.ref, "title": report.title, "verdict": report.verdict,
           "vpgs": list(report.vpgs), "subject": report.subject, "paths": {k: str(v) for k, v in report.paths.items()}}
    if delivery is not None:
        out["email"] = {"ok": delivery.ok, "recipients": delivery.recipients, "attempts": delivery.attempts,
                        "error": delivery.error, "delivery_id": delivery.delivery_id}
    if json_out:
        print_json(out)
        return
    console.print(f"{report.title}: {report.verdict}", markup=False)
    for name, path in report.paths.items():
        console.print(f"  {name:<16} {path}", markup=False)
    if delivery is not None:
        if delivery.ok:
            console.print(f"  emailed to {', '.join(delivery.recipients)}", markup=False)
        else:
            console.print(f"  email FAILED after {delivery.attempts} attempt(s): {delivery.error} "
                          "(recorded; see `vmrep report emails`)", markup=False)


def _issue(rt: Any, build: Callable[[], Any], out: Path | None, fmt: str, email: bool, json_out: bool) -> None:
    """Build a report (a ReportError in one line), write it, mail it if asked, show it."""
    from reports.frames import ReportError

    try:
        report = build()
    except ReportError as exc:
        raise VmrepError(str(exc)) from None
    report.write(out or reports_dir(rt.config), fmt)
    _show(report, _send(report, rt) if email else None, json_out)


def _send(report: Any, rt: Any) -> Any:
    from reports.mail import email_owners

    return email_owners(report, rt.config, rt.store)


OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="HTML file to write (CSVs beside it), or a folder; "
                                     "default: vmrep.d/reports beside the config"),
]
FormatOpt = Annotated[str, typer.Option("--format", help="html (default) or pdf; the CSVs are written with either")]


def _format(fmt: str) -> str:
    """The --format value checked before any work (an unknown one: one line, exit 2)."""
    from reports.report import FORMATS

    f = fmt.strip().lower()
    if f not in FORMATS:
        raise UsageError(f"--format: no format {fmt!r} (choose {' or '.join(FORMATS)})")
    return f


EmailOpt = Annotated[bool, typer.Option("--email/--no-email", help="also email it to the VPGs' email_to "
                                                                  "and notifications.default_to")]


@report_app.command("dr-test")
def report_dr_test(
    run_id: Annotated[str | None, typer.Argument(
        metavar="[RUN_ID]", help="operation id or Prefect flow run id of the test (default: the latest test)")] = None,
    out: OutOpt = None,
    email: EmailOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    fmt: FormatOpt = "html",
) -> None:
    """The report of one DR test: verdict, RPO achieved, RTO measured, per-VM steps and verification."""
    from reports import build_dr_test_report
    from vmrep.runtime import get_runtime

    fmt = _format(fmt)
    if out is not None:
        writable_place(out, "--out")
    rt = get_runtime(config_from(config).source)
    op_id = resolve_test_operation(rt.store, run_id)
    _issue(rt, lambda: build_dr_test_report(rt.store.engine, op_id, rt.config), out, fmt, email, json_out)


@report_app.command("compliance")
def report_compliance(
    since: Annotated[str, typer.Option(help="start: a duration back from now (30d, 12h), a date "
                                            "(2025-10-01), previous-month, this-month or YYYY-MM")] = "30d",
    until: Annotated[
        str | None, typer.Option(help="end (exclusive): a date or a duration back from now; default now")
    ] = None,
    vpg: Annotated[list[str] | None, typer.Option("--vpg", help="only this VPG (repeatable); default all")] = None,
    out: OutOpt = None,
    email: EmailOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    fmt: FormatOpt = "html",
) -> None:
    """Compliance over a period, per VPG: RPO met, journal history met, tests done and not overdue."""
    from reports import build_compliance_report
    from vmrep.runtime import get_runtime

    fmt = _format(fmt)
    now = utcnow()
    key = since.strip().lower()
    if key in ("previous-month", "this-month") or re.fullmatch(r"\d{4}-\d{2}", key):
        if until is not None:
            raise VmrepError(f"--since {since} names a whole period; leave out --until")
        try:
            start, end = parse_period(key, now)
        except ValueError as exc:
            raise VmrepError(f"--since: {exc}") from None
    else:
        start = parse_when(since, now, "--since")
        end = parse_when(until, now, "--until") if until is not None else now
        if start >= end:
            given = f"--since {since!r}" + (f" --until {until!r}" if until is not None else "")
            raise UsageError(f"{given}: the period must end after it starts")
    if out is not None:
        writable_place(out, "--out")
    rt = get_runtime(config_from(config).source)
    if vpg:
        for name in vpg:
            rt.config.vpg(name)  # an unknown name is an error naming the known ones
    _issue(rt, lambda: build_compliance_report(rt.store.engine, start, end, list(vpg) if vpg else None, rt.config),
           out, fmt, email, json_out)


@report_app.command("emails")
def report_emails(
    failed: Annotated[bool, typer.Option("--failed", help="only deliveries that failed")] = False,
    last: Annotated[int, typer.Option(help="at most this many, newest last")] = 20,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Report and alert emails sent: when, to whom, attempts, and the error of those that failed."""
    from vmrep.runtime import get_runtime

    require_positive(last, "--last")
    rt = get_runtime(config_from(config).source)
    df = rt.store.frame("email_deliveries", **({"ok": False} if failed else {}))
    df = df.tail(last)
    rows = [{"id": int(r["id"]), "attempted_at": r["attempted_at"].isoformat(), "kind": r["kind"], "ref": r["ref"],
             "ok": bool(r["ok"]), "attempts": int(r["attempts"]), "recipients": r["recipients"],
             "subject": r["subject"], "error": r["error"] if isinstance(r["error"], str) else None,
             "report_path": r["report_path"] if isinstance(r["report_path"], str) else None}
            for r in df.to_dict("records")]
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("no email deliveries recorded" + (" that failed" if failed else ""), markup=False)
    for r in rows:
        state = "sent  " if r["ok"] else "FAILED"
        console.print(f"{r['attempted_at'][:19]}  {state} {r['kind']:<10} to {r['recipients'] or '-'}  "
                      f"{r['subject'] or ''}" + (f"  ({r['attempts']} attempts: {r['error']})" if not r["ok"] else ""),
                      markup=False)
