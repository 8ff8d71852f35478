"""The steps of replication's sequences (`engine.run_cycle`, `engine.initial_sync`): one
retry unit each, of plain values (config path, VPG name, …) so that a Prefect task can
wrap each one to one (`tasks/replication.py`) and `vmrep.runner.DirectRunner` can call
them without Prefect. Live objects (clients, the journal, the open checkpoint) come
from the process's Runtime.

Each step may run again after any failure: snapshots are reused or removed by name,
blocks already stored are not stored again, and the commit returns the checkpoint its
first try published (`engine.commit_checkpoint`); noting the checkpoint in the state
database only moves first/last checkpoint times, so it is safe to repeat.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any, Callable

from vmrep.replication import engine
from vmrep.runtime import get_runtime
from vmrep.vsphere.inventory import DiskInfo, VMInfo


def read_vpg_inventory(config: str, vpg: str) -> dict[str, VMInfo]:
    rt = get_runtime(config)
    return engine.vpg_vms(rt, rt.config.vpg(vpg))


def enable_change_tracking(config: str, vpg: str, vms: dict[str, VMInfo]) -> dict[str, bool]:
    rt = get_runtime(config)
    return engine.enable_change_tracking(rt, rt.config.vpg(vpg), vms)


def consistency_point(config: str, vpg: str, vms: dict[str, VMInfo]) -> datetime:
    rt = get_runtime(config)
    return engine.create_consistency_points(rt, rt.config.vpg(vpg), vms)


def release_consistency_points(config: str, vpg: str) -> int:
    rt = get_runtime(config)
    return engine.remove_consistency_points(rt, rt.config.vpg(vpg))


def transfer_vm(config: str, vpg: str, vm: VMInfo, previous: str | None, cycle: str | None = None) -> dict[str, Any]:
    rt = get_runtime(config)
    out = engine.transfer_vm(rt, rt.config.vpg(vpg), vm, engine.open_writer(rt, vpg, cycle), previous)
    return {"vm": vm.name, "bytes_read": out.bytes_read, "bytes_stored": out.bytes_stored,
            "blocks_changed": out.blocks_changed, "seconds": out.seconds,
            "disks": {d: asdict(s) for d, s in out.disks.items()}}


def transfer_disk(config: str, vpg: str, vm: VMInfo, disk: DiskInfo, previous: str | None,
                  preseed_path: str | None = None, cycle: str | None = None) -> dict[str, Any]:
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    seed = engine.preseed_source(rt, v, preseed_path, disk.capacity) if preseed_path else None
    snap, ids = engine.snapshot_ids(rt, v, vm)
    s = engine.transfer_disk(rt, v, vm, disk, engine.open_writer(rt, vpg, cycle), previous, preseed=seed,
                             snapshot=snap, new_ids=ids, prev_ids=engine.previous_change_ids(rt, vpg, previous))
    return {"vm": vm.name, "disk": disk.id, **asdict(s)}


def commit_checkpoint(config: str, vpg: str, cycle: str, at: datetime | None, tag: str | None,
                      meta: dict[str, Any]) -> dict[str, Any]:
    rt = get_runtime(config)
    cp = engine.commit_checkpoint(rt, vpg, cycle, at=at, tag=tag, meta=meta)
    rt.store.note_checkpoint(vpg, cp.time)
    # The new checkpoint's writes judged at once: ENCRYPTION_SUSPECTED raised (or cleared)
    # in the cycle that shows it, not at the next monitor pass. Safe to repeat.
    from vmrep.ransomware.service import refresh_alerts

    # Through a journal service the journal is not here (and its files are the recovery
    # site's to write): the recovery site's monitor pass judges the checkpoint instead.
    changes = [] if engine.is_remote(rt, vpg) else refresh_alerts(rt.store, rt.journal, vpg)
    return {"id": cp.id, "time": cp.time, "added_bytes": cp.added_bytes,
            "alerts_raised": [t.text for t in changes if t.kind == "raised"]}


def apply_retention(config: str, vpg: str) -> dict[str, Any]:
    rt = get_runtime(config)
    r = engine.apply_retention(rt, rt.config.vpg(vpg))
    return {k: v for k, v in getattr(r, "__dict__", {}).items() if isinstance(v, (int, float, bool, str))}


def verify_against_source(config: str, vpg: str, vms: dict[str, VMInfo], checkpoint_id: str) -> dict[str, Any]:
    rt = get_runtime(config)
    return engine.verify_against_source(rt, rt.config.vpg(vpg), vms, checkpoint_id)


def validate_vpg(config: str, vpg: str) -> None:
    """Every name of the VPG looked up at its sites; all problems in one error."""
    from vmrep.errors import VmrepError
    from vmrep.validate import validate

    problems = validate(get_runtime(config).config, [vpg])
    if problems:
        lines = [p.line() for p in problems]
        raise VmrepError("; ".join(lines), lines=lines)


STEPS: dict[str, Callable[..., Any]] = {
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
