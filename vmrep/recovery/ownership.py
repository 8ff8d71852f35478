"""Who holds a VPG and whether it is still running: the process recorded with an
operation, stale holders, the refusals checked before any vSphere call, starting an
operation (`begin`) and cleaning up after one that will not finish by itself."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psutil

from vmrep.config import VPG
from vmrep.errors import Refused
from vmrep.recovery.plan import check_test_networks
from vmrep.recovery.records import (
    LIVE_KINDS,
    _restore_status,
    committed_since_protection,
)
from vmrep.recovery.sequence import DirectRunner
from vmrep.runtime import Runtime, get_runtime
from vmrep.state.holding import holding_vpg, who_started

log = logging.getLogger(__name__)

RECOVERY_KINDS = ("test", "failover", "move", "commit", "rollback", "reverse_protect")


def who_am_i(who: str | None = None) -> str:
    return who_started(who)


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
# Whether the Prefect flow run of an operation has ended (on any host)
#
# The engine imports no Prefect: the control plane registers a checker here
# (tasks/prefect_state.py, imported with the `tasks` package, as the secret resolver is).
# It answers the flow run's state type ("RUNNING", "CRASHED", ...) or None when it cannot
# tell (no Prefect API configured, the API does not answer, no such run).

FlowRunChecker = Callable[[str], "str | None"]
_flow_run_checker: FlowRunChecker | None = None
# A flow run in one of these states runs no more: an operation of it still 'running' is
# an orphan. (A SIGKILLed process leaves its run RUNNING: the process check covers that.)
ENDED_FLOW_RUN_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


def register_flow_run_checker(checker: FlowRunChecker | None) -> None:
    global _flow_run_checker
    _flow_run_checker = checker


def flow_run_state(flow_run_id: str | None) -> str | None:
    if not flow_run_id or _flow_run_checker is None:
        return None
    try:
        return _flow_run_checker(flow_run_id)
    except Exception as exc:  # noqa: BLE001 - cannot tell: the process check decides
        log.warning("cannot read the state of flow run %s: %s", flow_run_id, exc)
        return None


def owner_gone(op: Any) -> bool:
    """The process that runs `op` is gone: its Prefect flow run ended (any host), or its
    recorded process is gone (this host)."""
    if flow_run_state(op.flow_run_id) in ENDED_FLOW_RUN_STATES:
        return True
    return process_gone((op.params or {}).get("process"))


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
    return owner_gone(op)


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


def preflight(rt: Runtime, vpg: VPG, kind: str, *, confirm: str | None = None, check_lock: bool = True) -> None:
    """The refusals that need no vSphere call, each one line naming the VPG."""
    rt.ensure_local_journal([vpg.name])  # recovery runs where the journal is, not through its service
    store = rt.store
    # A commit policy whose deadline passed acts before anything else is decided on the VPG.
    from vmrep.recovery.policy import apply_due  # the policy builds on this module

    apply_due(str(rt.config.source), vpgs=[vpg.name])
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
    # the lifecycles import `begin` from here: their clean-ups are looked up when needed
    from vmrep.recovery.live import _undo_live
    from vmrep.recovery.testfailover import _finish_test

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
    if op.kind in ("initial_sync", "reverse_protect", "replicate") and op.result == "running":
        # What a copy that died leaves: its replication snapshots on the source VMs (the
        # next cycle removes them too; done here so nothing waits for one).
        from vmrep.replication.steps import release_consistency_points

        note = ""
        try:
            release_consistency_points(str(rt.config.source), vpg.name)
        except Exception as exc:  # noqa: BLE001 - the site may be away: the next cycle retries
            note = f"; replication snapshots not removed: {exc}"
        store.finish_operation(op_id, "cancelled", error=f"interrupted: {reason}{note}")
    store.finish_running(op_id, "cancelled", error=f"interrupted: {reason}")  # any other kind (a clean-up)
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
