"""Recovery operations as sequences of steps: test failover, live failover, commit,
rollback, move, reverse protection.

The sequences are written once and run by a *runner*: `DirectRunner` calls the steps in
this process (tests, benchmarks, the engine without Prefect); the Prefect flows pass a
runner that submits each step as a task (`tasks/recovery.py`). Either way a step is one
retry unit and the VMs of one step run in parallel.

Rules every operation follows:

* one operation holds a VPG at a time (`vmrep.state.holding.holding_vpg`: recorded and
  locked in one transaction, or recorded as refused), none starts while the VPG is in
  initial sync, a live failover or move holds it until commit or rollback;
* an operation whose process died (a crash) is recognised by the next one (the process
  recorded with the operation is gone), which cleans up after it before starting;
* every operation begins by removing what earlier runs left at the recovery site;
* a test always cleans up (after success, failure, cancel); a live failover that fails
  before 'awaiting commit' is rolled back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

import psutil

from vmrep.config import VPG
from vmrep.errors import JournalError, Refused, VmrepError
from vmrep.recovery import naming, steps
from vmrep.recovery.plan import check_test_networks
from vmrep.recovery.steps import STEPS, VerificationFailed, find_plan, get_plan
from vmrep.runner import DirectRunner as _StepRunner
from vmrep.runtime import Runtime, get_runtime
from vmrep.state.holding import holding_vpg, who_started

log = logging.getLogger(__name__)

LIVE_KINDS = ("failover", "move")
RECOVERY_KINDS = ("test", "failover", "move", "commit", "rollback", "reverse_protect")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def who_am_i(who: str | None = None) -> str:
    return who_started(who)


class TestFailed(VmrepError):
    """A DR test ran and cleaned up, but did not succeed (verification or a step)."""

    __test__ = False

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


# --------------------------------------------------------------------------------------
# Runners


class DirectRunner(_StepRunner):
    """Run recovery steps in this process: the calls of one step in parallel threads,
    transient faults retried as the Prefect tasks retry them (`vmrep.runner`)."""

    def __init__(self, *, retries: int = 3, delays: Sequence[float] = (0.5, 1.0, 2.0), max_workers: int = 8) -> None:
        super().__init__(STEPS, retries=retries, delays=delays, max_workers=max_workers)


def _cleanup_runner(runner: Any, exc: BaseException | None) -> Any:
    """After a cancel or crash the orchestration may not submit tasks any more: clean up
    in this process."""
    if exc is not None and not isinstance(exc, Exception):
        return DirectRunner()
    return runner


# --------------------------------------------------------------------------------------
# Which process runs an operation (to recognise one that died)


def _proc_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid)}


def process_gone(ident: dict[str, Any] | None) -> bool:
    """True when the process is known to be gone (same host only: elsewhere we cannot
    tell). A pid in use again by a later process counts as gone (its start differs)."""
    if not ident or ident.get("host") != socket.gethostname():
        return False
    pid = int(ident.get("pid") or 0)
    if pid <= 0:
        return False
    start = _proc_start(pid)
    if start is None:
        return not psutil.pid_exists(pid)
    try:
        recorded = float(ident["start"])
    except (KeyError, TypeError, ValueError):
        return False  # no start recorded: the pid is in use, so it may be the same process
    return abs(start - recorded) > 0.01


# --------------------------------------------------------------------------------------
# The lock


def _handed_over(store: Any, op_id: str) -> bool:
    return any(s.step in ("awaiting-stop",) and s.result == "ok" for s in store.steps(op_id))


def holder_is_stale(store: Any, row: Any) -> bool:
    """The operation holding the lock is no longer running anywhere."""
    if row.lock_holder is None:
        return False
    op = store.operation(row.lock_holder)
    if op is None:
        return False  # no record of it: nothing tells us it is gone (refuse rather than guess)
    if op.kind in LIVE_KINDS and op.result == "succeeded":
        return False  # awaiting commit or rollback
    if op.result != "running":
        return True  # finished, but the lock was not released
    if op.kind == "test" and _handed_over(store, op.id):
        return False  # a test left running for people to look at
    return process_gone((op.params or {}).get("process"))


def _describe_holder(store: Any, row: Any) -> str:
    op = store.operation(row.lock_holder) if row.lock_holder else None
    kind = row.lock_kind or (op.kind if op else "another operation")
    what = {"test": "a test", "failover": "a failover", "move": "a move", "commit": "a commit",
            "rollback": "a rollback", "initial_sync": "the initial sync",
            "reverse_protect": "reverse protection"}.get(kind, f"a {kind}")
    if op is not None and op.kind in LIVE_KINDS and op.result == "succeeded":
        what += " awaiting commit or rollback"
    elif op is not None and op.kind == "test" and _handed_over(store, op.id):
        what += " left running (stop it with 'vmrep test stop')"
    if op is None:
        return f"{what} holds the VPG"
    when = op.started_at.strftime("%Y-%m-%d %H:%M:%S UTC") if op.started_at else "?"
    return f"{what} holds the VPG (operation {op.id[:8]}, started {when} by {op.started_by or '?'})"


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


def preflight(rt: Runtime, vpg: VPG, kind: str, *, confirm: str | None = None, check_lock: bool = True) -> None:
    """The refusals that need no vSphere call, each one line naming the VPG."""
    store = rt.store
    if kind in LIVE_KINDS and confirm != vpg.name:
        raise Refused(f"VPG {vpg.name}: {kind} refused: confirm by repeating the VPG's name "
                      f"(--confirm {vpg.name})")
    row = store.runtime(vpg.name)
    if row.lock_kind == "initial_sync" or (row.lock_holder is None and not row.initial_sync_done):
        if row.lock_kind == "initial_sync":
            raise Refused(f"VPG {vpg.name}: {kind} refused: initial sync in progress; no recovery operation "
                          "may start before it completes")
        raise Refused(f"VPG {vpg.name}: {kind} refused: initial sync has not completed "
                      f"(run 'vmrep sync {vpg.name}')")
    if check_lock and row.lock_holder is not None and not holder_is_stale(store, row):
        raise Refused(f"VPG {vpg.name}: {kind} refused: {_describe_holder(store, row)}")
    done = committed_since_protection(store, vpg.name)
    if done is not None:
        raise Refused(f"VPG {vpg.name}: {kind} refused: its VMs were recovered and committed "
                      f"(operation {done.id[:8]}); protect them again first")
    if kind == "test":
        check_test_networks(vpg)


@contextmanager
def begin(rt: Runtime, vpg: VPG, kind: str, *, who: str | None, params: dict[str, Any],
          flow_run_id: str | None, runner: Any, confirm: str | None = None) -> Iterator[str]:
    """Refuse or start: clean up after a dead holder, check, then record and lock
    (`holding_vpg`). The VPG stays held when the block returns: a failover awaits
    commit, a test may be left running; their own ends release it."""
    store = rt.store
    row = store.runtime(vpg.name)
    if row.lock_holder is not None and holder_is_stale(store, row):
        recover_interrupted(rt, vpg, row.lock_holder, runner=runner,
                            reason=f"its process is gone; cleaned up before a new {kind}")
    preflight(rt, vpg, kind, confirm=confirm)
    row = store.runtime(vpg.name)
    with holding_vpg(store, vpg.name, kind, who=who, flow_run_id=flow_run_id, keep=True,
                     params={**params, "process": process_identity(),
                             "status_before": [row.status, row.substatus]},
                     refusal=lambda held: f"VPG {vpg.name}: {kind} refused: {_describe_holder(store, held)}") as op:
        yield op


def recover_interrupted(rt: Runtime, vpg: VPG, op_id: str, *, runner: Any = None, reason: str) -> None:
    """Clean up after an operation that will not finish by itself (its process died, or its
    flow was cancelled), and release the VPG."""
    store = rt.store
    runner = runner or DirectRunner()
    op = store.operation(op_id)
    log.warning("VPG %s: cleaning up after operation %s: %s", vpg.name, op_id[:8], reason)
    if op is None:
        store.force_unlock(vpg.name)
        return
    if op.kind == "test" and op.result == "running":
        _finish_test(rt, vpg, op_id, success=False, notes=None, error=f"interrupted: {reason}", runner=runner,
                     result="cancelled")
        return
    if op.kind in LIVE_KINDS and op.result == "running":
        errs = _undo_live(rt, vpg, op_id, op_id, runner)
        _restore_status(store, vpg.name, op)
        store.finish_operation(op_id, "cancelled", error=f"interrupted: {reason}"
                               + (f"; clean-up errors: {errs[0]}" if errs else ""))
        store.force_unlock(vpg.name)
        return
    if op.kind in ("commit", "rollback") and op.result == "running":
        live = (op.params or {}).get("live_operation")
        store.finish_operation(op_id, "failed", error=f"interrupted: {reason}; run it again")
        if live and store.hand_over_lock(vpg.name, op_id, live, store.operation(live).kind):
            return
    if store.runtime(vpg.name).lock_holder == op_id:
        store.force_unlock(vpg.name)


def after_flow_interrupted(config: str, vpg: str, flow_run_id: str | None, why: str) -> list[str]:
    """For Prefect on_cancellation / on_crashed hooks: clean up the operations of this
    flow run that did not finish (their own `finally` may not have run)."""
    if not flow_run_id:
        return []
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    done = []
    for op in rt.store.operations(vpg):
        if op.flow_run_id == str(flow_run_id) and op.result == "running":
            if op.kind == "test" and _handed_over(rt.store, op.id):
                continue
            recover_interrupted(rt, v, op.id, reason=why)
            done.append(op.id)
    return done


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
        "wall_seconds": round(wall, 3), "steps_seconds": round(steps_sum, 3),
    }
    if op.kind == "test":
        tr = next((t for t in store.test_results(op.vpg) if t.operation_id == op.id), None)
        if tr is not None:
            out.update(success=tr.success, cleanup_ok=tr.cleanup_ok)
    if op.kind in ("test", "failover", "move") and op.rto_seconds is None:
        for s in store.steps(op_id):
            if s.step == "recovered" and s.detail:
                out["rto_seconds"] = s.detail.get("rto_seconds")
    return out


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
        store.set_status(vpg, "MeetingSLA", None, detail="recovery rolled back")
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


# --------------------------------------------------------------------------------------
# The recovery sequence shared by tests and live recoveries


def _recover(rt: Runtime, config: str, vpg: VPG, op: str, operation: str, checkpoint_id: str, runner: Any,
             verify_timeout: float, sleep: Callable[[float], None]) -> dict[str, Any]:
    """plan -> disks -> VMs -> re-IP -> pre script -> boot groups -> post script -> verify.
    Returns per VM the verification result or its exception."""
    runner.one("plan", config, vpg.name, op, operation, checkpoint_id)
    plan = get_plan(rt, op)
    names = [m.source for m in plan.vms]

    def calls(*extra: Any, only: list[str] | None = None) -> list[tuple]:
        return [(config, vpg.name, op, n, *extra) for n in (names if only is None else only)]

    runner.each("write-disks", calls())
    runner.each("create-vm", calls())
    runner.each("customize", calls(only=[m.source for m in plan.vms if m.customize]))
    if vpg.pre_recovery_script is not None:
        runner.one("run-script", config, vpg.name, op, "pre")
    for i, g in enumerate(plan.groups):
        runner.each("power-on", calls(only=list(g["vms"])))  # source VM names, in boot order
        if g["delay_seconds"] and i < len(plan.groups) - 1:
            sleep(float(g["delay_seconds"]))
    if vpg.post_recovery_script is not None:
        runner.one("run-script", config, vpg.name, op, "post")
    results = runner.each("verify", calls(verify_timeout), settle=True)
    return dict(zip(names, results, strict=True))


# --------------------------------------------------------------------------------------
# Test failover


def run_test(config: str, vpg: str, *, checkpoint: str = "latest", keep_minutes: float = 0.0,
             notes: str | None = None, who: str | None = None, flow_run_id: str | None = None,
             runner: Any = None, stop: bool = True, verify_timeout: float = 600.0,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Test failover: start, verify, keep for `keep_minutes`, stop (with `stop=False`
    the test is left running for `stop_test`). Returns the operation's summary; a step
    that fails is raised after the clean-up."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    runner = runner or DirectRunner()
    preflight(rt, v, "test", check_lock=False)
    cp = rt.journal.checkpoint(vpg, checkpoint)
    with begin(rt, v, "test", who=who, flow_run_id=flow_run_id, runner=runner,
               params={"checkpoint": checkpoint, "checkpoint_id": cp.id, "keep_minutes": keep_minutes,
                       "stop": stop, "notes": notes, "verify_timeout": verify_timeout}) as op:
        try:
            runner.one("cleanup-leftovers", config, vpg, op)
            results = _recover(rt, config, v, op, "test", cp.id, runner, verify_timeout, sleep)
            verified = all(not isinstance(r, BaseException) for r in results.values())
            if verified:
                _record_rto(rt.store, op)
            if not stop:
                rt.store.record_step(op, None, "awaiting-stop", "ok", detail={"verified": verified})
                return operation_summary(rt.store, op)
            if keep_minutes > 0:
                sleep(keep_minutes * 60.0)
        except BaseException as exc:
            _finish_test(rt, v, op, success=False, notes=notes, error=exc, runner=_cleanup_runner(runner, exc))
            raise
        return _finish_test(rt, v, op, success=None, notes=notes, error=None, runner=runner)


def running_test(store: Any, vpg: str) -> Any | None:
    row = store.runtime(vpg)
    if row.lock_kind != "test" or not row.lock_holder:
        return None
    return store.operation(row.lock_holder)


def stop_test(config: str, vpg: str, *, success: bool, notes: str | None = None, who: str | None = None,
              runner: Any = None) -> dict[str, Any]:
    """Stop the VPG's running test: record success and notes, remove everything."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    op = running_test(rt.store, vpg)
    if op is None:
        raise Refused(f"VPG {vpg}: no test is running")
    if op.result != "running":
        rt.store.unlock(vpg, op.id)
        raise Refused(f"VPG {vpg}: the test {op.id[:8]} has finished already")
    stopper = who_am_i(who)
    text = notes if notes else None
    if stopper != op.started_by and text:
        text = f"{text} (stopped by {stopper})"
    return _finish_test(rt, v, op.id, success=success, notes=text, error=None, runner=runner or DirectRunner())


def leftovers(rt: Runtime, vpg: VPG, op_id: str) -> list[str]:
    """What of a test is still at the recovery site (VMs, scratch folders)."""
    from vmrep.recovery import vms as vmops

    client = rt.client(vpg.recovery_site)
    names = {naming.test_vm_name(m.name) for m in vpg.vms}
    left = [sv.name for sv in vmops.site_vms(client)
            if (sv.marked_vpg == vpg.name and sv.extra.get(naming.MARK_OPERATION) == op_id)
            or (sv.marked_vpg is None and sv.name in names)]
    plan = find_plan(rt, op_id)
    if plan is not None:
        ds = rt.datastores(vpg.recovery_site)
        for m in plan.vms:
            for d in m.disks:
                try:
                    if ds.exists(d.flat) or ds.exists(d.descriptor):
                        left.append(d.descriptor)
                except VmrepError:
                    pass
    return left


def _finish_test(rt: Runtime, vpg: VPG, op_id: str, *, success: bool | None, notes: str | None,
                 error: Any, runner: Any, result: str | None = None) -> dict[str, Any]:
    """Stop a test: remove its VMs and scratch copies (always), tag the checkpoint ("Tested
    at <start>", with " (failed)" or " (cancelled)" unless it passed), record the result,
    clear TEST_OVERDUE if it passed, release the VPG."""
    store = rt.store
    config = str(rt.config.source)
    op = store.operation(op_id)
    names = [m.name for m in vpg.vms]
    problems: list[str] = []
    try:
        for r in runner.each("remove-vm", [(config, vpg.name, op_id, n, op_id) for n in names], settle=True):
            if isinstance(r, BaseException):
                problems.append(str(r))
        try:
            runner.one("remove-disks", config, vpg.name, op_id, op_id)
        except Exception as exc:  # noqa: BLE001 - recorded, the test result is still written
            problems.append(str(exc))
        try:
            left = leftovers(rt, vpg, op_id)
        except Exception as exc:  # noqa: BLE001 - recorded, the test result is still written
            left = []
            problems.append(f"cannot check for leftovers: {exc}")
        if left:
            problems.append(f"left at site {vpg.recovery_site}: {', '.join(left)}")
    except BaseException as exc:  # a cancel during clean-up: the next run finishes it
        problems.append(f"clean-up interrupted: {type(exc).__name__}")
    cleanup_ok = not problems
    ver_ok, _ = verification(store, op_id)
    if success is None:
        success = error is None and ver_ok is True
    if result is None:
        if error is None:
            result = "succeeded" if success else "failed"
        elif isinstance(error, BaseException) and not isinstance(error, Exception):
            result = "cancelled"
        else:
            result = "failed"
    plan = find_plan(rt, op_id)
    started = op.started_at
    tag_note = None
    if plan is not None:
        # The tag is a record of what was proven: only a test that passed says so plainly.
        outcome = "" if success else f" ({'cancelled' if result == 'cancelled' else 'failed'})"
        try:
            rt.journal.add_tag(vpg.name, plan.checkpoint_id, f"Tested at {started.isoformat()}{outcome}")
        except JournalError as exc:
            tag_note = f"checkpoint not tagged: {exc}"
    text_notes = "; ".join(x for x in (notes, tag_note) if x) or None
    result_notes = text_notes
    if not cleanup_ok:
        result_notes = "; ".join(x for x in (text_notes, "clean-up failed: " + "; ".join(problems)) if x)
    store.add_test_result(op_id, vpg.name, started_at=started, success=bool(success),
                          checkpoint_id=plan.checkpoint_id if plan else None,
                          checkpoint_time=datetime.fromisoformat(plan.checkpoint_time) if plan else None,
                          verification_ok=ver_ok, cleanup_ok=cleanup_ok, notes=result_notes,
                          tested_by=op.started_by)
    store.update_runtime(vpg.name, last_test_at=started, last_test_success=bool(success))
    if success:  # only a passed test resets the test-overdue clock (vmrep.health.gather_facts)
        _clear(store, vpg.name, {"TEST_OVERDUE"})
    if cleanup_ok:
        _clear(store, vpg.name, {"TEST_CLEANUP_FAILED"})
    else:
        store.raise_alert(vpg.name, "TEST_CLEANUP_FAILED", "error",
                          f"VPG {vpg.name}: test clean-up failed: {'; '.join(problems)}")
    err_text = None
    if error is not None:
        err_text = str(error) if not isinstance(error, BaseException) or str(error) else type(error).__name__
    elif not success:
        _, per = verification(store, op_id)
        bad = [f"{per[vm].get('error')}" for vm in per if not per[vm]["ok"]]
        err_text = "test did not succeed" + (f": {'; '.join(bad)}" if bad else " (as recorded)")
    store.finish_operation(op_id, result, error=err_text, rto_seconds=_rto_of(store, op_id), notes=text_notes,
                           **_cp_fields(rt, vpg.name, op, plan))
    store.unlock(vpg.name, op_id)
    steps.forget(op_id)
    return operation_summary(store, op_id)


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
    except Exception as exc:  # noqa: BLE001
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
        except Exception as exc:  # noqa: BLE001
            errs.append(exc)
    _clear(store, vpg.name, {"AWAITING_COMMIT"})
    return errs


def pending_live_operation(rt: Runtime, vpg: VPG, *, runner: Any = None) -> Any | None:
    """The failover or move awaiting commit or rollback (after recovering an interrupted
    commit or rollback, or cleaning up a live recovery whose process died)."""
    store = rt.store
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


def run_failover(config: str, vpg: str, *, confirm: str | None, checkpoint: str = "latest",
                 shutdown: str | None = None, commit_policy: str | None = None,
                 commit_after_minutes: float | None = None, who: str | None = None,
                 flow_run_id: str | None = None, runner: Any = None, verify_timeout: float = 600.0,
                 shutdown_timeout: float = 300.0, operation: str = "failover", reverse_protection: bool = False,
                 keep_source_vms: bool = False, sleep: Callable[[float], None] = time.sleep,
                 notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Live failover (or, with operation='move', a move): recover on the production
    network and wait for commit or rollback as the commit policy says. `notify` gets a
    line for people when the failover awaits commit."""
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
    cp = None if moving else rt.journal.checkpoint(vpg, checkpoint)
    with begin(rt, v, operation, who=who, flow_run_id=flow_run_id, runner=runner, confirm=confirm,
               params={"checkpoint": "final" if moving else checkpoint, "shutdown": shutdown,
                       "commit_policy": policy, "commit_after_minutes": after,
                       "reverse_protection": reverse_protection, "keep_source_vms": keep_source_vms,
                       "verify_timeout": verify_timeout}) as op:
        store = rt.store
        status = "Moving" if moving else "FailingOver"
        names = [m.name for m in v.vms]
        try:
            runner.one("cleanup-leftovers", config, vpg, op)
            runner.one("pause-replication", config, vpg, op, True)
            store.set_status(vpg, status, None, detail=f"{operation} {op[:8]} started")
            outs = runner.each("shutdown-source", [(config, vpg, op, n, shutdown, shutdown_timeout) for n in names],
                               settle=True)
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
            store.set_status(vpg, status, "MovingBeforeCommit" if moving else "FailingOverBeforeCommit",
                             detail=f"{operation} {op[:8]}: awaiting commit or rollback")
            plan = get_plan(rt, op)
            when = {"commit": f"; commits at the policy's timeout ({after:g} min)",
                    "rollback": f"; rolls back at the policy's timeout ({after:g} min)"}.get(policy, "")
            store.raise_alert(vpg, "AWAITING_COMMIT", "warning",
                              f"VPG {vpg}: {operation} to checkpoint {plan.checkpoint_id} awaiting commit or "
                              f"rollback{when}", data={"operation": op})
            store.finish_operation(op, "succeeded", rto_seconds=round(rto, 3),
                                   **_cp_fields(rt, vpg, store.operation(op), plan))
        except BaseException as exc:
            cleanup = _cleanup_runner(runner, exc)
            errs = _undo_live(rt, v, op, op, cleanup)
            _restore_status(store, vpg, store.operation(op))
            result = "cancelled" if not isinstance(exc, Exception) else "failed"
            text = str(exc) or type(exc).__name__
            if errs:
                text += f"; rollback incomplete: {errs[0]}"
            store.finish_operation(op, result, error=text,
                                   **_cp_fields(rt, vpg, store.operation(op), find_plan(rt, op)))
            store.unlock(vpg, op)
            steps.forget(op)
            raise
    summary = operation_summary(store, op)
    if not moving:
        if policy == "none":
            line = f"VPG {vpg}: failover awaiting commit: run 'vmrep commit {vpg}' or 'vmrep rollback {vpg}'"
        else:
            at = (utcnow().timestamp() + after * 60.0)
            line = (f"VPG {vpg}: failover awaiting commit; the commit policy will {policy} at "
                    f"{datetime.fromtimestamp(at, timezone.utc):%Y-%m-%d %H:%M:%S} UTC unless someone commits "
                    f"or rolls back first")
        log.info("%s", line)
        if notify is not None:
            notify(line)
    if moving:
        summary["commit"] = commit(config, vpg, reverse_protection=reverse_protection,
                                   remove_source=not keep_source_vms, who=who, flow_run_id=flow_run_id,
                                   runner=runner)
    elif policy in ("commit", "rollback"):
        summary["commit"] = _apply_policy(config, vpg, op, policy, after, who=who, flow_run_id=flow_run_id,
                                          runner=runner, sleep=sleep)
    return summary


def _apply_policy(config: str, vpg: str, op: str, policy: str, after_minutes: float, *, who: str | None,
                  flow_run_id: str | None, runner: Any, sleep: Callable[[float], None]) -> dict[str, Any] | None:
    """Wait for the commit policy's timeout (unless someone commits or rolls back by hand)."""
    rt = get_runtime(config)
    deadline = time.monotonic() + after_minutes * 60.0
    while True:
        if rt.store.runtime(vpg).lock_holder != op:
            return {"by_hand": True}
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sleep(min(5.0, left))
    if policy == "commit":
        return commit(config, vpg, who=who or "commit policy", flow_run_id=flow_run_id, runner=runner)
    return rollback(config, vpg, who=who or "commit policy", flow_run_id=flow_run_id, runner=runner)


def commit(config: str, vpg: str, *, reverse_protection: bool = False, remove_source: bool | None = None,
           who: str | None = None, flow_run_id: str | None = None, runner: Any = None) -> dict[str, Any]:
    """Commit the failover or move awaiting commit: the recovered VMs stay. With reverse
    protection the source VMs are removed (their disks stay as pre-seed) and a reverse
    VPG is created and synced; without it the VPG is left NeedsConfiguration."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    store = rt.store
    runner = runner or DirectRunner()
    live = pending_live_operation(rt, v, runner=runner)
    if live is None:
        raise Refused(f"VPG {vpg}: commit refused: no failover or move is awaiting commit")
    if remove_source is None:
        remove_source = reverse_protection
    if reverse_protection and not remove_source:
        raise Refused(f"VPG {vpg}: commit refused: reverse protection removes the source VMs "
                      "(their disks pre-seed the reverse VPG)")
    moving = live.kind == "move"
    names = [m.name for m in v.vms]
    with holding_vpg(store, vpg, "commit", who=who, flow_run_id=flow_run_id, take_from=(live.id, live.kind),
                     params={"live_operation": live.id, "reverse_protection": reverse_protection,
                             "remove_source": remove_source, "process": process_identity()},
                     refusal=lambda _: f"VPG {vpg}: commit refused: another commit or rollback is running") as op:
        store.set_status(vpg, "Moving" if moving else "FailingOver", None if moving else "FailingOverCommitting",
                         detail=f"commit {op[:8]}")
        try:
            plan = get_plan(rt, live.id)
            runner.each("mark-committed", [(config, vpg, op, n, live.id) for n in names])
            if remove_source:
                runner.each("remove-source-vm", [(config, vpg, op, n, live.id) for n in names])
            _clear(store, vpg, {"AWAITING_COMMIT"})
        except BaseException:
            # the operation is ended and the lock handed back to the live operation by holding_vpg
            store.set_status(vpg, "Moving" if moving else "FailingOver",
                             "MovingBeforeCommit" if moving else "FailingOverBeforeCommit",
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
            store.set_status(vpg, "Recovered", None, detail=f"committed; protected back by VPG {reverse['vpg']}")
        else:
            store.set_status(vpg, "Recovered", "NeedsConfiguration", detail="committed; not protected")
        notes = f"reverse protection: VPG {reverse['vpg']}" if reverse else None
        store.finish_operation(op, "succeeded", notes=notes,
                               error=f"reverse protection failed: {reverse_error}" if reverse_error else None)
    steps.forget(live.id)
    out = operation_summary(store, op)
    out["reverse_protection"] = reverse
    if reverse_error is not None:
        raise VmrepError(f"VPG {vpg}: committed, but reverse protection failed: {reverse_error}") from reverse_error
    return out


def reverse_protect(rt: Runtime, vpg: VPG, plan: Any, commit_op: str, *, runner: Any, who: str | None,
                    flow_run_id: str | None) -> dict[str, Any]:
    """Protect the committed VMs back to the original site, pre-seeded from the original disks."""
    from vmrep.recovery.reverse import reverse_definition, reverse_target, save_generated
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
            store.set_status(target.name, "Initializing", "InitialSync", detail=f"reverse protection of {vpg.name}")
            engine.close_writer(rt, target.name, commit=False)
            results = runner.each("reverse-sync", [(config, target.name, op, m.name, preseed.get(m.name, {}))
                                                   for m in target.vms])
            cp = runner.one("reverse-checkpoint", config, target.name, op, vpg.name)
        except BaseException as exc:
            # the operation is ended and the VPG released by holding_vpg
            engine.close_writer(rt, target.name, commit=False)
            store.set_status(target.name, "Initializing", "InitialSync",
                             detail=f"reverse protection failed: {exc}; run 'vmrep sync {target.name}'")
            raise
        store.update_runtime(target.name, initial_sync_done=True)
        store.set_status(target.name, "MeetingSLA", "DeltaSync", detail="reverse protection synced")
        stored = sum(r["bytes_stored"] for r in results)
        read = sum(r["bytes_read"] for r in results)
        store.finish_operation(op, "succeeded", checkpoint_id=cp["id"],
                               notes=f"pre-seeded; {stored} bytes stored of {read} read")
    return {"vpg": target.name, "operation_id": op, "checkpoint": cp["id"], "bytes_read": read,
            "bytes_stored": stored, "generated": generate}


def rollback(config: str, vpg: str, *, who: str | None = None, flow_run_id: str | None = None,
             runner: Any = None) -> dict[str, Any]:
    """Roll back the failover or move awaiting commit: recovered VMs removed, source VMs
    powered back on where the recovery powered them off, journal untouched."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    store = rt.store
    runner = runner or DirectRunner()
    live = pending_live_operation(rt, v, runner=runner)
    if live is None:
        raise Refused(f"VPG {vpg}: rollback refused: no failover or move is awaiting commit")
    moving = live.kind == "move"
    with holding_vpg(store, vpg, "rollback", who=who, flow_run_id=flow_run_id, take_from=(live.id, live.kind),
                     params={"live_operation": live.id, "process": process_identity()},
                     refusal=lambda _: f"VPG {vpg}: rollback refused: another commit or rollback is running") as op:
        store.set_status(vpg, "Moving" if moving else "FailingOver", None if moving else "FailingOverRollingBack",
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
    steps.forget(live.id)
    return operation_summary(store, op)


def run_move(config: str, vpg: str, *, confirm: str | None, shutdown: str = "graceful",
             reverse_protection: bool = True, keep_source_vms: bool = False, who: str | None = None,
             flow_run_id: str | None = None, runner: Any = None, verify_timeout: float = 600.0,
             shutdown_timeout: float = 300.0, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Move: graceful (or forced) shutdown, final checkpoint, failover to it, commit,
    reverse protection by default."""
    return run_failover(config, vpg, confirm=confirm, shutdown=shutdown, who=who, flow_run_id=flow_run_id,
                        runner=runner, verify_timeout=verify_timeout, shutdown_timeout=shutdown_timeout,
                        operation="move", reverse_protection=reverse_protection,
                        keep_source_vms=keep_source_vms, sleep=sleep)


__all__ = [
    "DirectRunner", "TestFailed", "VerificationFailed", "after_flow_interrupted", "begin", "commit",
    "live_facts", "operation_summary", "pending_live_operation", "preflight", "recover_interrupted",
    "reverse_protect", "rollback", "run_failover", "run_move", "run_test", "running_test", "stop_test",
]
