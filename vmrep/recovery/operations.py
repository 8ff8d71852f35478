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

This module is the facade every caller imports: the code lives by concern in
`sequence` (the runner and the shared recovery sequence), `ownership` (process identity,
stale holders, preflight, `begin`, clean-up after an interrupted operation), `records`
(summary, verification, RTO, checkpoint fields, status restore, live facts),
`testfailover` (the test lifecycle) and `live` (failover, commit policy, commit, reverse
protection, rollback, move).
"""

from __future__ import annotations

from vmrep.recovery.live import (
    _undo_live,
    awaiting_commit,
    commit,
    pending_live_operation,
    refuse_commit_without_source,
    refuse_move_without_source,
    reverse_protect,
    rollback,
    run_failover,
    run_move,
)
from vmrep.recovery.ownership import (
    RECOVERY_KINDS,
    _describe_holder,
    _handed_over,
    _proc_start,
    after_flow_interrupted,
    begin,
    holder_is_stale,
    preflight,
    process_gone,
    process_identity,
    recover_interrupted,
    who_am_i,
)
from vmrep.recovery.records import (
    LIVE_KINDS,
    _clear,
    _cp_fields,
    _record_rto,
    _restore_status,
    _rto_of,
    _steps_by_vm,
    committed_since_protection,
    live_facts,
    operation_summary,
    utcnow,
    verification,
)
from vmrep.recovery.sequence import DirectRunner, _cleanup_runner, _recover
from vmrep.recovery.steps import VerificationFailed
from vmrep.recovery.testfailover import (
    TestFailed,
    _finish_test,
    leftovers,
    run_test,
    running_test,
    stop_test,
)

__all__ = [
    "DirectRunner", "LIVE_KINDS", "RECOVERY_KINDS", "TestFailed", "VerificationFailed", "after_flow_interrupted",
    "awaiting_commit", "begin", "commit", "committed_since_protection", "holder_is_stale", "leftovers", "live_facts",
    "operation_summary", "pending_live_operation", "preflight", "process_gone", "process_identity",
    "recover_interrupted", "refuse_commit_without_source", "refuse_move_without_source",
    "reverse_protect", "rollback", "run_failover", "run_move", "run_test", "running_test",
    "stop_test", "utcnow", "verification", "who_am_i",
]
# the private names stay importable from here for code written against the single module
_private = (_undo_live, _describe_holder, _handed_over, _proc_start, _clear, _cp_fields,
            _record_rto, _restore_status, _rto_of, _steps_by_vm, _cleanup_runner, _recover, _finish_test)
