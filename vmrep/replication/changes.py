"""Which blocks a transfer reads: changed block tracking where it can be trusted, the
hash scan against the previous checkpoint's block map where it cannot (each fallback
named, and shown as the DeltaSync sub-status while it runs).
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Any

import numpy as np

from vmrep.config import VPG
from vmrep.replication.endpoints import journal_for
from vmrep.replication.points import find_snapshot
from vmrep.runtime import Runtime
from vmrep.status import Status, Substatus
from vmrep.vsphere import cbt
from vmrep.vsphere.inventory import DiskInfo, VMInfo

log = logging.getLogger(__name__)


def previous_map(rt: Runtime, vpg: str, previous: str | None, vm: str, disk: DiskInfo) -> Any:
    if previous is None:
        return None
    j = journal_for(rt, vpg)
    disks = j.disks(vpg, previous)
    if disks.get((vm, disk.id)) != disk.capacity:
        return None  # new or resized disk: full scan (dedup still avoids storing known blocks)
    return j.block_map(vpg, previous, vm, disk.id)


def enable_change_tracking(rt: Runtime, vpg: VPG, vms: dict[str, VMInfo]) -> dict[str, bool]:
    """At initial sync, per the VPG's `change_tracking`: `enable` turns tracking on
    (ReconfigVM_Task) on every VM, `use-if-present` and `off` leave the VMs as they are.
    Returns VM -> tracking on now; a VM that cannot track is logged, and its disks go by
    hash scan (recorded per disk in each checkpoint)."""
    client = rt.client(vpg.protected_site)
    out: dict[str, bool] = {}
    for name, vm in vms.items():
        if vpg.change_tracking == "enable":
            out[name] = cbt.enable_tracking(client, vm.ref, name)
            if not out[name]:
                log.warning("VPG %s: VM %s cannot have change tracking; its disks are replicated by hash scan",
                            vpg.name, name)
        else:
            out[name] = cbt.tracking_enabled(client, vm.ref)
    return out


def previous_change_ids(rt: Runtime, vpg: str, previous: str | None) -> dict[tuple[str, str], str | None]:
    """(vm, disk) -> change id the previous checkpoint recorded (absent in checkpoints
    written before change tracking: the reader rule of docs/journal-format.md)."""
    if previous is None:
        return {}
    meta = journal_for(rt, vpg).checkpoint(vpg, previous).meta
    return {(d["vm"], d["disk"]): d.get("change_id") for d in meta.get("disks") or []
            if isinstance(d, dict) and "vm" in d and "disk" in d}


@dataclass
class DiskPlan:
    """How one disk's changed blocks are found this time, and why."""

    method: str  # cbt | scan | full
    ranges: list[tuple[int, int]] | None  # areas to read; None: every block
    previous: Any  # the previous checkpoint's block map (None: no comparison)
    change_id: str | None  # the disk's id at this snapshot, kept for the next cycle
    fallback: str | None = None  # why not CBT (None: CBT, or an initial copy)
    bytes_changed: int | None = None  # the CBT areas' length


def plan_disk(rt: Runtime, vpg: VPG, vm: VMInfo, disk: DiskInfo, previous: str | None,
              snapshot: Any | None, new_ids: dict[int, str], prev_ids: dict[tuple[str, str], str | None],
              *, preseeded: bool = False) -> DiskPlan:
    """CBT where it can be trusted, else the hash scan, per disk.

    CBT: the areas written since the previous checkpoint's change id, at this snapshot.
    Fallbacks: tracking off (VPG setting, or the VM cannot track), no id in the previous
    checkpoint, the id refused (tracking reset: FileFault), disk new or resized (full
    scan: the old map does not describe it). A first copy reads only the allocated areas
    (changeId "*"), except over a pre-seed, whose blocks elsewhere must be overwritten."""
    new_id = new_ids.get(disk.key) if vpg.change_tracking != "off" else None
    client = rt.client(vpg.protected_site)
    prev_map = previous_map(rt, vpg.name, previous, vm.name, disk)
    if prev_map is None:
        if previous is None and new_id and snapshot is not None and not preseeded:
            areas, _ = cbt.changed_areas(client, vm.ref, vm.name, snapshot, disk.key, cbt.ALL_ALLOCATED,
                                         disk.capacity)
            return DiskPlan("full", areas, None, new_id, None, sum(n for _, n in areas))
        why = None if previous is None else "disk new or resized since the previous checkpoint"
        return DiskPlan("full", None, None, new_id, why)
    prev_id = prev_ids.get((vm.name, disk.id))
    if (vm.name, disk.id) in source_mismatch_disks(rt, vpg.name):
        why = "the last verification against the source found this disk differed"
    elif vpg.change_tracking == "off":
        why = "change tracking is off for this VPG"
    elif new_id is None:
        why = "the VM does not track changes"
    elif not prev_id:
        why = "the previous checkpoint has no change id for this disk"
    else:
        try:
            areas, _ = cbt.changed_areas(client, vm.ref, vm.name, snapshot, disk.key, prev_id, disk.capacity)
        except cbt.ChangeIdRefused as exc:
            why = f"change id {prev_id} refused ({exc})"
        else:
            return DiskPlan("cbt", areas, prev_map, new_id, None, sum(n for _, n in areas))
    return DiskPlan("scan", None, prev_map, new_id, why)


def snapshot_ids(rt: Runtime, vpg: VPG, vm: VMInfo) -> tuple[Any | None, dict[int, str]]:
    """The VM's replication snapshot and its disks' change ids (none when off)."""
    if vpg.change_tracking == "off":
        return None, {}
    snap = find_snapshot(rt, vpg, vm)
    if snap is None:
        return None, {}
    return snap, cbt.snapshot_change_ids(rt.client(vpg.protected_site), snap)


# The DeltaSync sub-status: set while a cycle compares whole disks (a CBT fallback),
# cleared when a cycle ends. `vmrep.health.Facts.from_runtime` reads it back, so the
# monitor shows DeltaSync exactly while a fallback runs (or until the next cycle ends
# after one that broke off).
_SLA_STATUSES = (Status.MEETING_SLA, Status.RPO_NOT_MEETING_SLA, Status.HISTORY_NOT_MEETING_SLA,
                 Status.NOT_MEETING_SLA)


def mark_delta_sync(rt: Runtime, vpg: str, detail: str) -> None:
    row = rt.store.runtime(vpg)
    if row.status in _SLA_STATUSES and row.substatus != Substatus.DELTA_SYNC:
        rt.store.set_status(vpg, row.status, Substatus.DELTA_SYNC, detail=detail)


def clear_delta_sync(rt: Runtime, vpg: str) -> None:
    row = rt.store.runtime(vpg)
    if row.status in _SLA_STATUSES and row.substatus == Substatus.DELTA_SYNC:
        rt.store.set_status(vpg, row.status, None, detail="delta sync done: changes found by CBT again")


SOURCE_MISMATCH = "SOURCE_MISMATCH"  # alert: a disk's checkpoint differs from its source


def source_mismatch_disks(rt: Runtime, vpg: str) -> dict[tuple[str, str], int]:
    """(vm, disk) -> alert id of each open SOURCE_MISMATCH: those disks are hash-scanned
    by the next cycle whatever CBT says (CBT lost changes there)."""
    return {(a.vm, str((a.data or {}).get("subject"))): a.id for a in rt.store.open_alerts(vpg)
            if a.code == SOURCE_MISMATCH and a.vm}


def baseline_plan(rt: Runtime, vpg: VPG, vm: VMInfo, disk: DiskInfo, snapshot: Any | None, new_id: str | None,
                  baseline: dict[str, Any] | None, seed_map: Any) -> tuple[DiskPlan, dict[str, Any]]:
    """The reverse VPG's initial sync of one recovered disk, from the failover's baseline
    (docs/recovery.md, "Reverse protection reads less than a full copy").

    `baseline`: {vpg, checkpoint C, change_id, key} recorded before the recovered VM first
    powered on, when its disk held C exactly. A block the guest has not written since
    (QueryChangedDiskAreas from that change id, at this sync's snapshot) still holds C's
    block, whose id C's block map in the original journal has; where that id equals the
    pre-seed's (`seed_map`, the original disk hashed where it lies) the block is known
    without reading it. Only the other blocks are read: those changed since the baseline,
    and those where C differs from the pre-seed (the source's writes after C that were
    never replicated). Anything unknown: every block is read (DiskPlan "full", its
    fallback saying why). Returns the plan and what the checkpoint records about it."""
    from vmrep.replication.blocks import ranges_to_blocks

    why: str | None = None
    c_map = None
    if seed_map is None:
        why = "no pre-seed of this disk at the original site"
    elif not baseline or not baseline.get("change_id"):
        why = (baseline or {}).get("fallback") or "no change-tracking baseline recorded for this disk at the failover"
    elif baseline.get("key") != disk.key:
        why = f"device key {disk.key} is not the baseline's ({baseline.get('key')})"
    elif snapshot is None or new_id is None:
        why = "change tracking is off on this disk"
    else:
        j = journal_for(rt, baseline["vpg"])
        src_vm = baseline.get("vm") or vm.name  # the VM's name in the original VPG's journal
        try:
            size = j.disks(baseline["vpg"], baseline["checkpoint"]).get((src_vm, disk.id))
        except Exception as exc:  # noqa: BLE001 - any journal failure only costs the full read
            size, why = None, f"checkpoint {baseline['checkpoint']} not readable ({exc})"
        if why is None and size != disk.capacity:
            why = f"checkpoint {baseline['checkpoint']} has no disk of this size"
        if why is None:
            c_map = j.block_map(baseline["vpg"], baseline["checkpoint"], src_vm, disk.id)
    if why is not None or baseline is None or c_map is None:
        return DiskPlan("full", None, seed_map, new_id, why), {}
    try:
        areas, _ = cbt.changed_areas(rt.client(vpg.protected_site), vm.ref, vm.name, snapshot, disk.key,
                                     baseline["change_id"], disk.capacity)
    except cbt.ChangeIdRefused as exc:
        why = f"baseline change id {baseline['change_id']} refused ({exc})"
        return DiskPlan("full", None, seed_map, new_id, why), {}
    bs = seed_map.block_size
    nblocks = -(-disk.capacity // bs)
    written = set(b for b in ranges_to_blocks(areas, bs) if b < nblocks)
    a, b = c_map.array, seed_map.array
    n = min(len(a), len(b))
    unlike = set(int(i) for i in np.flatnonzero((a[:n] != b[:n]).any(axis=1)))
    unlike |= set(range(n, max(len(a), len(b))))  # beyond one map's end: a zero against a block
    blocks = sorted(written | unlike)
    note = {"checkpoint": baseline["checkpoint"], "change_id": baseline["change_id"],
            "blocks_written_since": len(written), "blocks_unlike_preseed": len(unlike - written),
            "blocks_read": len(blocks)}
    ranges = [(i * bs, bs) for i in blocks]
    return DiskPlan("cbt", ranges, seed_map, new_id, None, None), note
