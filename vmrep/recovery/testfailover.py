"""The test failover lifecycle: start (`run_test`), the running test (`running_test`),
`stop_test`, what a test left behind (`leftovers`), and the one ending every test
takes (`_finish_test`: remove, tag, record, release)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Callable

from vmrep.config import VPG
from vmrep.errors import JournalError, Refused, VmrepError
from vmrep.recovery import naming, steps
from vmrep.recovery.ownership import begin, preflight, who_am_i
from vmrep.recovery.records import (
    _clear,
    _cp_fields,
    _record_rto,
    _rto_of,
    operation_summary,
    rto_met,
    verification,
)
from vmrep.recovery.sequence import DirectRunner, _cleanup_runner, _recover
from vmrep.recovery.steps import find_plan
from vmrep.runtime import Runtime, get_runtime


class TestFailed(VmrepError):
    """A DR test ran and cleaned up, but did not succeed (verification or a step)."""

    __test__ = False

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


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
    from vmrep.ransomware.service import choose

    cp, why = choose(rt.journal, vpg, checkpoint)  # and why: latest-clean says which suspicion it avoids
    with begin(rt, v, "test", who=who, flow_run_id=flow_run_id, runner=runner,
               params={"checkpoint": checkpoint, "checkpoint_id": cp.id, "checkpoint_reason": why,
                       "keep_minutes": keep_minutes, "stop": stop, "notes": notes,
                       "verify_timeout": verify_timeout}) as op:
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
    # The RTO objective does not decide success: a test that verified proves the VPG can be
    # recovered (it resets the test-overdue clock); a missed target is recorded beside it.
    rto = _rto_of(store, op_id)
    store.add_test_result(op_id, vpg.name, started_at=started, success=bool(success),
                          checkpoint_id=plan.checkpoint_id if plan else None,
                          checkpoint_time=datetime.fromisoformat(plan.checkpoint_time) if plan else None,
                          verification_ok=ver_ok, cleanup_ok=cleanup_ok, notes=result_notes,
                          tested_by=op.started_by, rto_seconds=rto, rto_target_seconds=vpg.rto_target_seconds,
                          rto_met=rto_met(rto, vpg.rto_target_seconds))
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
    store.finish_operation(op_id, result, error=err_text, rto_seconds=rto, rto_target_seconds=vpg.rto_target_seconds,
                           notes=text_notes, **_cp_fields(rt, vpg.name, op, plan))
    store.unlock(vpg.name, op_id)
    steps.forget(rt, op_id)
    return operation_summary(store, op_id)
