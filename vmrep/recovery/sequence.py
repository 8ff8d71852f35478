"""How recovery steps run without Prefect, and the recovery sequence that tests and live
recoveries share (plan, disks, VMs, re-IP, scripts, boot groups, verify).

`DirectRunner` is `vmrep.runner.DirectRunner` over the recovery step table
(`vmrep.recovery.steps.STEPS`); the flows pass a runner that submits each step as a
Prefect task (`tasks/recovery.py`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from vmrep.config import VPG
from vmrep.recovery.steps import STEPS, get_plan
from vmrep.runner import DirectRunner as _StepRunner
from vmrep.runtime import Runtime


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
    if operation in ("failover", "move"):
        # before any guest runs: what reverse protection later need not read (steps.change_baseline)
        runner.each("change-baseline", calls())
    for i, g in enumerate(plan.groups):
        runner.each("power-on", calls(only=list(g["vms"])))  # source VM names, in boot order
        if g["delay_seconds"] and i < len(plan.groups) - 1:
            sleep(float(g["delay_seconds"]))
    if vpg.post_recovery_script is not None:
        runner.one("run-script", config, vpg.name, op, "post")
    results = runner.each("verify", calls(verify_timeout), settle=True)
    return dict(zip(names, results, strict=True))
