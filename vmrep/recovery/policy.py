"""What the control plane enforces on every monitor pass, whichever process started the
operation and whether or not it still runs:

* **commit policies**: a failover awaiting commit whose policy (commit or rollback) has
  passed its deadline (`commit_policy_deadlines` in the state database, written by the
  failover) is committed or rolled back, as an operation of its own started by
  "commit policy". The commands that act on the VPG apply a passed deadline first too
  (`live.pending_live_operation`, `ownership.preflight`), so what they find is what the
  policy did, even before the next monitor pass.
* **dead owners**: an operation whose owner is gone (its Prefect flow run ended, on any
  host, or its process is gone on this one) is finished as the next operation would
  have finished it (`ownership.recover_interrupted`): a test's VMs and scratch disks
  removed and the test recorded as cancelled, a live recovery rolled back, an
  interrupted commit or rollback handed back, replication snapshots of a dead copy
  removed; the VPG lock released.
* **failed test clean-ups**: while the newest test of a VPG says its clean-up failed,
  the clean-up is tried again; `TEST_CLEANUP_FAILED` stays open until it succeeds.

`enforce` is the one call the monitor makes per pass (flows/monitor.py); it never raises
for one VPG's trouble: what failed is logged and in the result, and tried again next pass.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from vmrep.config import VPG
from vmrep.errors import Refused, VmrepError
from vmrep.recovery.live import commit, pending_live_operation, rollback
from vmrep.recovery.ownership import holder_is_stale, process_identity, recover_interrupted
from vmrep.recovery.records import _clear, utcnow
from vmrep.recovery.sequence import DirectRunner
from vmrep.runtime import Runtime, get_runtime
from vmrep.state.holding import holding_vpg

log = logging.getLogger(__name__)

POLICY_WHO = "commit policy"
OUTCOME = {"commit": "committed", "rollback": "rolled back"}


def _chosen(rt: Runtime, vpgs: list[str] | None) -> list[VPG]:
    return [rt.config.vpg(n) for n in vpgs] if vpgs else list(rt.config.vpgs)


# --------------------------------------------------------------------------------------
# Commit policies


def apply_due(config: str, *, vpgs: list[str] | None = None, now: datetime | None = None, runner: Any = None,
              flow_run_id: str | None = None) -> list[dict[str, Any]]:
    """Apply every commit policy whose deadline has passed (of `vpgs`, else all).
    Returns one entry per deadline dealt with or tried: vpg, operation (the failover),
    policy, outcome ("committed", "rolled back", "not awaiting commit", "deferred",
    "failed") and, when applied, the summary of the commit or rollback."""
    rt = get_runtime(config)
    names = {v.name for v in rt.config.vpgs}
    out = []
    for d in rt.store.due_policies(now or utcnow()):
        if (vpgs and d.vpg not in vpgs) or d.vpg not in names:
            continue  # a VPG no longer configured keeps its deadline: nothing to act with
        out.append(_apply_one(rt, rt.config.vpg(d.vpg), d, runner=runner or DirectRunner(),
                              flow_run_id=flow_run_id))
    return out


def _apply_one(rt: Runtime, v: VPG, d: Any, *, runner: Any, flow_run_id: str | None) -> dict[str, Any]:
    store = rt.store
    entry: dict[str, Any] = {"vpg": v.name, "operation": d.operation_id, "policy": d.policy, "due_at": d.due_at}
    live = pending_live_operation(rt, v, runner=runner, apply_policy=False)
    if live is None or live.id != d.operation_id:
        # committed or rolled back by hand (or cleaned up) in a way that did not say so
        store.policy_done(d.operation_id, "not awaiting commit")
        return {**entry, "outcome": "not awaiting commit"}
    act = commit if d.policy == "commit" else rollback
    log.warning("VPG %s: the commit policy's deadline %s has passed: %s", v.name, d.due_at, d.policy)
    try:
        summary = act(str(rt.config.source), v.name, who=POLICY_WHO, flow_run_id=flow_run_id, runner=runner,
                      by_policy=True)
    except Refused as exc:  # a commit or rollback by hand is running right now: it decides
        store.policy_attempted(d.operation_id, str(exc))
        return {**entry, "outcome": "deferred", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded; the next pass tries again
        store.policy_attempted(d.operation_id, str(exc))
        log.error("VPG %s: the commit policy could not %s: %s", v.name, d.policy, exc)
        return {**entry, "outcome": "failed", "error": str(exc)}
    store.policy_done(d.operation_id, OUTCOME[d.policy], summary["operation_id"])
    return {**entry, "outcome": OUTCOME[d.policy], "summary": summary}


# --------------------------------------------------------------------------------------
# Dead owners and failed clean-ups


def clean_dead_owners(config: str, *, vpgs: list[str] | None = None, runner: Any = None) -> list[dict[str, Any]]:
    """Finish the operations whose owner is gone and release their VPGs."""
    rt = get_runtime(config)
    store = rt.store
    out = []
    for v in _chosen(rt, vpgs):
        row = store.runtime(v.name)
        if row.lock_holder is None or not holder_is_stale(store, row):
            continue
        op = store.operation(row.lock_holder)
        entry: dict[str, Any] = {"vpg": v.name, "operation": row.lock_holder, "kind": op.kind if op else None}
        try:
            recover_interrupted(rt, v, row.lock_holder, runner=runner or DirectRunner(),
                                reason="its owner is gone (found by the monitor)")
            entry["outcome"] = "cleaned up"
        except Exception as exc:  # noqa: BLE001 - recorded; the next pass tries again
            log.error("VPG %s: clean-up after operation %s failed: %s", v.name, row.lock_holder[:8], exc)
            entry.update(outcome="failed", error=str(exc))
        entry["released"] = store.runtime(v.name).lock_holder is None
        out.append(entry)
    return out


def retry_failed_cleanups(config: str, *, vpgs: list[str] | None = None, runner: Any = None) -> list[dict[str, Any]]:
    """Try again the clean-up of each VPG's newest test whose clean-up failed, holding the
    VPG meanwhile as operation `cleanup`."""
    rt = get_runtime(config)
    store = rt.store
    runner = runner or DirectRunner()
    out = []
    for v in _chosen(rt, vpgs):
        tests = store.test_results(v.name)
        if not tests or tests[0].cleanup_ok is not False or not tests[0].operation_id:
            continue
        if store.runtime(v.name).lock_holder is not None:
            continue  # an operation holds the VPG: its own leftover step cleans up
        test_op = tests[0].operation_id
        entry: dict[str, Any] = {"vpg": v.name, "operation": test_op}
        try:
            # held as an operation of its own, so no test starts into the clean-up and a
            # monitor that dies meanwhile is recognised as a dead owner in turn
            with holding_vpg(store, v.name, "cleanup", who="monitor", flow_run_id=None,
                             params={"test_operation": test_op, "process": process_identity()},
                             refusal=lambda _: "held") as op:
                problems = _clean_test(rt, v, test_op, runner)
                store.finish_operation(op, "failed" if problems else "succeeded",
                                       error="; ".join(problems) or None)
        except Refused:
            continue  # taken a moment ago by another operation
        if problems:
            text = "; ".join(problems)
            store.raise_alert(v.name, "TEST_CLEANUP_FAILED", "error", f"VPG {v.name}: test clean-up failed: {text}")
            entry.update(outcome="failed", error=text)
        else:
            note = f"clean-up completed later by the monitor at {utcnow():%Y-%m-%d %H:%M:%S} UTC"
            store.update_test_result(test_op, cleanup_ok=True,
                                     notes="; ".join(x for x in (tests[0].notes, note) if x))
            _clear(store, v.name, {"TEST_CLEANUP_FAILED"})
            entry["outcome"] = "cleaned up"
        out.append(entry)
    return out


def _clean_test(rt: Runtime, v: VPG, test_op: str, runner: Any) -> list[str]:
    """Remove what test `test_op` left (VMs, scratch disks); what is still there after."""
    from vmrep.recovery.testfailover import leftovers

    cfg = str(rt.config.source)
    try:
        problems = [str(r) for r in runner.each("remove-vm", [(cfg, v.name, test_op, m.name, test_op)
                                                              for m in v.vms], settle=True)
                    if isinstance(r, BaseException)]
        try:
            runner.one("remove-disks", cfg, v.name, test_op, test_op)
        except Exception as exc:  # noqa: BLE001 - a finding
            problems.append(str(exc))
        left = leftovers(rt, v, test_op)
    except Exception as exc:  # noqa: BLE001 - a finding (the site may be away)
        return [str(exc)]
    if left:
        problems.append(f"left at site {v.recovery_site}: {', '.join(left)}")
    return problems


def enforce(config: str, *, vpgs: list[str] | None = None, runner: Any = None,
            flow_run_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The monitor's hook, once per pass: dead owners first (a dead commit hands the lock
    back to its failover, which the policy may then end), then passed commit-policy
    deadlines, then failed test clean-ups."""
    out: dict[str, list[dict[str, Any]]] = {}
    out["dead_owners"] = _guarded("dead owners", clean_dead_owners, config, vpgs=vpgs, runner=runner)
    out["policies"] = _guarded("commit policies", apply_due, config, vpgs=vpgs, runner=runner,
                               flow_run_id=flow_run_id)
    out["cleanups"] = _guarded("test clean-ups", retry_failed_cleanups, config, vpgs=vpgs, runner=runner)
    return out


def _guarded(what: str, fn: Any, config: str, **kw: Any) -> list[dict[str, Any]]:
    try:
        return list(fn(config, **kw))
    except VmrepError as exc:  # e.g. the state database away: the next pass tries again
        log.error("%s: %s", what, exc)
        return [{"outcome": "failed", "error": str(exc)}]
