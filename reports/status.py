"""The status table: one row per VPG, as `vmrep status` and the demo's summary show it.
Read from the state database and the journal only (no vSphere round trip), so it is
quick enough for a command."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vmrep.stamps import utcnow


def short_seconds(v: float | None) -> str:
    """A duration for a table cell: 42s, 12m, 3.5h; '-' when unknown."""
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.0f}s"
    if v < 7200:
        return f"{v / 60:.0f}m"
    return f"{v / 3600:.1f}h"


def status_rows(rt: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per VPG of runtime `rt`: the status of the last monitor pass, RPO and
    history computed now from the journal, the last test, the open alerts."""
    now = now or utcnow()
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
