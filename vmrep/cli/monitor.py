"""Monitoring commands: status, alerts, monitor --once."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

import typer
from rich.table import Table

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json
from vmrep.cli.server import run_flow


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.0f}s"
    if v < 7200:
        return f"{v / 60:.0f}m"
    return f"{v / 3600:.1f}h"


def status_rows(rt: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per VPG: the status of the last monitor pass, RPO and history computed now
    from the journal (no vSphere round trip: this is the quick command)."""
    now = now or datetime.now(timezone.utc)
    alerts: dict[str, list[Any]] = {}
    for a in rt.store.open_alerts():
        alerts.setdefault(a.vpg, []).append(a)
    rows = []
    for v in rt.config.vpgs:
        cps = rt.journal.checkpoints(v.name)
        r = rt.store.runtime(v.name)
        tests = rt.store.test_results(v.name)
        rows.append({
            "vpg": v.name,
            "status": r.status,
            "substatus": r.substatus,
            "rpo_seconds": round((now - cps[-1].time).total_seconds(), 1) if cps else None,
            "rpo_target_seconds": v.rpo_target_seconds,
            "history_seconds": round((now - cps[0].time).total_seconds(), 1) if cps else None,
            "history_target_seconds": v.history_seconds,
            "checkpoints": len(cps),
            "last_test_at": tests[0].started_at.isoformat() if tests else None,
            "last_test_success": tests[0].success if tests else None,
            "alerts": [{"code": a.code, "level": a.level, "text": a.text, "vm": a.vm,
                        "raised_at": a.raised_at.isoformat()} for a in alerts.get(v.name, [])],
        })
    return rows


@app.command()
def status(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """One row per VPG: status, RPO against target, history, last test, open alerts."""
    from vmrep.runtime import get_runtime

    rt = get_runtime(config_from(config).source)
    rows = status_rows(rt)
    if json_out:
        print_json(rows)
        return
    t = Table("VPG", "status", "RPO / target", "history / configured", "last test", "alerts")
    for r in rows:
        test = "never" if r["last_test_at"] is None else \
            f"{r['last_test_at'][:16]} {'ok' if r['last_test_success'] else 'FAILED'}"
        t.add_row(r["vpg"], f"{r['status']}" + (f" / {r['substatus']}" if r["substatus"] else ""),
                  f"{_secs(r['rpo_seconds'])} / {_secs(r['rpo_target_seconds'])}",
                  f"{_secs(r['history_seconds'])} / {_secs(r['history_target_seconds'])}", test,
                  ", ".join(a["code"] for a in r["alerts"]) or "-")
    console.print(t)


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

    path = str(config_from(config).source)
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


