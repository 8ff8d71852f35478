"""Replication steps as Prefect tasks: each wraps one step of `vmrep.replication.steps`
one to one (one retry unit), retried on transient faults only. `PrefectRunner` lets the
engine's sequences (`engine.run_cycle`, `engine.initial_sync`) submit them.

Tasks take the config path and the VPG name (plain values the UI can show); the live
objects (clients, the journal, the open checkpoint) come from the process's Runtime, so
a cycle's tasks run in its flow run's process (see `engine._writers`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task

from tasks.common import PrefectStepRunner, step_options, vcenter_slot
from vmrep.replication import steps as s
from vmrep.runtime import get_runtime
from vmrep.vsphere.inventory import DiskInfo, VMInfo


def _protected_site(config: str, vpg: str) -> str:
    return get_runtime(config).config.vpg(vpg).protected_site


@task(name="read-vpg-inventory", **step_options())
def read_vpg_inventory(config: str, vpg: str) -> dict[str, VMInfo]:
    return s.read_vpg_inventory(config, vpg)


@task(name="enable-change-tracking", **step_options())
def enable_change_tracking(config: str, vpg: str, vms: dict[str, VMInfo]) -> dict[str, bool]:
    return s.enable_change_tracking(config, vpg, vms)


@task(name="consistency-point", **step_options())
def consistency_point(config: str, vpg: str, vms: dict[str, VMInfo]) -> datetime:
    # Snapshots are created at the protected site: one slot of its vCenter's limit.
    with vcenter_slot(_protected_site(config, vpg)):
        return s.consistency_point(config, vpg, vms)


@task(name="release-consistency-points", **step_options())
def release_consistency_points(config: str, vpg: str) -> int:
    with vcenter_slot(_protected_site(config, vpg)):
        return s.release_consistency_points(config, vpg)


@task(name="transfer-vm", **step_options())
def transfer_vm(config: str, vpg: str, vm: VMInfo, previous: str | None, cycle: str | None = None) -> dict[str, Any]:
    return s.transfer_vm(config, vpg, vm, previous, cycle)


@task(name="transfer-disk", **step_options())
def transfer_disk(config: str, vpg: str, vm: VMInfo, disk: DiskInfo, previous: str | None,
                  preseed_path: str | None = None, cycle: str | None = None) -> dict[str, Any]:
    return s.transfer_disk(config, vpg, vm, disk, previous, preseed_path, cycle)


@task(name="commit-checkpoint", **step_options(retries=1))
def commit_checkpoint(config: str, vpg: str, cycle: str, at: datetime | None, tag: str | None,
                      meta: dict[str, Any]) -> dict[str, Any]:
    return s.commit_checkpoint(config, vpg, cycle, at, tag, meta)


@task(name="apply-retention", **step_options())
def apply_retention(config: str, vpg: str) -> dict[str, Any]:
    return s.apply_retention(config, vpg)


@task(name="validate-vpg", **step_options())
def validate_vpg(config: str, vpg: str) -> None:
    s.validate_vpg(config, vpg)


@task(name="verify-against-source", **step_options())
def verify_against_source(config: str, vpg: str, vms: dict[str, VMInfo], checkpoint_id: str) -> dict[str, Any]:
    return s.verify_against_source(config, vpg, vms, checkpoint_id)


def _site_steps() -> dict[str, Any]:
    """The replication steps for the direct runner of a coarse cycle task, with the
    snapshot steps still taking a slot of the site's vCenter limit, as their tasks do."""
    from vmrep.replication.steps import STEPS

    def held(name: str) -> Any:
        fn = STEPS[name]

        def step(config: str, vpg: str, *args: Any) -> Any:
            with vcenter_slot(_protected_site(config, vpg)):
                return fn(config, vpg, *args)
        return step

    return {**STEPS, **{n: held(n) for n in ("consistency-point", "release-consistency-points")}}


@task(name="vpg-cycle", task_run_name="vpg-cycle-{vpg}", **step_options())
def vpg_cycle(config: str, vpg: str, retention: bool = True) -> dict[str, Any]:
    """One whole replication cycle of a VPG as one task run (flows/replicate_site.py): its
    steps run through the engine's direct runner in this thread, each retried on
    transient faults there; the task as a whole is retried like any step. A VPG that
    may not replicate (paused, no initial sync, a locked journal) fails here with its line."""
    from vmrep.replication import engine
    from vmrep.runner import DirectRunner

    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    try:
        engine.ensure_replicable(rt, v, retention=retention)
        return engine.run_cycle(rt, v, runner=DirectRunner(_site_steps()), retention=retention).summary()
    except Exception as exc:
        # the one line a DR engineer reads in this task's log; Prefect adds the trace below it
        get_run_logger().error("VPG %s: cycle failed: %s", vpg, str(exc).splitlines()[0] if str(exc) else
                               type(exc).__name__)
        raise


TASKS = {
    "read-vpg-inventory": read_vpg_inventory,
    "enable-change-tracking": enable_change_tracking,
    "consistency-point": consistency_point,
    "release-consistency-points": release_consistency_points,
    "transfer-vm": transfer_vm,
    "transfer-disk": transfer_disk,
    "commit-checkpoint": commit_checkpoint,
    "apply-retention": apply_retention,
    "validate-vpg": validate_vpg,
    "verify-against-source": verify_against_source,
}
assert set(TASKS) == set(s.STEPS), set(TASKS) ^ set(s.STEPS)


class PrefectRunner(PrefectStepRunner):
    """Replication steps as task runs of the current flow."""

    def __init__(self) -> None:
        super().__init__(TASKS)
