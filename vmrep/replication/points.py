"""Consistency points: the replication snapshots of a VPG's VMs.

One crash-consistent snapshot per VM (no memory, no quiescing), all VMs of the VPG at
once; named `vmrep-cp-<vpg>` so that only vmrep's own snapshots are ever removed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from vmrep.config import VPG
from vmrep.errors import NotFound
from vmrep.runtime import Runtime
from vmrep.stamps import utcnow
from vmrep.vsphere import vm as vmops
from vmrep.vsphere.inventory import VMInfo, named_vms
from vmrep.vsphere.property import retrieve_one


SNAPSHOT_PREFIX = "vmrep-cp"


def snapshot_label(vpg: str) -> str:
    return f"{SNAPSHOT_PREFIX}-{vpg}"


def create_consistency_point(rt: Runtime, vpg: VPG, vm: VMInfo) -> datetime:
    """Snapshot one VM (crash-consistent: no memory, no quiescing). Idempotent per cycle:
    an existing replication snapshot is reused by a retried step."""
    label = snapshot_label(vpg.name)
    if any(name == label for name, _ in vm.snapshots):
        return utcnow()
    client = rt.client(vpg.protected_site)
    at = utcnow()
    vmops.create_snapshot(client, vm.name, vm.ref, label, "consistency point",
                          description="vmrep replication consistency point")
    return at


def create_consistency_points(rt: Runtime, vpg: VPG, vms: dict[str, VMInfo]) -> datetime:
    """All VMs of the VPG at once; the checkpoint's time is when the first snapshot was asked for."""
    at = utcnow()
    with ThreadPoolExecutor(max_workers=min(8, len(vms))) as pool:
        list(pool.map(lambda v: create_consistency_point(rt, vpg, v), vms.values()))
    return at


def remove_consistency_points(rt: Runtime, vpg: VPG, vms: dict[str, VMInfo] | None = None) -> int:
    """Remove every replication snapshot of the VPG's VMs (also those a crashed cycle left).

    Reads the snapshot trees of those VMs afresh; only snapshots named by vmrep are touched, one by
    one (RemoveAllSnapshots would take the user's own snapshots with it)."""
    label = snapshot_label(vpg.name)
    names = [vm.name for vm in vpg.vms] if vms is None else list(vms)
    client = rt.client(vpg.protected_site)
    found = named_vms(client, names)
    removed = 0
    for name in names:
        vm = found.get(name)
        if vm is None:
            continue
        for snap_name, ref in vm.snapshots:
            if snap_name == label:
                try:
                    vmops.remove_snapshot(client, name, ref, "remove consistency point")
                except NotFound:
                    continue  # removed meanwhile (the monitor's leftover pass, a retried step): gone is what we want
                removed += 1
    return removed


def find_snapshot(rt: Runtime, vpg: VPG, vm: VMInfo) -> Any | None:
    """This cycle's replication snapshot of `vm` (read afresh: the step runs after the
    consistency point, with the inventory read before it)."""
    tree = retrieve_one(rt.client(vpg.protected_site), vm.ref, ["snapshot"]).get("snapshot")
    found = vmops.find_snapshots(tree, snapshot_label(vpg.name))
    return found[0] if found else None
