"""Recovery steps as Prefect tasks: each wraps one step of `vmrep.recovery.steps` (one
retry unit; one task run per VM where the step is per VM), retried on transient faults
only. `PrefectRunner` lets the engine's operation sequences submit them.

No Prefect task timeout: a task runs in a worker thread that Prefect cannot interrupt
(it would only warn on every run); the engine bounds its own waits instead (vSphere
calls and /folder requests by the site's timeout, guest verification by
`verify_timeout`, source shutdown by `shutdown_timeout`, scripts by their timeout)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.common import PrefectStepRunner, step_options
from vmrep.recovery import steps as s


@task(name="cleanup-leftovers", **step_options(timeout=None))
def cleanup_leftovers(config: str, vpg: str, op_id: str) -> dict[str, Any]:
    return s.cleanup_leftovers(config, vpg, op_id)


@task(name="plan", **step_options(timeout=None))
def plan(config: str, vpg: str, op_id: str, operation: str, checkpoint_id: str) -> dict[str, Any]:
    return s.make_plan(config, vpg, op_id, operation, checkpoint_id)


@task(name="write-disks", task_run_name="write-disks {vm}", **step_options(timeout=None))
def write_disks(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    return s.write_disks(config, vpg, op_id, vm)


@task(name="create-vm", task_run_name="create-vm {vm}", **step_options(timeout=None))
def create_vm(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    return s.create_vm(config, vpg, op_id, vm)


@task(name="customize", task_run_name="customize {vm}", **step_options(timeout=None))
def customize(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    return s.customize_vm(config, vpg, op_id, vm)


@task(name="run-script", task_run_name="{phase}-recovery-script", **step_options(retries=0, timeout=None))
def run_script(config: str, vpg: str, op_id: str, phase: str) -> dict[str, Any]:
    return s.run_recovery_script(config, vpg, op_id, phase)


@task(name="change-baseline", task_run_name="change-baseline {vm}", **step_options(timeout=None))
def change_baseline(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    return s.change_baseline(config, vpg, op_id, vm)


@task(name="power-on", task_run_name="power-on {vm}", **step_options(timeout=None))
def power_on(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    return s.power_on(config, vpg, op_id, vm)


@task(name="verify", task_run_name="verify {vm}", **step_options(timeout=None))
def verify(config: str, vpg: str, op_id: str, vm: str, timeout: float = 600.0) -> dict[str, Any]:
    return s.verify_vm(config, vpg, op_id, vm, timeout)


@task(name="remove-vm", task_run_name="remove-vm {vm}", **step_options(timeout=None))
def remove_vm(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    return s.remove_vm(config, vpg, op_id, vm, of_operation)


@task(name="remove-disks", **step_options(timeout=None))
def remove_disks(config: str, vpg: str, op_id: str, of_operation: str) -> dict[str, Any]:
    return s.remove_disks(config, vpg, op_id, of_operation)


@task(name="shutdown-source", task_run_name="shutdown-source {vm}", **step_options(timeout=None))
def shutdown_source(config: str, vpg: str, op_id: str, vm: str, policy: str, timeout: float = 300.0) -> dict[str, Any]:
    return s.shutdown_source(config, vpg, op_id, vm, policy, timeout)


@task(name="power-on-source", task_run_name="power-on-source {vm}", **step_options(timeout=None))
def power_on_source(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    return s.power_on_source(config, vpg, op_id, vm, of_operation)


@task(name="final-checkpoint", **step_options(timeout=None))
def final_checkpoint(config: str, vpg: str, op_id: str, tag: str) -> dict[str, Any]:
    return s.final_checkpoint(config, vpg, op_id, tag)


@task(name="pause-replication", **step_options(timeout=None))
def pause_replication(config: str, vpg: str, op_id: str, paused: bool) -> dict[str, Any]:
    return s.set_replication_paused(config, vpg, op_id, paused)


@task(name="mark-committed", task_run_name="mark-committed {vm}", **step_options(timeout=None))
def mark_committed(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    return s.mark_committed(config, vpg, op_id, vm, of_operation)


@task(name="remove-source-vm", task_run_name="remove-source-vm {vm}", **step_options(timeout=None))
def remove_source_vm(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    return s.remove_source_vm(config, vpg, op_id, vm, of_operation)


@task(name="reverse-sync", task_run_name="reverse-sync {vm}", **step_options(timeout=None))
def reverse_sync(config: str, target: str, op_id: str, vm: str, preseed: dict[str, str],
                 baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    return s.reverse_sync_vm(config, target, op_id, vm, preseed, baselines)


@task(name="reverse-checkpoint", **step_options(retries=1, timeout=None))
def reverse_checkpoint(config: str, target: str, op_id: str, reverse_of: str,
                       meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return s.reverse_checkpoint(config, target, op_id, reverse_of, meta)


TASKS = {
    "cleanup-leftovers": cleanup_leftovers,
    "plan": plan,
    "write-disks": write_disks,
    "create-vm": create_vm,
    "customize": customize,
    "run-script": run_script,
    "change-baseline": change_baseline,
    "power-on": power_on,
    "verify": verify,
    "remove-vm": remove_vm,
    "remove-disks": remove_disks,
    "shutdown-source": shutdown_source,
    "power-on-source": power_on_source,
    "final-checkpoint": final_checkpoint,
    "pause-replication": pause_replication,
    "mark-committed": mark_committed,
    "remove-source-vm": remove_source_vm,
    "reverse-sync": reverse_sync,
    "reverse-checkpoint": reverse_checkpoint,
}
assert set(TASKS) == set(s.STEPS), set(TASKS) ^ set(s.STEPS)


class PrefectRunner(PrefectStepRunner):
    """Recovery steps as task runs of the current flow (the interface of
    `vmrep.recovery.sequence.DirectRunner`)."""

    def __init__(self) -> None:
        super().__init__(TASKS)
