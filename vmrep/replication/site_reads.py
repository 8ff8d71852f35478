"""Reading only a VPG's own VMs, for sites with many VMs (flows/replicate_site.py).

`engine.vpg_vms` and `points.remove_consistency_points` read every VM of the site
(`Inventory.vms()`: devices, snapshots, guest state of all of them) in one round trip,
whose reply grows with the site. At 1,000 VMs a site that is 4-9 s here, ~95 % of it
pyVmomi decoding XML in the flow run's process, and a cycle does it three times (the
inventory, the leftover snapshots, the release): 98 % of a 10-VM VPG's cycle in the
profile of bench/README.md ("Scale"), and O(VMs of the site) per cycle, O(N^2) per
round of a site's VPGs. Here a cycle reads only its VPG's VMs by their managed object
ids: the site's name -> id map is read once (names only, cheap) and again when a name
is missing, renamed or gone; the VMs themselves are read afresh every time, as before.

`STEPS` is `vmrep.replication.steps.STEPS` with the two reading steps replaced; the
coarse cycle task of replicate-site runs the engine's sequences with it, and so does
bench/bench_scale.py. The results are those of the steps they replace (same VMInfo,
same NotFound line for a missing VM, same snapshots removed).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from pyVmomi import vim

from vmrep.config import VPG
from vmrep.errors import NotFound
from vmrep.replication.points import snapshot_label
from vmrep.replication.steps import STEPS as BASE_STEPS
from vmrep.runtime import Runtime, get_runtime
from vmrep.vsphere import vm as vmops
from vmrep.vsphere.connection import Client
from vmrep.vsphere.inventory import VM_PATHS, Inventory, VMInfo
from vmrep.vsphere.property import retrieve, retrieve_types

# Per site client: VM name -> its managed object reference. Weak, so a client that is
# replaced (a new login) takes its map with it.
_ids: weakref.WeakKeyDictionary[Client, dict[str, Any]] = weakref.WeakKeyDictionary()
_ids_lock = threading.Lock()


def _id_map(client: Client, refresh: bool = False) -> dict[str, Any]:
    with _ids_lock:
        m = None if refresh else _ids.get(client)
    if m is None:
        m = {o.name: o.ref for o in retrieve(client, vim.VirtualMachine, ["name"])}
        with _ids_lock:
            _ids[client] = m
    return m


class _Named(Inventory):
    """An Inventory whose `vms()` are only the VMs given by reference (plus what decoding
    them needs: networks, port groups, custom field names: a handful of objects)."""

    def __init__(self, client: Client, refs: list[Any]) -> None:
        super().__init__(client)
        self._refs = refs

    def vms(self) -> list[VMInfo]:
        if self._vms is None:
            cfm = self.client.content.customFieldsManager
            extra = [(cfm, vim.CustomFieldsManager, ["field"])] if cfm is not None else []
            for o in retrieve_types(self.client, {vim.Network: ["name"],
                                                  vim.dvs.DistributedVirtualPortgroup: ["name", "key"]}, extra):
                if isinstance(o.ref, vim.CustomFieldsManager):
                    self.fields = {f.key: f.name for f in (o.get("field") or [])}
                elif isinstance(o.ref, vim.dvs.DistributedVirtualPortgroup):
                    self.portgroups[o.get("key")] = o.name
                    self.networks[o.ref._moId] = o.name
                else:
                    self.networks[o.ref._moId] = o.name
            objs = retrieve(self.client, vim.VirtualMachine, VM_PATHS, objects=self._refs) if self._refs else []
            self._vms = [self._vm(o) for o in objs]
        return self._vms


def _read(client: Client, names: list[str], refresh: bool) -> dict[str, VMInfo] | None:
    """The named VMs found, or None when the map is stale (a name missing, an id gone or
    naming another VM): then read the map again."""
    ids = _id_map(client, refresh)
    refs = [ids[n] for n in names if n in ids]
    try:
        found = {v.name: v for v in _Named(client, refs).vms()}
    except Exception:  # noqa: BLE001 - an id that is gone (its VM removed or re-created)
        if refresh:
            raise
        return None
    if not refresh and (len(refs) < len(names) or any(n not in found for n in names if n in ids)):
        return None
    return found


def named_vms(rt: Runtime, vpg: VPG, *, missing_ok: bool = False) -> dict[str, VMInfo]:
    """The VPG's VMs at the protected site, read afresh; NotFound names a missing VM
    (as `engine.vpg_vms`), unless `missing_ok`."""
    client = rt.client(vpg.protected_site)
    names = [vm.name for vm in vpg.vms]
    found = _read(client, names, refresh=False)
    if found is None:
        found = _read(client, names, refresh=True) or {}
    missing = [n for n in names if n not in found]
    if missing and not missing_ok:
        raise NotFound(f"VPG {vpg.name}: VM {', '.join(missing)} not found at protected site {vpg.protected_site}")
    return {n: found[n] for n in names if n in found}


def read_vpg_inventory(config: str, vpg: str) -> dict[str, VMInfo]:
    rt = get_runtime(config)
    return named_vms(rt, rt.config.vpg(vpg))


def release_consistency_points(config: str, vpg: str) -> int:
    """`points.remove_consistency_points` over the VPG's VMs only: every snapshot named by
    vmrep for this VPG removed, one by one (the user's own stay)."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    label = snapshot_label(v.name)
    client = rt.client(v.protected_site)
    removed = 0
    for name, vm in named_vms(rt, v, missing_ok=True).items():
        for snap_name, ref in vm.snapshots:
            if snap_name == label:
                vmops.remove_snapshot(client, name, ref, "remove consistency point")
                removed += 1
    return removed


STEPS: dict[str, Any] = {**BASE_STEPS, "read-vpg-inventory": read_vpg_inventory,
                         "release-consistency-points": release_consistency_points}
