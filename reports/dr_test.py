"""DR-test report: one test operation, what it recovered, how fast, and whether it passed."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from reports import charts, frames
from reports.details import LIVE_KINDS, describe, live_operation_words
from reports.frames import ReportError, utc
from reports.render import fmt_duration, missing, render_report
from reports.report import Report, slug
from vmrep.stamps import utcnow

VERIFY_STEP = re.compile(r"verif", re.I)
CLEANUP_STEP = re.compile(r"clean|remove|delete|destroy", re.I)
VPG_LEVEL = "(VPG)"

PASS_RULE = (
    "PASS when the test operation succeeded, the tester recorded success, data "
    "verification passed for every VM, the test VMs and scratch data were cleaned up, no "
    "step failed, and the RTO measured is within its target (when a target is set). "
    "Any of these missing makes the test FAIL; a test still running is IN PROGRESS. "
    "A checkpoint older than the RPO target is reported as a warning only: a test may "
    "deliberately use an older checkpoint."
)


def _vpg_config(config: Any, name: str) -> Any | None:
    if config is None:
        return None
    for v in getattr(config, "vpgs", []) or []:
        if v.name == name:
            return v
    return None


def _val(v: Any) -> Any:
    return None if missing(v) else v


def _num(v: Any) -> float | None:
    return None if missing(v) else float(v)


def _flag(v: Any) -> bool | None:
    return None if missing(v) else bool(v)


def _fold(results: list[str]) -> str:
    """One result for several steps: failed > running > ok > skipped; none -> 'not run'."""
    if not results:
        return "not run"
    for r in ("failed", "running", "ok", "skipped"):
        if r in results:
            return r
    return results[0]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if missing(v):
        return None
    if isinstance(v, (datetime, pd.Timestamp)):
        return utc(v).isoformat()
    if hasattr(v, "item"):  # numpy scalar
        return v.item()
    return v


LIVE_COLUMNS = ["operation_id", "kind", "started_at", "ended_at", "started_by", "result", "rto_seconds",
                "rto_target_seconds", "rto_met", "checkpoint_id", "warnings"]


def _live_operations(engine: Any, vpg: str, since: datetime | None,
                     now: datetime) -> tuple[list[dict[str, Any]], Any, Any]:
    """The VPG's failovers, moves, commits and rollbacks of the test's period: from the
    test's start until the VPG's next test starts (or the report is made). A test vouches
    for the VPG until the next one; what recovered it for real meanwhile, and what went
    short of plan then (a source not shut down, a missed RTO), belongs beside it."""
    if since is None:
        return [], None, None
    since = utc(since)
    assert since is not None  # a started_at read from the database
    later = frames.operations(engine, [vpg], since + timedelta(microseconds=1), now, kinds=("test",))
    until = utc(later["started_at"].min()) if len(later) else now
    ops = frames.operations(engine, [vpg], since, until, kinds=LIVE_KINDS)
    rows = []
    for _, o in ops.iterrows():
        d = o.to_dict()
        rto, target = _num(d.get("rto_seconds")), _num(d.get("rto_target_seconds"))
        rows.append(_jsonable({
            "operation_id": str(d["id"]), "kind": str(d["kind"]), "started_at": _val(d["started_at"]),
            "ended_at": _val(d.get("ended_at")), "started_by": _val(d.get("started_by")),
            "result": str(d["result"]), "rto_seconds": rto, "rto_target_seconds": target,
            "rto_met": None if rto is None or target is None else rto <= target,
            "checkpoint_id": _val(d.get("checkpoint_id")), "warnings": live_operation_words(d)}))
    return rows, _jsonable(since), _jsonable(until)


def build_dr_test_report(
    engine: Any, operation_id: str | None = None, config: Any = None, *, now: datetime | None = None
) -> Report:
    """The report of one DR test (the latest test operation when no id is given)."""
    now = utc(now) or utcnow()
    op = frames.operation(engine, operation_id, kind="test")
    op_id = str(op["id"])
    vpg = str(op["vpg"])
    steps = frames.operation_steps(engine, op_id)
    tr = frames.test_result(engine, op_id)
    vpg_cfg = _vpg_config(config, vpg)

    # Targets: the VPG's configuration; for a VPG no longer configured, the last sample.
    rpo_target = _num(getattr(vpg_cfg, "rpo_target_seconds", None))
    if rpo_target is None:
        last = frames.latest_sample(engine, vpg, op["started_at"])
        rpo_target = _num(last["rpo_target_seconds"]) if last else None
    rto_target = _num(op.get("rto_target_seconds"))
    if rto_target is None:
        rto_target = _num(getattr(vpg_cfg, "rto_target_seconds", None))

    started_at = _val(op["started_at"])
    ended_at = _val(op["ended_at"])
    running = op["result"] == "running"
    rpo_achieved = _num(op.get("checkpoint_age_seconds"))
    if rpo_achieved is None and not missing(op.get("checkpoint_time")) and started_at is not None:
        # The age of the checkpoint when the test started: the RPO this recovery achieved.
        rpo_achieved = (started_at - op["checkpoint_time"]).total_seconds()
    rto = _num(op.get("rto_seconds"))

    # ---- steps and per-VM summary
    steps = steps.copy()
    steps["vm_label"] = steps["vm"].map(lambda v: VPG_LEVEL if missing(v) or v == "" else str(v))
    # In words for the reader; the steps CSV keeps the recorded detail whole (JSON).
    steps["detail_text"] = [describe(str(st), d) for st, d in zip(steps["step"], steps["detail"], strict=True)]
    steps["error"] = steps["error"].map(lambda e: None if missing(e) or e == "" else str(e))
    vm_labels = list(dict.fromkeys(steps["vm_label"]))
    if VPG_LEVEL in vm_labels:  # VPG-wide steps first
        vm_labels.remove(VPG_LEVEL)
        vm_labels.insert(0, VPG_LEVEL)
    vpg_cleanup = _fold(
        steps.loc[(steps["vm_label"] == VPG_LEVEL) & steps["step"].str.contains(CLEANUP_STEP), "result"]
        .astype(str).tolist()
    )
    vms: list[dict[str, Any]] = []
    for label in vm_labels:
        sub = steps[steps["vm_label"] == label]
        results = sub["result"].astype(str).tolist()
        first = sub["started_at"].min()
        last = sub["ended_at"].max() if sub["ended_at"].notna().all() else None
        verification = _fold(sub.loc[sub["step"].str.contains(VERIFY_STEP), "result"].astype(str).tolist())
        cleanup = _fold(sub.loc[sub["step"].str.contains(CLEANUP_STEP), "result"].astype(str).tolist())
        if cleanup == "not run" and label != VPG_LEVEL and vpg_cleanup != "not run":
            cleanup = vpg_cleanup  # cleaned up by a VPG-wide step
        vms.append(
            {
                "vm": label,
                "vpg_level": label == VPG_LEVEL,
                "steps": len(sub),
                "steps_ok": results.count("ok"),
                "steps_failed": results.count("failed"),
                "started_at": _val(first),
                "ended_at": _val(last),
                "duration_seconds": (last - first).total_seconds() if last is not None and not missing(first) else None,
                "verification": verification,
                "cleanup": cleanup,
                "errors": "; ".join(e for e in sub["error"].tolist() if e),
                "step_rows": sub.to_dict("records"),
            }
        )
    real_vms = [v for v in vms if not v["vpg_level"]]

    # ---- the flags the verdict rests on: the tester's record first, the steps otherwise
    success = _flag(tr["success"]) if tr else None
    verification_ok = _flag(tr["verification_ok"]) if tr else None
    if verification_ok is None:
        per_vm = [v["verification"] for v in real_vms]
        if per_vm and all(r in ("ok", "failed") for r in per_vm):
            verification_ok = all(r == "ok" for r in per_vm)
    cleanup_ok = _flag(tr["cleanup_ok"]) if tr else None
    if cleanup_ok is None:
        per_vm = [v["cleanup"] for v in real_vms] or [vpg_cleanup]
        if all(r in ("ok", "failed") for r in per_vm):
            cleanup_ok = all(r == "ok" for r in per_vm)
    steps_failed = int((steps["result"] == "failed").sum())
    rpo_met = None if rpo_achieved is None or rpo_target is None else rpo_achieved <= rpo_target
    rto_met = None if rto is None or rto_target is None else rto <= rto_target

    reasons: list[str] = []
    if op["result"] == "failed":
        reasons.append("the test operation failed")
    elif op["result"] == "cancelled":
        reasons.append("the test operation was cancelled")
    if success is False:
        reasons.append("the tester recorded the test as failed")
    if verification_ok is False:
        bad = [v["vm"] for v in real_vms if v["verification"] == "failed"]
        reasons.append("data verification failed" + (f" ({', '.join(bad)})" if bad else ""))
    elif verification_ok is None and not running:
        reasons.append("no data verification result was recorded")
    if cleanup_ok is False:
        reasons.append("cleanup of the test VMs or scratch data failed")
    if steps_failed:
        reasons.append(f"{steps_failed} step(s) failed")
    if not running and success is None and op["result"] != "succeeded":
        reasons.append("no test result was recorded")
    if running:
        verdict = "IN PROGRESS"
    else:
        verdict = "FAIL" if reasons else "PASS"

    # ---- errors and warnings
    errors: list[dict[str, Any]] = []
    if not missing(op.get("error")) and op.get("error"):
        errors.append({"level": "error", "source": "operation", "at": ended_at, "text": str(op["error"])})
    for _, s in steps[steps["result"] == "failed"].iterrows():
        errors.append(
            {
                "level": "error",
                "source": f"{s['vm_label']} / {s['step']}",
                "at": _val(s["ended_at"]) or _val(s["started_at"]),
                "text": s["error"] or "failed (no message recorded)",
            }
        )
    window_end = ended_at or now
    alerts = frames.alerts(engine, [vpg], started_at or now, window_end) if started_at is not None else pd.DataFrame()
    for _, a in alerts.iterrows():
        src = "alert " + str(a["code"]) + (f" ({a['vm']})" if not missing(a["vm"]) and a["vm"] else "")
        errors.append({"level": str(a["level"]), "source": src, "at": _val(a["raised_at"]), "text": str(a["text"])})
    if rpo_met is False:
        errors.append(
            {
                "level": "warning",
                "source": "checkpoint",
                "at": _val(op.get("checkpoint_time")),
                "text": f"the checkpoint used was {fmt_duration(rpo_achieved)} old, over the RPO target of {fmt_duration(rpo_target)}",
            }
        )
    if rto_met is False:
        # The RTO objective does not decide the test: the VMs were recovered and verified
        # (the test passed, the test-overdue clock is reset); the compliance report counts
        # the miss against the VPG.
        errors.append(
            {
                "level": "warning",
                "source": "recovery time objective",
                "at": ended_at,
                "text": f"RTO {fmt_duration(rto)} exceeds the target {fmt_duration(rto_target)}",
            }
        )
    if tr is None and not running:
        errors.append({"level": "warning", "source": "test result", "at": None, "text": "no test result (success flag, notes) was recorded for this test"})
    live, live_since, live_until = _live_operations(engine, vpg, started_at, now)
    n_errors = sum(1 for e in errors if e["level"] == "error")
    n_warnings = sum(1 for e in errors if e["level"] != "error")

    notes = []
    if tr and not missing(tr.get("notes")) and tr.get("notes"):
        notes.append(("tester", str(tr["notes"])))
    if not missing(op.get("notes")) and op.get("notes"):
        notes.append(("operation", str(op["notes"])))
    tested_by = (tr.get("tested_by") if tr else None) or None
    tested_by = None if missing(tested_by) else tested_by
    params = op.get("params") if isinstance(op.get("params"), dict) else {}

    figures: dict[str, Any] = _jsonable(
        {
            "operation_id": op_id,
            "vpg": vpg,
            "verdict": verdict,
            "reasons": reasons,
            "started_by": _val(op.get("started_by")),
            "tested_by": tested_by,
            "started_at": started_at,
            "ended_at": ended_at,
            "duration_seconds": (ended_at - started_at).total_seconds() if ended_at is not None and started_at is not None else None,
            "operation_result": op["result"],
            "checkpoint_id": _val(op.get("checkpoint_id")),
            "checkpoint_time": _val(op.get("checkpoint_time")),
            "checkpoint_reason": _val(params.get("checkpoint_reason")),  # why this checkpoint (latest-clean)
            "rpo_achieved_seconds": rpo_achieved,
            "rpo_target_seconds": rpo_target,
            "rpo_met": rpo_met,
            "rto_seconds": rto,
            "rto_target_seconds": rto_target,
            "rto_met": rto_met,
            "success": success,
            "verification_ok": verification_ok,
            "cleanup_ok": cleanup_ok,
            "vm_count": len(real_vms),
            "steps": int(len(steps)),
            "steps_failed": steps_failed,
            "errors": n_errors,
            "warnings": n_warnings,
            "flow_run_id": _val(op.get("flow_run_id")),
            "live_operations_since": live_since,
            "live_operations_until": live_until,
            "live_operations": live,
        }
    )

    chart = None
    if len(steps) and started_at is not None:
        chart = charts.data_uri(charts.step_timeline(steps, started_at, rto, rto_target, now=now if running else None))

    ctx = {
        "title": f"DR test report: {vpg}",
        "kind_label": "DR test report",
        "f": figures,
        "op": op,
        "params": params,
        "vms": vms,
        "errors": errors,
        "notes": notes,
        "chart": chart,
        "pass_rule": PASS_RULE,
        "generated_at": now,
        "vpg_config": vpg_cfg,
        "live": figures["live_operations"],
    }
    html, text, print_html = render_report("dr_test", **ctx)

    steps_csv = steps[["vm_label", "step", "started_at", "ended_at", "duration_seconds", "result", "error"]].rename(columns={"vm_label": "vm"})
    steps_csv = steps_csv.assign(detail=steps["detail"].map(lambda d: "" if d is None or (not isinstance(d, (dict, list)) and missing(d)) else json.dumps(_jsonable(d))))
    vms_csv = pd.DataFrame(
        [{k: v for k, v in row.items() if k not in ("step_rows", "vpg_level")} for row in vms],
        columns=["vm", "steps", "steps_ok", "steps_failed", "started_at", "ended_at", "duration_seconds", "verification", "cleanup", "errors"],
    )
    summary_csv = pd.DataFrame([{k: ("; ".join(v) if isinstance(v, list) else v) for k, v in figures.items()
                                 if k != "live_operations"}])
    csvs = {"summary": summary_csv, "vms": vms_csv, "steps": steps_csv}
    if live:  # the CSV of the live operations, where the period has any
        csvs["live_operations"] = pd.DataFrame(figures["live_operations"], columns=LIVE_COLUMNS)
    date = figures["started_at"][:10] if figures["started_at"] else ""
    return Report(
        kind="dr_test",
        ref=op_id,
        title=ctx["title"],
        subject=f"[vmrep] DR test {verdict}: VPG {vpg} ({date}, operation {op_id})",
        html=html,
        text=text,
        figures=figures,
        frames=csvs,
        vpgs=[vpg],
        basename=f"dr-test-{slug(vpg, 40)}-{slug(op_id, 40)}",
        generated_at=now,
        verdict=verdict,
        print_html=print_html,
    )


__all__ = ["build_dr_test_report", "ReportError", "PASS_RULE"]
