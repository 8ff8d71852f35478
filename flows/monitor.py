"""The monitor: one long-lived run making a pass every minute over every VPG. Each pass:
first what the control plane enforces (commit policies whose deadline passed, operations
whose owner died, failed test clean-ups: `vmrep.recovery.policy.enforce`), then the pass
over every VPG; every alert and status transition recorded (by this pass or by anything
else since the last) is emitted as a Prefect event (resource `vmrep.vpg.<name>`, see
tasks.monitoring), so a Prefect automation can notify someone.

Why one run of many passes rather than a run per pass: the pass keeps a PropertyCollector
filter per site between passes (vmrep.vsphere.watch) and takes only the changes, which
lasts only as long as the process and its vSphere sessions. A run per minute would pay a
process start, a login and a full inventory read every minute (34 s at 5,000 VMs). The
run's lifetime is bounded (`lifetime_seconds`, the deployment's schedule starts the next
one as it ends): a configuration change, a new release or a leaked resource is taken up
within one lifetime, and a crashed run is replaced at the next slot.

`lifetime_seconds` 0 (the default, as `vmrep monitor --once` and a UI run use it) is one pass.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows._common import flow_run_id
from tasks.monitoring import emit_recorded, run_pass
from tasks.recovery import PrefectRunner
from vmrep.recovery.policy import enforce


def _summary(results: Any) -> list[dict[str, Any]]:
    return [{"vpg": r.vpg, "status": r.evaluation.status, "substatus": r.evaluation.substatus,
             "rpo_seconds": r.evaluation.rpo_seconds, "alerts": sorted(r.evaluation.codes),
             "transitions": len(r.transitions)} for r in results]


@flow(name="monitor")
def monitor(config: str = "vmrep.yaml", vpgs: list[str] | None = None, lifetime_seconds: float = 0.0,
            interval_seconds: float = 60.0) -> list[dict[str, Any]]:
    """Judge every VPG: RPO, journal history, tests, configuration; raise and clear alerts.
    A pass every `interval_seconds` while the next one still starts within `lifetime_seconds`.
    Returns the last pass's summary."""
    start = time.monotonic()
    slot = 0
    while True:
        enforce(config, vpgs=vpgs, runner=PrefectRunner(), flow_run_id=flow_run_id())  # the one hook
        results = run_pass(config, vpgs)
        emit_recorded(config)
        # Passes start on a fixed grid (start + k * interval), so a slow pass does not push
        # every later one back; a pass that overran its slot skips to the next free one.
        slot = max(slot + 1, int((time.monotonic() - start) // interval_seconds) + 1)
        next_at = slot * interval_seconds
        if next_at > lifetime_seconds:
            return _summary(results)
        time.sleep(max(0.0, next_at - (time.monotonic() - start)))
