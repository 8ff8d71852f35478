"""What the state database says about a recovery operation: its summary (steps per VM,
verification, RTO, checkpoint fields), the VPG status restored after a rollback, and the
facts `vmrep.health` reads about live recoveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vmrep.errors import VmrepError
from vmrep.runtime import Runtime
from vmrep.stamps import utcnow
from vmrep.status import Status

LIVE_KINDS = ("failover", "move")


def committed_since_protection(store: Any, vpg: str) -> Any | None:
    """The commit that ended this VPG's protection, if no protection was set up since."""
    for op in store.operations(vpg):  # newest first
        if op.result != "succeeded":
            continue
        if op.kind in ("initial_sync", "reverse_protect"):
            return None
        if op.kind == "commit":
            return op
    return None


# --------------------------------------------------------------------------------------
# Records


def _steps_by_vm(store: Any, op_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in store.steps(op_id):
        secs = (s.ended_at - s.started_at).total_seconds() if s.ended_at and s.started_at else None
        out.setdefault(s.vm or "*", []).append({
            "step": s.step, "result": s.result, "started_at": s.started_at, "ended_at": s.ended_at,
            "seconds": round(secs, 3) if secs is not None else None, "error": s.error})
    return out


def verification(store: Any, op_id: str) -> tuple[bool | None, dict[str, dict[str, Any]]]:
    """(all VMs verified?, last verification detail per VM)."""
    last: dict[str, Any] = {}
    for s in store.steps(op_id):
        if s.step == "verify" and s.vm:
            last[s.vm] = s
    if not last:
        return None, {}
    per = {vm: {"ok": s.result == "ok", "error": (s.error or "").removeprefix("VerificationFailed: ") or None,
                **({k: v for k, v in (s.detail or {}).items() if k in ("guest", "problems", "disks")})}
           for vm, s in last.items()}
    return all(x["ok"] for x in per.values()), per


def operation_summary(store: Any, op_id: str) -> dict[str, Any]:
    op = store.operation(op_id)
    if op is None:
        raise VmrepError(f"no operation {op_id}")
    by_vm = _steps_by_vm(store, op_id)
    all_steps = [s for lst in by_vm.values() for s in lst]
    steps_sum = sum(s["seconds"] or 0 for s in all_steps)
    wall = ((op.ended_at or utcnow()) - op.started_at).total_seconds()
    ok, per = verification(store, op_id)
    out: dict[str, Any] = {
        "operation_id": op.id, "vpg": op.vpg, "kind": op.kind, "result": op.result, "error": op.error,
        "started_by": op.started_by, "started_at": op.started_at, "ended_at": op.ended_at,
        "flow_run_id": op.flow_run_id, "checkpoint_id": op.checkpoint_id, "checkpoint_time": op.checkpoint_time,
        "checkpoint_age_seconds": op.checkpoint_age_seconds, "rto_seconds": op.rto_seconds, "notes": op.notes,
        "verification_ok": ok, "verification": per, "steps": by_vm,
        "checkpoint_reason": (op.params or {}).get("checkpoint_reason"),
        "wall_seconds": round(wall, 3), "steps_seconds": round(steps_sum, 3),
        # a live operation approved in the Prefect UI: requested_by/at, approved_by/at, reason
        "approval": (op.params or {}).get("approval"),
    }
    if op.kind == "test":
        tr = next((t for t in store.test_results(op.vpg) if t.operation_id == op.id), None)
        if tr is not None:
            out.update(success=tr.success, cleanup_ok=tr.cleanup_ok)
    if op.kind in ("test", "failover", "move") and op.rto_seconds is None:
        for s in store.steps(op_id):
            if s.step == "recovered" and s.detail:
                out["rto_seconds"] = s.detail.get("rto_seconds")
    if op.kind in ("test", "failover", "move"):
        out["rto_target_seconds"] = op.rto_target_seconds
        out["rto_met"] = rto_met(out["rto_seconds"], op.rto_target_seconds)
    return out


def rto_met(rto_seconds: float | None, target_seconds: float | None) -> bool | None:
    """The measured RTO judged against the VPG's objective (None: not measured, as when
    the VMs never all came up and verified, or no target recorded)."""
    if rto_seconds is None or target_seconds is None:
        return None
    return rto_seconds <= target_seconds


def _record_rto(store: Any, op_id: str) -> float:
    op = store.operation(op_id)
    rto = (utcnow() - op.started_at).total_seconds()
    store.record_step(op_id, None, "recovered", "ok", started_at=utcnow(),
                      detail={"rto_seconds": round(rto, 3), "at": utcnow().isoformat()})
    return rto


def _rto_of(store: Any, op_id: str) -> float | None:
    for s in store.steps(op_id):
        if s.step == "recovered" and s.detail:
            return s.detail.get("rto_seconds")
    return None


def _cp_fields(rt: Runtime, vpg: str, op: Any, plan: Any) -> dict[str, Any]:
    if plan is None:
        return {}
    t = datetime.fromisoformat(plan.checkpoint_time)
    return {"checkpoint_id": plan.checkpoint_id, "checkpoint_time": t,
            "checkpoint_age_seconds": round((op.started_at - t).total_seconds(), 3)}


def _clear(store: Any, vpg: str, codes: set[str]) -> None:
    for a in store.open_alerts(vpg):
        if a.code in codes:
            store.clear_alert(a.id)


def _restore_status(store: Any, vpg: str, op: Any) -> None:
    """After a rollback: replication resumes, the VPG meets its SLA again (the monitor
    refines it on its next evaluation)."""
    before = (op.params or {}).get("status_before") if op is not None else None
    if store.runtime(vpg).initial_sync_done or not (before and before[0]):
        store.set_status(vpg, Status.MEETING_SLA, None, detail="recovery rolled back")
    else:
        store.set_status(vpg, before[0], before[1], detail="recovery rolled back")


def live_facts(store: Any, vpg: str) -> dict[str, Any]:
    """Facts for vmrep.health about live recoveries: awaiting_commit_since,
    live_recovery_kind, committed."""
    out: dict[str, Any] = {"awaiting_commit_since": None, "live_recovery_kind": None, "committed": False}
    row = store.runtime(vpg)
    holder = store.operation(row.lock_holder) if row.lock_holder else None
    if holder is not None:
        live = holder
        if holder.kind in ("commit", "rollback"):
            live = store.operation((holder.params or {}).get("live_operation") or "") or holder
        if live.kind in LIVE_KINDS:
            out["live_recovery_kind"] = live.kind
            if live.result == "succeeded" and holder.kind in LIVE_KINDS:
                out["awaiting_commit_since"] = live.ended_at
    out["committed"] = committed_since_protection(store, vpg) is not None
    return out
