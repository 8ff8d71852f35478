"""Monitoring commands: status, alerts, monitor --once."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from reports.status import short_seconds as _secs
from reports.status import status_rows
from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json
from vmrep.cli.values import require_positive
from vmrep.errors import UsageError
from vmrep.cli.server import run_flow


@app.command()
def status(
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh the table in place until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch")] = 2.0,
) -> None:
    """One row per VPG: status, RPO against target, history, last test, open alerts."""
    from vmrep.runtime import get_runtime

    require_positive(interval, "--interval")
    if watch and json_out:
        raise UsageError("--watch and --json: choose one (--json prints once, for a program)")
    rt = get_runtime(config_from(config).source)
    if json_out:
        print_json(status_rows(rt))
        return
    if not watch:
        console.print(_status_table(status_rows(rt)))
        return
    _watch_status(rt, interval)


def _watch_status(rt: Any, interval: float) -> None:
    """The table redrawn in place (rich Live) every `interval` seconds; Ctrl-C or SIGTERM
    is how it ends, so that is a success (exit 0), with the last table left on screen."""
    import time
    from datetime import datetime, timezone

    from rich.live import Live

    from vmrep.cli import signals

    signals.stop_ends_successfully()

    def table() -> Table:
        t = _status_table(status_rows(rt))
        t.caption = f"refreshed {datetime.now(timezone.utc):%H:%M:%S} UTC, every {interval:g} s; Ctrl-C ends"
        return t

    # auto_refresh off: a redraw only when the rows were read again, not 4 times a second
    with Live(table(), console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(table(), refresh=True)
        except KeyboardInterrupt:
            return


def _status_table(rows: list[dict[str, Any]]) -> Table:
    t = Table("VPG", "status", "RPO / target", "history / configured", "last test", "alerts")
    for r in rows:
        test = "never" if r["last_test_at"] is None else \
            f"{r['last_test_at'][:16]} {'ok' if r['last_test_success'] else 'FAILED'}"
        t.add_row(r["vpg"], f"{r['status']}" + (f" / {r['substatus']}" if r["substatus"] else ""),
                  f"{_secs(r['rpo_seconds'])} / {_secs(r['rpo_target_seconds'])}",
                  f"{_secs(r['history_seconds'])} / {_secs(r['history_target_seconds'])}", test,
                  ", ".join(a["code"] for a in r["alerts"]) or "-")
    return t


@app.command()
def alerts(
    all_: Annotated[bool, typer.Option("--all", help="also cleared alerts")] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Open alerts (or all, with --all), oldest first."""
    from vmrep.runtime import get_runtime

    rt = get_runtime(config_from(config).source)
    rows = rt.store.frame("alerts") if all_ else None
    items = ([r for r in rows.to_dict("records")] if rows is not None
             else [a.__dict__ for a in rt.store.open_alerts()])
    out = [{"vpg": a["vpg"], "vm": a.get("vm"), "code": a["code"], "level": a["level"], "text": a["text"],
            "raised_at": _iso(a["raised_at"]), "cleared_at": _iso(a.get("cleared_at"))} for a in items]
    out.sort(key=lambda a: a["raised_at"] or "")
    if json_out:
        print_json(out)
        return
    if not out:
        console.print("no alerts", markup=False)
    for a in out:
        state = f"cleared {a['cleared_at'][:19]}" if a["cleared_at"] else "open"
        console.print(f"{a['raised_at'][:19]}  {a['level']:<7} {a['code']:<24} {state:<28} {a['text']}",
                      markup=False)


def _iso(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


@app.command()
def monitor(
    once: Annotated[bool, typer.Option("--once", help="one pass, then exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between passes")] = 60.0,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Judge every VPG (RPO, history, tests, configuration), raise and clear alerts."""
    import time

    from flows.monitor import monitor as flow

    require_positive(interval, "--interval")
    path = str(config_from(config).source)
    from vmrep.runtime import get_runtime

    rt = get_runtime(path)  # the monitor judges journals: it runs where they are
    rt.ensure_local_journal([v.name for v in rt.config.vpgs])
    while True:
        out = run_flow(flow, path)
        if json_out:
            print_json(out)
        else:
            for r in out:
                console.print(f"{r['vpg']}: {r['status']}" + (f" / {r['substatus']}" if r["substatus"] else "")
                              + f", RPO {_secs(r['rpo_seconds'])}, alerts: {', '.join(r['alerts']) or '-'}",
                              markup=False)
        if once:
            return
        time.sleep(interval)


