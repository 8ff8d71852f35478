"""Replication steps as Prefect tasks: each wraps one engine function, one retry unit.

Tasks take the config path and the VPG name (plain values the UI can show); the live
objects (clients, the journal, the open checkpoint) come from the process's Runtime.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task

from tasks.common import step_options
from vmrep.replication import engine
from vmrep.runtime import get_runtime
from vmrep.vsphere.inventory import DiskInfo, VMInfo


@task(name="read-vpg-inventory", **step_options())
def read_vpg_inventory(config: str, vpg: str) -> dict[str, VMInfo]:
    rt = get_runtime(config)
    return engine.vpg_vms(rt, rt.config.vpg(vpg))


@task(name="consistency-point", **step_options())
def consistency_point(config: str, vpg: str, vms: dict[str, VMInfo]) -> datetime:
    rt = get_runtime(config)
    return engine.create_consistency_points(rt, rt.config.vpg(vpg), vms)


@task(name="release-consistency-points", **step_options())
def release_consistency_points(config: str, vpg: str) -> int:
    rt = get_runtime(config)
    return engine.remove_consistency_points(rt, rt.config.vpg(vpg))


@task(name="transfer-vm", **step_options())
def transfer_vm(config: str, vpg: str, vm: VMInfo, previous: str | None) -> dict[str, Any]:
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    out = engine.transfer_vm(rt, v, vm, engine.open_writer(rt, vpg), previous)
    return {"vm": vm.name, "bytes_read": out.bytes_read, "bytes_stored": out.bytes_stored,
            "blocks_changed": out.blocks_changed,
            "seconds": sum(s.seconds for s in out.disks.values())}


@task(name="transfer-disk", **step_options())
def transfer_disk(config: str, vpg: str, vm: VMInfo, disk: DiskInfo, previous: str | None,
                  preseed_path: str | None = None) -> dict[str, Any]:
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    seed = engine.preseed_source(rt, v, preseed_path, disk.capacity) if preseed_path else None
    s = engine.transfer_disk(rt, v, vm, disk, engine.open_writer(rt, vpg), previous, preseed=seed)
    return {"vm": vm.name, "disk": disk.id, "bytes_read": s.bytes_read, "bytes_stored": s.bytes_stored,
            "blocks_changed": s.blocks_changed, "seconds": s.seconds}


@task(name="commit-checkpoint", **step_options(retries=1))
def commit_checkpoint(config: str, vpg: str, at: datetime, tag: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    rt = get_runtime(config)
    cp = engine.close_writer(rt, vpg, commit=True, at=at, tag=tag, meta=meta)
    rt.store.note_checkpoint(vpg, cp.time)
    return {"id": cp.id, "time": cp.time, "added_bytes": cp.added_bytes}


@task(name="apply-retention", **step_options())
def apply_retention(config: str, vpg: str) -> dict[str, Any]:
    rt = get_runtime(config)
    r = engine.apply_retention(rt, rt.config.vpg(vpg))
    return {k: v for k, v in getattr(r, "__dict__", {}).items() if isinstance(v, (int, float, bool, str))}
