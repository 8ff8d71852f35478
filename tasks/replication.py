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

from prefect import task

from tasks.common import PrefectStepRunner, step_options
from vmrep.replication import steps as s
from vmrep.vsphere.inventory import DiskInfo, VMInfo


@task(name="read-vpg-inventory", **step_options())
def read_vpg_inventory(config: str, vpg: str) -> dict[str, VMInfo]:
    return s.read_vpg_inventory(config, vpg)


@task(name="enable-change-tracking", **step_options())
def enable_change_tracking(config: str, vpg: str, vms: dict[str, VMInfo]) -> dict[str, bool]:
    return s.enable_change_tracking(config, vpg, vms)


@task(name="consistency-point", **step_options())
def consistency_point(config: str, vpg: str, vms: dict[str, VMInfo]) -> datetime:
    return s.consistency_point(config, vpg, vms)


@task(name="release-consistency-points", **step_options())
def release_consistency_points(config: str, vpg: str) -> int:
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
