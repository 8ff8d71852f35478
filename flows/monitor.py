"""The monitor, scheduled every minute: first what the control plane enforces (commit
policies whose deadline passed, operations whose owner died, failed test clean-ups:
`vmrep.recovery.policy.enforce`), then one pass over every VPG; every alert and status
transition recorded (by this pass or by anything else since the last) is emitted as a
Prefect event (resource `vmrep.vpg.<name>`, see tasks.monitoring), so a Prefect
automation can notify someone."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import flow_run_id
from tasks.monitoring import emit_recorded, run_pass
from tasks.recovery import PrefectRunner
from vmrep.recovery.policy import enforce


@flow(name="monitor")
def monitor(config: str = "vmrep.yaml", vpgs: list[str] | None = None) -> list[dict[str, Any]]:
    """Judge every VPG: RPO, journal history, tests, configuration; raise and clear alerts."""
    enforce(config, vpgs=vpgs, runner=PrefectRunner(), flow_run_id=flow_run_id())  # the one hook
    results = run_pass(config, vpgs)
    emit_recorded(config)
    return [{"vpg": r.vpg, "status": r.evaluation.status, "substatus": r.evaluation.substatus,
             "rpo_seconds": r.evaluation.rpo_seconds, "alerts": sorted(r.evaluation.codes),
             "transitions": len(r.transitions)} for r in results]
