"""Recovery: test failover, live failover with commit and rollback, move, reverse
protection. Plain engine code (no Prefect): `operations` runs the sequences, `steps`
holds the retryable steps, `disks`/`vms`/`scripts` the primitives, `plan` the decisions
taken once per operation, `reverse` the reverse VPG. Decisions: docs/recovery.md."""

from vmrep.recovery.operations import (
    DirectRunner,
    TestFailed,
    VerificationFailed,
    commit,
    live_facts,
    operation_summary,
    rollback,
    run_failover,
    run_move,
    run_test,
    stop_test,
)

__all__ = [
    "DirectRunner",
    "TestFailed",
    "VerificationFailed",
    "commit",
    "live_facts",
    "operation_summary",
    "rollback",
    "run_failover",
    "run_move",
    "run_test",
    "stop_test",
]
