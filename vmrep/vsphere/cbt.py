"""Changed block tracking (CBT): turning it on or off per VM, the change ids a snapshot
hands out, and `QueryChangedDiskAreas` followed through its pagination.

vSphere answers at most a bounded number of areas per call (the lab: `-cbt-max-areas`),
with `length` ending at the last area returned; a caller that stops after one answer
misses changes, so `changed_areas` always continues at `startOffset + length` until the
disk's capacity. An id the host no longer knows (tracking reset, disk resized, VM
reverted) is refused with a `FileFault`: `ChangeIdRefused`, which the engine answers with
a hash scan of that disk.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vim

from vmrep.errors import VSphereError
from vmrep.vsphere.connection import Client
from vmrep.vsphere.property import retrieve_one
from vmrep.vsphere import vm as vmops

ALL_ALLOCATED = "*"  # the change id that answers the areas ever written (allocated)


class ChangeIdRefused(VSphereError):
    """The host refused a change id (or has no tracking for the disk): the changed areas
    are unknown and the disk must be compared block by block."""


def tracking_enabled(client: Client, vm: Any) -> bool:
    """What the VM reports as `config.changeTrackingEnabled` now."""
    return bool(retrieve_one(client, vm, ["config.changeTrackingEnabled"]).get("config.changeTrackingEnabled"))


def set_tracking(client: Client, vm: Any, name: str, enabled: bool) -> bool:
    """Turn change tracking on or off (ReconfigVM_Task) and return what the VM reports
    afterwards: a VM (or host) that cannot track changes keeps reporting False, which the
    caller records as a per-disk fallback to the hash scan instead of failing the VPG."""
    if tracking_enabled(client, vm) == enabled:
        return enabled
    vmops.reconfigure(client, name, vm, vim.vm.ConfigSpec(changeTrackingEnabled=enabled),
                      f"change tracking {'on' if enabled else 'off'}")
    return tracking_enabled(client, vm)


def enable_tracking(client: Client, vm: Any, name: str) -> bool:
    return set_tracking(client, vm, name, True)


def disable_tracking(client: Client, vm: Any, name: str) -> bool:
    return not set_tracking(client, vm, name, False)


def snapshot_change_ids(client: Client, snapshot: Any) -> dict[int, str]:
    """Device key -> `backing.changeId` of each tracked disk, as frozen in the snapshot's
    own config (the VM's current devices move on with later snapshots)."""
    devices = retrieve_one(client, snapshot, ["config.hardware.device"]).get("config.hardware.device") or []
    out: dict[int, str] = {}
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualDisk):
            cid = getattr(d.backing, "changeId", None)
            if cid:
                out[int(d.key)] = str(cid)
    return out


def changed_areas(client: Client, vm: Any, name: str, snapshot: Any, device_key: int, change_id: str,
                  capacity: int) -> tuple[list[tuple[int, int]], int]:
    """Every (offset, length) written between `change_id` and `snapshot` on one disk
    (`ALL_ALLOCATED`: every allocated area), following the pagination to the capacity.
    Returns the areas and the number of calls made. Raises ChangeIdRefused on a FileFault."""
    what = f"VM {name} disk {device_key}: changed areas since {change_id}"
    out: list[tuple[int, int]] = []
    start, calls = 0, 0
    while start < capacity:
        try:
            info = client.call(what, vm.QueryChangedDiskAreas, snapshot=snapshot, deviceKey=device_key,
                               startOffset=start, changeId=change_id, method_name="QueryChangedDiskAreas")
        except VSphereError as exc:
            if exc.fault == "FileFault":
                raise ChangeIdRefused(str(exc), fault=exc.fault) from exc
            raise
        calls += 1
        out.extend((int(a.start), int(a.length)) for a in info.changedArea or [])
        nxt = int(info.startOffset) + int(info.length)
        if nxt <= start:  # a host answering no progress would loop forever
            raise VSphereError(f"{what}: answer does not advance past offset {start}")
        start = nxt
    return out, calls


BASELINE_SNAPSHOT = "vmrep-baseline"  # the short snapshot a baseline's change ids are read from


def baseline_change_ids(client: Client, vm: Any, name: str) -> tuple[dict[int, str], str | None]:
    """Turn tracking on and hand out a change id per disk now, for a VM whose disks are
    known to hold a checkpoint (a recovered VM before its first power-on): device key ->
    change id, and None; or ({}, why) when the VM cannot track changes.

    vSphere hands out change ids only at snapshots (and a powered-off VM's tracking takes
    effect at one), so a snapshot is taken for the ids and removed again at once; a
    leftover of a crashed try is removed first. The ids stay valid after the snapshot
    is gone, until tracking is reset (a later QueryChangedDiskAreas then refuses them)."""
    if not enable_tracking(client, vm, name):
        return {}, "the VM cannot track changes"
    tree = retrieve_one(client, vm, ["snapshot"]).get("snapshot")
    for old in vmops.find_snapshots(tree, BASELINE_SNAPSHOT):
        vmops.remove_snapshot(client, name, old, "remove a leftover change-tracking baseline snapshot")
    snap = vmops.create_snapshot(client, name, vm, BASELINE_SNAPSHOT, "change-tracking baseline snapshot",
                                 description="vmrep: change ids of the recovered disks (removed at once)")
    try:
        ids = snapshot_change_ids(client, snap)
    finally:
        vmops.remove_snapshot(client, name, snap, "remove the change-tracking baseline snapshot")
    return ids, None
