"""The live lifecycle: failover and move to 'awaiting commit', the commit policy, commit
(with reverse protection), rollback."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Callable

from vmrep.config import VPG
from vmrep.errors import Refused, VmrepError
from vmrep.recovery import steps
from vmrep.recovery.ownership import (
    LIVE_KINDS,
    _describe_holder,
    begin,
    holder_is_stale,
    preflight,
    process_identity,
    recover_interrupted,
)
from vmrep.recovery.records import (
    _clear,
    committed_since_protection,
    _cp_fields,
    _record_rto,
    _restore_status,
    operation_summary,
    utcnow,
)
from vmrep.recovery.reverse import with_current_source_info
from vmrep.recovery.reach import SOURCE_NOT_SHUT_DOWN, protected_site_unreachable
from vmrep.recovery.sequence import DirectRunner, _cleanup_runner, _recover
from vmrep.recovery.steps import find_plan, get_plan
from vmrep.runtime import Runtime, get_runtime
from vmrep.state.holding import holding_vpg
from vmrep.vsphere.connection import unreachable
from vmrep.status import Status, Substatus

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Live failover, move, commit, rollback


def _undo_live(rt: Runtime, vpg: VPG, live_op: str, record_op: str, runner: Any) -> list[BaseException]:
    """Remove what a live recovery created and put the source back as it was."""
    store = rt.store
    config = str(rt.config.source)
    names = [m.name for m in vpg.vms]
    errs: list[BaseException] = []
    errs += [r for r in runner.each("remove-vm", [(config, vpg.name, record_op, n, live_op) for n in names],
                                    settle=True) if isinstance(r, BaseException)]
    try:
        runner.one("remove-disks", config, vpg.name, record_op, live_op)
    except Exception as exc:  # noqa: BLE001 - collected: the undo goes on, errors reported together
        errs.append(exc)
    errs += [r for r in runner.each("power-on-source", [(config, vpg.name, record_op, n, live_op) for n in names],
                                    settle=True) if isinstance(r, BaseException)]
    was = None
    for s in store.steps(live_op):
        if s.step == "pause-replication" and s.result == "ok" and s.detail:
            was = bool(s.detail.get("was_paused"))
            break
    if was is not None:
        try:
            runner.one("pause-replication", config, vpg.name, record_op, was)
        except Exception as exc:  # noqa: BLE001 - collected: the undo goes on, errors reported together
            errs.append(exc)
    _clear(store, vpg.name, {"AWAITING_COMMIT"})
    return errs


def pending_live_operation(rt: Runtime, vpg: VPG, *, runner: Any = None, apply_policy: bool = True) -> Any | None:
    """The failover or move awaiting commit or rollback (after recovering an interrupted
    commit or rollback, or cleaning up a live recovery whose process died). A commit
    policy whose deadline has passed is applied first (`apply_policy`), as it would have
    been by the monitor: a command after the deadline finds what the policy did."""
    store = rt.store
    if apply_policy:
        from vmrep.recovery.policy import apply_due  # policy builds on this module

        apply_due(str(rt.config.source), vpgs=[vpg.name], runner=runner)
    row = store.runtime(vpg.name)
    if row.lock_holder is None:
        return None
    op = store.operation(row.lock_holder)
    if op is None:
        return None
    if op.kind in ("commit", "rollback") and holder_is_stale(store, row):
        recover_interrupted(rt, vpg, op.id, runner=runner, reason="its process is gone")
        row = store.runtime(vpg.name)
        op = store.operation(row.lock_holder) if row.lock_holder else None
    if op is not None and op.kind in LIVE_KINDS and op.result == "running" and holder_is_stale(store, row):
        recover_interrupted(rt, vpg, op.id, runner=runner, reason="its process is gone")
        return None
    if op is not None and op.kind in LIVE_KINDS and op.result == "succeeded":
        return op
    return None


def awaiting_commit(rt: Runtime, vpg: VPG, what: str, *, runner: Any = None, apply_policy: bool = True) -> Any:
    """The failover or move awaiting commit, or Refused naming `what` (commit, rollback):
    the one check the CLI makes before starting a flow and the engine makes again. When
    the commit policy ended it, the refusal says so."""
    live = pending_live_operation(rt, vpg, runner=runner, apply_policy=apply_policy)
    if live is None:
        raise Refused(f"VPG {vpg.name}: {what} refused: no failover or move is awaiting commit"
                      f"{_policy_acted(rt.store, vpg.name)}")
    return live


def run_failover(config: str, vpg: str, *, confirm: str | None, checkpoint: str = "latest",
                 shutdown: str | None = None, commit_policy: str | None = None,
                 commit_after_minutes: float | None = None, who: str | None = None,
                 flow_run_id: str | None = None, runner: Any = None, verify_timeout: float = 600.0,
                 shutdown_timeout: float = 300.0, operation: str = "failover", reverse_protection: bool = False,
                 keep_source_vms: bool = False, sleep: Callable[[float], None] = time.sleep,
                 notify: Callable[[str], None] | None = None,
                 approval: dict[str, Any] | None = None) -> dict[str, Any]:
    """Live failover (or, with operation='move', a move): recover on the production
    network and wait for commit or rollback as the commit policy says. `notify` gets a
    line for people when the failover awaits commit. `approval` (who requested, who
    approved, when, why: flows/approval.py) is kept in the operation's record."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    runner = runner or DirectRunner()
    moving = operation == "move"
    shutdown = shutdown or ("graceful" if moving else v.shutdown_policy)
    if shutdown not in ("none", "graceful", "force"):
        raise VmrepError(f"shutdown policy {shutdown!r} is not none, graceful or force")
    policy = "commit" if moving else (commit_policy or v.commit_policy.policy)
    if policy not in ("none", "commit", "rollback"):
        raise VmrepError(f"commit policy {policy!r} is not none, commit or rollback")
    after = 0.0 if moving else (commit_after_minutes if commit_after_minutes is not None
                                else v.commit_policy.timeout_minutes)
    if moving and reverse_protection and keep_source_vms:
        raise Refused(f"VPG {vpg}: move refused: --keep-source-vms needs --no-reverse-protection "
                      "(reverse protection pre-seeds from the source VMs' disks)")
    if moving and shutdown == "none":
        raise Refused(f"VPG {vpg}: move refused: a move shuts the source down (graceful or force)")
    preflight(rt, v, operation, confirm=confirm, check_lock=False)
    if moving:
        refuse_move_without_source(rt, v)
    from vmrep.ransomware.service import choose

    cp, why = (None, "final: the move's own checkpoint") if moving else choose(rt.journal, vpg, checkpoint)
    with begin(rt, v, operation, who=who, flow_run_id=flow_run_id, runner=runner, confirm=confirm,
               params={"checkpoint": "final" if moving else checkpoint, "checkpoint_reason": why,
                       "shutdown": shutdown,
                       "commit_policy": policy, "commit_after_minutes": after,
                       "reverse_protection": reverse_protection, "keep_source_vms": keep_source_vms,
                       "verify_timeout": verify_timeout,
                       **({"approval": approval} if approval else {})}) as op:
        store = rt.store
        status = Status.MOVING if moving else Status.FAILING_OVER
        names = [m.name for m in v.vms]
        warnings: list[str] = []
        try:
            runner.one("cleanup-leftovers", config, vpg, op)
            runner.one("pause-replication", config, vpg, op, True)
            store.set_status(vpg, status, None, detail=f"{operation} {op[:8]} started")
            # Decided once, bounded by the connect timeout: no later step of this
            # failover contacts a protected site found gone (vmrep.recovery.reach).
            gone = None if moving else protected_site_unreachable(rt, v, op)
            if gone is not None:
                for n in names:
                    store.record_step(op, n, "shutdown-source", "skipped",
                                      detail={"reason": SOURCE_NOT_SHUT_DOWN, "unreachable": True,
                                              "powered_off": False, "policy": shutdown})
                warnings.append(SOURCE_NOT_SHUT_DOWN)
            else:
                outs = runner.each("shutdown-source",
                                   [(config, vpg, op, n, shutdown, shutdown_timeout) for n in names], settle=True)
                bad = [r for r in outs if isinstance(r, BaseException)]
                if bad:
                    raise bad[0]
            if moving:
                start = store.operation(op).started_at
                cp_id = runner.one("final-checkpoint", config, vpg, op, f"Move at {start.isoformat()}")["id"]
            else:
                cp_id = cp.id
            results = _recover(rt, config, v, op, operation, cp_id, runner, verify_timeout, sleep)
            failed = [r for r in results.values() if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            rto = _record_rto(store, op)
            store.set_status(vpg, status,
                             Substatus.MOVING_BEFORE_COMMIT if moving else Substatus.FAILING_OVER_BEFORE_COMMIT,
                             detail=f"{operation} {op[:8]}: awaiting commit or rollback")
            plan = get_plan(rt, op)
            when = ""
            if not moving and policy in ("commit", "rollback"):
                # The deadline lives in the state database: the monitor pass (or the next
                # command on the VPG) applies it, whether or not this process still runs.
                due_at = utcnow() + timedelta(minutes=after)
                store.set_policy_deadline(op, vpg, policy, due_at)
                when = (f"; the commit policy will {policy} at {due_at:%Y-%m-%d %H:%M:%S} UTC "
                        f"({after:g} min)")
            store.raise_alert(vpg, "AWAITING_COMMIT", "warning",
                              f"VPG {vpg}: {operation} to checkpoint {plan.checkpoint_id} awaiting commit or "
                              f"rollback{when}", data={"operation": op})
            store.finish_operation(op, "succeeded", rto_seconds=round(rto, 3), rto_target_seconds=v.rto_target_seconds,
                                   **({"notes": "; ".join(warnings)} if warnings else {}),
                                   **_cp_fields(rt, vpg, store.operation(op), plan))
        except BaseException as exc:
            cleanup = _cleanup_runner(runner, exc)
            errs = _undo_live(rt, v, op, op, cleanup)
            _restore_status(store, vpg, store.operation(op))
            result = "cancelled" if not isinstance(exc, Exception) else "failed"
            text = str(exc) or type(exc).__name__
            if errs:
                text += f"; rollback incomplete: {errs[0]}"
            store.finish_operation(op, result, error=text, rto_target_seconds=v.rto_target_seconds,
                                   **_cp_fields(rt, vpg, store.operation(op), find_plan(rt, op)))
            store.unlock(vpg, op)
            steps.forget(rt, op)
            raise
    summary = operation_summary(store, op)
    summary["warnings"] = warnings
    for w in warnings:
        log.warning("VPG %s: %s", vpg, w)
    if not moving:
        deadline = store.policy_deadline(op)
        if deadline is None:
            line = f"VPG {vpg}: failover awaiting commit: run 'vmrep commit {vpg}' or 'vmrep rollback {vpg}'"
        else:
            summary["commit_policy"] = {"policy": deadline.policy, "due_at": deadline.due_at}
            line = (f"VPG {vpg}: failover awaiting commit; the commit policy will {deadline.policy} at "
                    f"{deadline.due_at:%Y-%m-%d %H:%M:%S} UTC (applied by the monitor pass, every minute) "
                    f"unless someone commits or rolls back first")
        log.info("%s", line)
        if notify is not None:
            notify(line)
    if moving:
        summary["commit"] = commit(config, vpg, reverse_protection=reverse_protection,
                                   remove_source=not keep_source_vms, who=who, flow_run_id=flow_run_id,
                                   runner=runner)
    return summary


def commit(config: str, vpg: str, *, reverse_protection: bool = False, remove_source: bool | None = None,
           who: str | None = None, flow_run_id: str | None = None, runner: Any = None,
           by_policy: bool = False) -> dict[str, Any]:
    """Commit the failover or move awaiting commit: the recovered VMs stay. With reverse
    protection the source VMs are removed (their disks stay as pre-seed) and a reverse
    VPG is created and synced; without it the VPG is left NeedsConfiguration."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    store = rt.store
    runner = runner or DirectRunner()
    live = pending_live_operation(rt, v, runner=runner, apply_policy=not by_policy)
    if live is None and reverse_protection:
        # Committed while the protected site was gone: protect back once it is here again.
        return _protect_back_committed(rt, v, who=who, flow_run_id=flow_run_id, runner=runner)
    if live is None:
        live = awaiting_commit(rt, v, "commit", runner=runner, apply_policy=False)  # the refusal, in one line
    if remove_source is None:
        remove_source = reverse_protection
    if reverse_protection and not remove_source:
        raise Refused(f"VPG {vpg}: commit refused: reverse protection removes the source VMs "
                      "(their disks pre-seed the reverse VPG)")
    if remove_source:
        _refuse_without_protected_site(rt, v, "removing the source VMs" if not reverse_protection
                                       else "reverse protection")
    moving = live.kind == "move"
    names = [m.name for m in v.vms]
    with holding_vpg(store, vpg, "commit", who=who, flow_run_id=flow_run_id, take_from=(live.id, live.kind),
                     params={"live_operation": live.id, "reverse_protection": reverse_protection,
                             "remove_source": remove_source, "process": process_identity()},
                     refusal=lambda _: f"VPG {vpg}: commit refused: another commit or rollback is running") as op:
        store.set_status(vpg, Status.MOVING if moving else Status.FAILING_OVER,
                         None if moving else Substatus.FAILING_OVER_COMMITTING,
                         detail=f"commit {op[:8]}")
        try:
            plan = get_plan(rt, live.id)
            if reverse_protection:
                plan = with_current_source_info(rt, v, plan)
            runner.each("mark-committed", [(config, vpg, op, n, live.id) for n in names])
            if remove_source:
                runner.each("remove-source-vm", [(config, vpg, op, n, live.id) for n in names])
            _clear(store, vpg, {"AWAITING_COMMIT"})
        except BaseException:
            # the operation is ended and the lock handed back to the live operation by holding_vpg
            store.set_status(vpg, Status.MOVING if moving else Status.FAILING_OVER,
                             Substatus.MOVING_BEFORE_COMMIT if moving else Substatus.FAILING_OVER_BEFORE_COMMIT,
                             detail=f"commit {op[:8]} failed: run it again")
            raise
        reverse: dict[str, Any] | None = None
        reverse_error: BaseException | None = None
        if reverse_protection:
            try:
                reverse = reverse_protect(rt, v, plan, op, runner=runner, who=who, flow_run_id=flow_run_id)
            except Exception as exc:  # noqa: BLE001 - the commit stands; reported below
                reverse_error = exc
        if reverse is not None:
            store.set_status(vpg, Status.RECOVERED, None, detail=f"committed; protected back by VPG {reverse['vpg']}")
        else:
            store.set_status(vpg, Status.RECOVERED, Substatus.NEEDS_CONFIGURATION, detail="committed; not protected")
        notes = f"reverse protection: VPG {reverse['vpg']}" if reverse else None
        store.finish_operation(op, "succeeded", notes=notes,
                               error=f"reverse protection failed: {reverse_error}" if reverse_error else None)
        if not by_policy:  # ended by hand before the policy's deadline: it has nothing left to do
            store.policy_done(live.id, "by hand", op)
    steps.forget(rt, live.id)
    out = operation_summary(store, op)
    out["reverse_protection"] = reverse
    if reverse_error is not None:
        raise VmrepError(f"VPG {vpg}: committed, but reverse protection failed: {reverse_error}") from reverse_error
    return out


def refuse_move_without_source(rt: Runtime, v: VPG) -> None:
    """A move is planned: it shuts the source down and takes a final checkpoint from it.
    Without the protected site that is a failover, and must be asked for as one."""
    gone = unreachable(rt.config.site(v.protected_site))
    if gone is not None:
        raise Refused(f"VPG {v.name}: move refused: protected site {v.protected_site} unreachable "
                      f"(a move needs the source; 'vmrep failover {v.name}' recovers without it): {gone}")


def refuse_commit_without_source(rt: Runtime, v: VPG, reverse_protection: bool) -> None:
    """Reverse protection (and removing the source VMs) needs the protected site."""
    if reverse_protection:
        _refuse_without_protected_site(rt, v, "reverse protection")


def _refuse_without_protected_site(rt: Runtime, v: VPG, what: str) -> None:
    """One line, before anything is done, when `what` needs the protected site and it is gone."""
    gone = unreachable(rt.config.site(v.protected_site))
    if gone is not None:
        raise Refused(f"VPG {v.name}: commit refused: {what} needs protected site {v.protected_site}, "
                      f"unreachable now; commit without --reverse-protection, or again once it is back ({gone})")


def _protect_back_committed(rt: Runtime, v: VPG, *, who: str | None, flow_run_id: str | None,
                            runner: Any) -> dict[str, Any]:
    """`commit --reverse-protection` after a commit without it (typically: committed while
    the protected site was gone): the source VMs are removed now and the recovered VMs
    protected back, pre-seeded from the original disks, as a commit with reverse
    protection would have done. Recorded as a commit operation of its own."""
    store = rt.store
    config = str(rt.config.source)
    done = committed_since_protection(store, v.name)
    live_id = (done.params or {}).get("live_operation") if done is not None else None
    if done is None or not live_id or (done.params or {}).get("reverse_protection"):
        raise Refused(f"VPG {v.name}: commit refused: no failover or move is awaiting commit, "
                      "nor one committed without reverse protection")
    _refuse_without_protected_site(rt, v, "reverse protection")
    plan = with_current_source_info(rt, v, get_plan(rt, live_id))
    names = [m.name for m in v.vms]
    with holding_vpg(store, v.name, "commit", who=who, flow_run_id=flow_run_id,
                     params={"live_operation": live_id, "reverse_protection": True, "remove_source": True,
                             "after_commit": done.id, "process": process_identity()},
                     refusal=lambda held: f"VPG {v.name}: commit refused: {_describe_holder(store, held)}") as op:
        runner.each("remove-source-vm", [(config, v.name, op, n, live_id) for n in names])
        reverse = reverse_protect(rt, v, plan, op, runner=runner, who=who, flow_run_id=flow_run_id)
        store.set_status(v.name, "Recovered", None, detail=f"committed; protected back by VPG {reverse['vpg']}")
        store.finish_operation(op, "succeeded", notes=f"reverse protection: VPG {reverse['vpg']} "
                                                      f"(after commit {done.id[:8]})")
    steps.forget(rt, live_id)
    out = operation_summary(store, op)
    out["reverse_protection"] = reverse
    return out


def reverse_protect(rt: Runtime, vpg: VPG, plan: Any, commit_op: str, *, runner: Any, who: str | None,
                    flow_run_id: str | None) -> dict[str, Any]:
    """Protect the committed VMs back to the original site, pre-seeded from the original disks."""
    from vmrep.recovery.reverse import (
        failover_baselines,
        reverse_definition,
        reverse_sync_meta,
        reverse_target,
        save_generated,
    )
    from vmrep.replication import engine

    store = rt.store
    config = str(rt.config.source)
    name, generate = reverse_target(rt.config, vpg)
    if generate:
        target = save_generated(rt.config, reverse_definition(vpg, plan, name), reverse_of=vpg.name,
                                operation_id=commit_op)
    else:
        target = rt.config.vpg(name)
    preseed = {m.source: dict((m.source_info or {}).get("disks") or {}) for m in plan.vms}
    with holding_vpg(store, target.name, "reverse_protect", who=who, flow_run_id=flow_run_id,
                     params={"reverse_of": vpg.name, "commit_operation": commit_op, "preseed": preseed,
                             "process": process_identity()},
                     refusal=lambda held: f"VPG {target.name}: reverse protection refused: "
                                          f"{_describe_holder(store, held)}") as op:
        try:
            store.update_runtime(target.name, initial_sync_done=False, paused=False)
            store.set_status(target.name, Status.INITIALIZING, Substatus.INITIAL_SYNC,
                             detail=f"reverse protection of {vpg.name}")
            engine.close_writer(rt, target.name, commit=False)
            # what the failover recorded before the recovered VMs ran: the reverse sync
            # reads only the blocks it cannot know from it (docs/recovery.md)
            baselines = failover_baselines(store, vpg.name, plan.operation_id, plan.checkpoint_id)
            results = runner.each("reverse-sync", [(config, target.name, op, m.name, preseed.get(m.name, {}),
                                                    baselines.get(m.name, {})) for m in target.vms])
            cp = runner.one("reverse-checkpoint", config, target.name, op, vpg.name, reverse_sync_meta(results))
        except BaseException as exc:
            # the operation is ended and the VPG released by holding_vpg
            engine.close_writer(rt, target.name, commit=False)
            store.set_status(target.name, Status.INITIALIZING, Substatus.INITIAL_SYNC,
                             detail=f"reverse protection failed: {exc}; run 'vmrep sync {target.name}'")
            raise
        store.update_runtime(target.name, initial_sync_done=True)
        store.set_status(target.name, Status.MEETING_SLA, Substatus.DELTA_SYNC, detail="reverse protection synced")
        stored = sum(r["bytes_stored"] for r in results)
        read = sum(r["bytes_read"] for r in results)
        store.finish_operation(op, "succeeded", checkpoint_id=cp["id"],
                               notes=f"pre-seeded; {stored} bytes stored of {read} read")
    return {"vpg": target.name, "operation_id": op, "checkpoint": cp["id"], "bytes_read": read,
            "bytes_stored": stored, "generated": generate}


def rollback(config: str, vpg: str, *, who: str | None = None, flow_run_id: str | None = None,
             runner: Any = None, by_policy: bool = False) -> dict[str, Any]:
    """Roll back the failover or move awaiting commit: recovered VMs removed, source VMs
    powered back on where the recovery powered them off, journal untouched."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    store = rt.store
    runner = runner or DirectRunner()
    live = awaiting_commit(rt, v, "rollback", runner=runner, apply_policy=not by_policy)
    moving = live.kind == "move"
    with holding_vpg(store, vpg, "rollback", who=who, flow_run_id=flow_run_id, take_from=(live.id, live.kind),
                     params={"live_operation": live.id, "process": process_identity()},
                     refusal=lambda _: f"VPG {vpg}: rollback refused: another commit or rollback is running") as op:
        store.set_status(vpg, Status.MOVING if moving else Status.FAILING_OVER,
                         None if moving else Substatus.FAILING_OVER_ROLLING_BACK,
                         detail=f"rollback {op[:8]}")
        try:
            errs = _undo_live(rt, v, live.id, op, runner)
            if errs:
                raise errs[0]
        except BaseException as exc:
            # the operation is ended and the lock handed back to the live operation by holding_vpg
            store.raise_alert(vpg, "ROLLBACK_FAILED", "error", f"VPG {vpg}: rollback failed: {exc}")
            raise
        _restore_status(store, vpg, live)
        _clear(store, vpg, {"ROLLBACK_FAILED"})
        store.finish_operation(op, "succeeded")
        if not by_policy:
            store.policy_done(live.id, "by hand", op)
    steps.forget(rt, live.id)
    return operation_summary(store, op)


def _policy_acted(store: Any, vpg: str) -> str:
    """': the commit policy committed it at …' when the newest live recovery of the VPG
    was ended by its policy (a command after the deadline explains what it finds)."""
    live = next((o for o in store.operations(vpg) if o.kind in LIVE_KINDS), None)
    d = store.policy_deadline(live.id) if live is not None else None
    if d is None or d.outcome not in ("committed", "rolled back"):
        return ""
    did = "committed it" if d.outcome == "committed" else "rolled it back"
    return f" (the commit policy {did} at {d.applied_at:%Y-%m-%d %H:%M:%S} UTC)"


def run_move(config: str, vpg: str, *, confirm: str | None, shutdown: str = "graceful",
             reverse_protection: bool = True, keep_source_vms: bool = False, who: str | None = None,
             flow_run_id: str | None = None, runner: Any = None, verify_timeout: float = 600.0,
             shutdown_timeout: float = 300.0, sleep: Callable[[float], None] = time.sleep,
             approval: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move: graceful (or forced) shutdown, final checkpoint, failover to it, commit,
    reverse protection by default."""
    return run_failover(config, vpg, confirm=confirm, shutdown=shutdown, who=who, flow_run_id=flow_run_id,
                        runner=runner, verify_timeout=verify_timeout, shutdown_timeout=shutdown_timeout,
                        operation="move", reverse_protection=reverse_protection,
                        keep_source_vms=keep_source_vms, sleep=sleep, approval=approval)
