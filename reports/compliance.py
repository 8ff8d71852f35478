"""Compliance report: did each VPG meet its objectives over a period, and was it tested?"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd

from reports import charts, frames
from reports.dr_test import _jsonable, _vpg_config
from reports.frames import ReportError, utc
from reports.render import fmt_dt, fmt_duration, fmt_pct, missing, render_report
from reports.report import Report, slug
from vmrep.health import HISTORY_WARNING_RATIO
from vmrep.stamps import utcnow

COMPLIANT = "compliant"
AT_RISK = "at risk"
NOT_COMPLIANT = "not compliant"
ORDER = {COMPLIANT: 0, AT_RISK: 1, NOT_COMPLIANT: 2}

RPO_COMPLIANT = 0.99  # share of samples meeting the RPO target
RPO_MINIMUM = 0.95
HISTORY_COMPLIANT = 0.95  # share of samples whose journal history reached its target
DEFAULT_TEST_INTERVAL = 6  # months, the VPG default (docs/concepts.md)
GAP_INTERVALS = 10  # a gap of more sampling intervals than this (median) ...
GAP_MIN_SECONDS = 3600.0  # ... and longer than this puts a VPG at risk: RPO unknown


def _p(share: float) -> str:
    return f"{share * 100:g} %"


RULE = [
    (
        COMPLIANT,
        f"at least {_p(RPO_COMPLIANT)} of the period's samples meet the RPO target, journal "
        f"history meets its target in at least {_p(HISTORY_COMPLIANT)} of them (met: at least "
        f"{_p(HISTORY_WARNING_RATIO)} of the window in force, as the monitor judges it), and the last DR "
        "test succeeded, met the VPG's RTO target and is not overdue (or testing is off for the VPG).",
    ),
    (
        NOT_COMPLIANT,
        f"less than {_p(RPO_MINIMUM)} of the samples meet the RPO target, or there are no "
        "samples in the period, or a DR test is overdue, or the last DR test failed.",
    ),
    (
        AT_RISK,
        "anything in between: RPO met in "
        f"{_p(RPO_MINIMUM)}–{_p(RPO_COMPLIANT)} of the samples, journal history short of its "
        "target too often, a gap in the samples (more than 10 sampling intervals and more than "
        "an hour without one: RPO unknown), no DR test yet although none is due, or the last DR "
        "test passed but missed the VPG's RTO target (rto_target_seconds): its VMs were recovered "
        "and verified, more slowly than the objective.",
    ),
]
NOTES = [
    "A sample meets the RPO target when its RPO (now minus the newest checkpoint) is at most "
    "the target in force at that time; a sample taken before the first checkpoint (no RPO) "
    "does not meet it.",
    "A test is overdue when the test interval (months) has passed since the last test that "
    "passed started (a failed or cancelled test does not count), or, for a VPG with no passed "
    "test, since vmrep first saw it; judged at the end of the period (or now, if earlier).",
    "Alerts are those open at any time in the period.",
]


def _months(interval: Any) -> int | None:
    if interval in (None, "off"):
        return None
    return int(interval)


def _vpg_summary(
    name: str,
    smp: pd.DataFrame,
    tests_all: pd.DataFrame,
    tests_period: pd.DataFrame,
    recoveries: pd.DataFrame,
    alerts: pd.DataFrame,
    cfg: Any,
    engine: Any,
    since: datetime,
    as_of: datetime,
) -> dict[str, Any]:
    n = int(len(smp))
    gap, gap_from, gap_limit = _largest_gap(smp["at"], since, as_of)
    rpo = smp["rpo_seconds"]
    meets = rpo.notna() & (rpo <= smp["rpo_target_seconds"])
    hist = smp["history_seconds"]
    # The monitor's rule: history is short when under 85 % of the target in force (the
    # configured window, or the VPG's age while it is younger than the window).
    hist_meets = hist.notna() & (hist >= HISTORY_WARNING_RATIO * smp["history_target_seconds"])
    rpo_target = (
        float(cfg.rpo_target_seconds) if cfg is not None
        else (float(smp["rpo_target_seconds"].iloc[-1]) if n else None)
    )
    history_target = (
        float(cfg.history_seconds) if cfg is not None
        else (float(smp["history_target_seconds"].iloc[-1]) if n else None)
    )

    # The last test up to the end of the period (also one before the period).
    mine = tests_all[tests_all["vpg"] == name]
    last = mine.iloc[-1] if len(mine) else None
    last_test_at = last["started_at"] if last is not None else None
    last_test_success = bool(last["success"]) if last is not None and not missing(last["success"]) else None
    if last is None:
        rt = frames.vpg_runtime(engine, name)
        if rt and not missing(rt.get("last_test_at")) and utc(rt["last_test_at"]) <= as_of:
            last_test_at = rt["last_test_at"]
            last_test_success = None if missing(rt.get("last_test_success")) else bool(rt["last_test_success"])

    # The RTO objective of the last test: recorded beside the result, else judged here.
    last_rto = _num_or_none(last.get("rto_seconds")) if last is not None else None
    last_rto_target = _num_or_none(last.get("rto_target_seconds")) if last is not None else None
    last_rto_met = None
    if last is not None and not missing(last.get("rto_met")):
        last_rto_met = bool(last["rto_met"])
    elif last_rto is not None and last_rto_target is not None:
        last_rto_met = last_rto <= last_rto_target

    interval = _months(getattr(cfg, "test_interval_months", DEFAULT_TEST_INTERVAL) if cfg is not None else DEFAULT_TEST_INTERVAL)
    first = frames.first_seen(engine, name)
    # The clock runs from the last test that passed, as the monitor's (vmrep.health).
    passed = mine[mine["success"] == True]  # noqa: E712 (nullable boolean)
    clock = passed.iloc[-1]["started_at"] if len(passed) else (last_test_at if last_test_success else None)
    due = None
    if interval is not None:
        start = clock if clock is not None else first
        if start is not None:
            due = pd.Timestamp(start) + pd.DateOffset(months=interval)
    overdue = bool(due is not None and due < pd.Timestamp(as_of))

    tp = tests_period[tests_period["vpg"] == name]
    rec = recoveries[recoveries["vpg"] == name]
    al = alerts[alerts["vpg"] == name]

    s = {
        "vpg": name,
        "configured": cfg is not None,
        "samples": n,
        "rpo_target_seconds": rpo_target,
        "rpo_met_share": float(meets.mean()) if n else None,
        "rpo_p95_seconds": float(rpo.quantile(0.95)) if rpo.notna().any() else None,
        "rpo_max_seconds": float(rpo.max()) if rpo.notna().any() else None,
        "rpo_missing_samples": int(rpo.isna().sum()),
        "history_target_seconds": history_target,
        "history_met_share": float(hist_meets.mean()) if n else None,
        "history_min_seconds": float(hist.min()) if hist.notna().any() else None,
        "largest_gap_seconds": gap,
        "largest_gap_from": gap_from,
        "gap_limit_seconds": gap_limit,
        "test_interval_months": "off" if interval is None else interval,
        "tests": int(len(tp)),
        "tests_passed": int((tp["success"] == True).sum()),  # noqa: E712 (nullable boolean)
        "tests_failed": int((tp["success"] == False).sum()),  # noqa: E712
        "last_test_at": last_test_at,
        "last_test_success": last_test_success,
        "last_test_rto_seconds": last_rto,
        "last_test_rto_target_seconds": last_rto_target,
        "last_test_rto_met": last_rto_met,
        "test_due_at": due,
        "test_overdue": overdue,
        "failovers": int((rec["kind"] == "failover").sum()),
        "moves": int((rec["kind"] == "move").sum()),
        "alerts": int(len(al)),
        "alerts_error": int((al["level"] == "error").sum()),
        "alerts_warning": int((al["level"] == "warning").sum()),
    }
    s["verdict"], s["reasons"] = verdict(s)
    return s


def _num_or_none(v: Any) -> float | None:
    return None if v is None or missing(v) else float(v)


def _largest_gap(at: pd.Series, since: datetime, end: datetime) -> tuple[float | None, Any, float | None]:
    """The longest time without a sample in [since, end] (edges included), where it began,
    and the longest gap tolerated: 10 sampling intervals (median), at least an hour."""
    if at.empty:
        return None, None, None
    times = pd.concat([pd.Series([pd.Timestamp(since)]), at.sort_values(), pd.Series([pd.Timestamp(end)])],
                      ignore_index=True)
    times = times[times <= pd.Timestamp(end)].reset_index(drop=True)
    deltas = times.diff().dt.total_seconds().iloc[1:]
    if deltas.empty:
        return None, None, None
    i = int(deltas.values.argmax()) + 1
    inner = at.sort_values().diff().dt.total_seconds().dropna()
    median = float(inner.median()) if len(inner) else 0.0
    return float(deltas.max()), times.iloc[i - 1], max(GAP_MIN_SECONDS, GAP_INTERVALS * median)


def verdict(s: dict[str, Any]) -> tuple[str, list[str]]:
    """The rule of RULE, applied to one VPG's summary; returns the verdict and why."""
    bad: list[str] = []
    risk: list[str] = []
    testing = s["test_interval_months"] != "off"
    if not s["samples"]:
        bad.append("no RPO samples in the period")
    else:
        share = s["rpo_met_share"]
        if share < RPO_MINIMUM:
            bad.append(f"RPO target met in only {fmt_pct(share)} of the samples (minimum {_p(RPO_MINIMUM)})")
        elif share < RPO_COMPLIANT:
            risk.append(f"RPO target met in {fmt_pct(share)} of the samples (below {_p(RPO_COMPLIANT)})")
        h = s["history_met_share"]
        if h < HISTORY_COMPLIANT:
            risk.append(f"journal history met its target in only {fmt_pct(h)} of the samples (below {_p(HISTORY_COMPLIANT)})")
        gap = s.get("largest_gap_seconds")
        if gap is not None and s.get("gap_limit_seconds") is not None and gap > s["gap_limit_seconds"]:
            risk.append(
                f"no samples for {fmt_duration(gap)} from {fmt_dt(s['largest_gap_from'])}: "
                "RPO unknown in that time (was the monitor running?)"
            )
    if testing:
        if s["test_overdue"]:
            since = f"since {fmt_dt(s['test_due_at'])}" if s["test_due_at"] is not None else ""
            bad.append(f"DR test overdue {since}".strip())
        if s["last_test_success"] is False:
            bad.append(f"the last DR test ({fmt_dt(s['last_test_at'])}) failed")
        elif s["last_test_at"] is None and not s["test_overdue"]:
            risk.append("no DR test yet (none is due before " + fmt_dt(s["test_due_at"]) + ")")
        if s["last_test_success"] is True and s.get("last_test_rto_met") is False:
            risk.append(f"the last DR test ({fmt_dt(s['last_test_at'])}) recovered in "
                        f"{fmt_duration(s['last_test_rto_seconds'])}, over the RTO target "
                        f"{fmt_duration(s['last_test_rto_target_seconds'])}")
    if bad:
        return NOT_COMPLIANT, bad + risk
    if risk:
        return AT_RISK, risk
    return COMPLIANT, []


def _with_approval(ops_df: pd.DataFrame) -> pd.DataFrame:
    """Who approved each live operation, when and why (a VPG with approval: required,
    started from a deployment: flows/approval.py); empty for one that needed no approval."""
    out = ops_df.copy()
    approvals = [(p.get("approval") if isinstance(p, dict) else None) or {}
                 for p in (out["params"] if "params" in out.columns else [])]
    for col, key in (("approved_by", "approved_by"), ("approved_at", "approved_at"), ("approval_reason", "reason")):
        out[col] = pd.Series([a.get(key) for a in approvals], index=out.index, dtype=object)
    return out


def build_compliance_report(
    engine: Any,
    since: datetime,
    until: datetime,
    vpgs: list[str] | None = None,
    config: Any = None,
    *,
    now: datetime | None = None,
) -> Report:
    """Compliance of the VPGs (all configured and recorded ones when None) over [since, until)."""
    since_u, until_u = utc(since), utc(until)
    if since_u is None or until_u is None or since_u >= until_u:
        raise ReportError(f"the period must end after it starts (since {since}, until {until})")
    now = utc(now) or utcnow()
    as_of = min(until_u, now)
    if vpgs is None:
        names = [v.name for v in (getattr(config, "vpgs", None) or [])]
        names += [n for n in frames.vpg_names(engine) if n not in names]
    else:
        names = list(dict.fromkeys(vpgs))
    if not names:
        raise ReportError("no VPG to report on: none is configured or recorded")

    smp = frames.samples(engine, names, since_u, until_u)
    tests_all = frames.test_results(engine, names, None, as_of)
    tests_period = tests_all[(tests_all["started_at"] >= pd.Timestamp(since_u))] if len(tests_all) else tests_all
    recoveries = _with_approval(frames.operations(engine, names, since_u, until_u, kinds=("failover", "move")))
    alerts = frames.alerts(engine, names, since_u, until_u)

    summaries = []
    sections = []
    for name in names:
        cfg = _vpg_config(config, name)
        s_vpg = smp[smp["vpg"] == name]
        summary = _vpg_summary(name, s_vpg, tests_all, tests_period, recoveries, alerts, cfg, engine, since_u, as_of)
        summaries.append(summary)
        png = charts.rpo_chart(s_vpg, name, since_u, until_u)
        sections.append(
            {
                "s": summary,
                "cfg": cfg,
                "chart": charts.data_uri(png),
                "tests": tests_period[tests_period["vpg"] == name].to_dict("records"),
                "recoveries": recoveries[recoveries["vpg"] == name].to_dict("records"),
                "alerts": alerts[alerts["vpg"] == name].to_dict("records"),
            }
        )
    overall = max((s["verdict"] for s in summaries), key=ORDER.__getitem__)
    counts = {v: sum(1 for s in summaries if s["verdict"] == v) for v in ORDER}

    figures = _jsonable(
        {
            "since": since_u,
            "until": until_u,
            "as_of": as_of,
            "verdict": overall,
            "vpg_count": len(summaries),
            "compliant": counts[COMPLIANT],
            "at_risk": counts[AT_RISK],
            "not_compliant": counts[NOT_COMPLIANT],
            "vpgs": {s["vpg"]: s for s in summaries},
        }
    )
    period = f"{fmt_dt(since_u, False)[:10]} to {fmt_dt(until_u, False)[:10]}"
    ctx = {
        "title": f"Compliance report {period}",
        "kind_label": "Compliance report",
        "f": figures,
        "period": period,
        "since": since_u,
        "until": until_u,
        "as_of": as_of,
        "summaries": summaries,
        "sections": sections,
        "rule": RULE,
        "notes": NOTES,
        "generated_at": now,
        "fmt_duration": fmt_duration,
    }
    html, text, print_html = render_report("compliance", **ctx)

    summary_df = pd.DataFrame(
        [{k: ("; ".join(v) if isinstance(v, list) else v) for k, v in s.items()} for s in summaries]
    )
    test_cols = ["vpg", "operation_id", "started_at", "ended_at", "checkpoint_id", "checkpoint_age_seconds",
                 "rto_seconds", "rto_target_seconds", "rto_met", "success", "verification_ok", "cleanup_ok",
                 "operation_result", "tested_by", "notes"]
    rec_cols = ["vpg", "id", "kind", "started_by", "started_at", "ended_at", "result", "checkpoint_id",
                "checkpoint_age_seconds", "rto_seconds", "rto_target_seconds", "error",
                "approved_by", "approved_at", "approval_reason"]
    alert_cols = ["vpg", "vm", "code", "level", "text", "raised_at", "cleared_at"]
    scope = ",".join(names)
    return Report(
        kind="compliance",
        ref=f"{since_u.isoformat()}/{until_u.isoformat()} {scope}"[:200],
        title=ctx["title"],
        subject=(
            f"[vmrep] Compliance {period}: {overall.upper()} "
            f"({counts[COMPLIANT]} compliant, {counts[AT_RISK]} at risk, {counts[NOT_COMPLIANT]} not compliant)"
        ),
        html=html,
        text=text,
        figures=figures,
        frames={
            "summary": summary_df,
            "tests": tests_period.reindex(columns=test_cols),
            "recoveries": recoveries.reindex(columns=rec_cols),
            "alerts": alerts.reindex(columns=alert_cols),
        },
        vpgs=names,
        basename=f"compliance-{since_u:%Y%m%d}-{until_u:%Y%m%d}"
        + (f"-{slug('-'.join(names), 40)}" if vpgs is not None else ""),
        generated_at=now,
        verdict=overall,
        print_html=print_html,
    )


__all__ = ["build_compliance_report", "verdict", "RULE", "COMPLIANT", "AT_RISK", "NOT_COMPLIANT"]
