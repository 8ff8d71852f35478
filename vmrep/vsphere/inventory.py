"""What a site holds, read in bulk: VMs with their disks and NICs, hosts, datastores,
networks, folders. A constant number of PropertyCollector round trips whatever the
number of VMs (one per object type).

`named_vms` reads only some VMs, by name, for the replication cycle: the whole-site
read's reply grows with the site (at 1,000 VMs 4-9 s here, ~95 % of it pyVmomi decoding
XML), and a cycle reads its VPG's VMs three times (inventory, leftover snapshots,
release). The site's name -> managed object id map is read once per client (names only,
cheap) and again when a name is missing, renamed or gone; the VMs themselves are read
afresh every time.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

from pyVmomi import vim

from vmrep.errors import NotFound
from vmrep.vsphere.connection import Client
from vmrep.vsphere.datastore import flat_path, parse_ds_path
from vmrep.vsphere import vm as vmops
from vmrep.vsphere.property import Obj, retrieve, retrieve_types

VM_PATHS = (
    "name",
    "config.instanceUuid",
    "config.hardware.device",
    "config.annotation",
    "config.extraConfig",
    "customValue",
    "runtime.powerState",
    "runtime.host",
    "guest.toolsRunningStatus",
    "guest.ipAddress",
    "guest.net",
    "guestHeartbeatStatus",
    "resourcePool",
    "parent",
    "snapshot",
)


@dataclass
class DiskInfo:
    key: int
    label: str
    controller_key: int
    bus: int | None
    unit: int | None
    capacity: int
    file: str  # descriptor path '[ds] vm/disk.vmdk'
    rdm: bool = False
    multi_writer: bool = False
    shared_bus: bool = False

    @property
    def id(self) -> str:
        """Stable name of the disk within its VM: the controller slot, as 'scsi0:1'."""
        return f"scsi{self.bus}:{self.unit}" if self.bus is not None else f"disk{self.key}"

    @property
    def datastore(self) -> str:
        return parse_ds_path(self.file)[0]

    @property
    def flat(self) -> str:
        return flat_path(self.file)


@dataclass
class NicInfo:
    key: int
    label: str
    network: str | None
    mac: str | None


@dataclass
class VMInfo:
    ref: Any
    name: str
    uuid: str | None
    power_state: str
    host: Any
    disks: list[DiskInfo]
    nics: list[NicInfo]
    notes: str
    custom: dict[str, str]
    extra: dict[str, str]
    tools: str | None
    ip: str | None
    heartbeat: str | None
    has_snapshot: bool
    resource_pool: Any = None
    folder: Any = None
    snapshots: list[tuple[str, Any]] = field(default_factory=list)


def _network_name(backing: Any, networks: dict[str, str], portgroups: dict[str, str]) -> str | None:
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
        if backing.network is not None:
            return networks.get(backing.network._moId, backing.deviceName)
        return backing.deviceName
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        key = backing.port.portgroupKey if backing.port else None
        return portgroups.get(key or "", key)
    return None


def parse_devices(devices: Iterable[Any], networks: dict[str, str] | None = None,
                  portgroups: dict[str, str] | None = None) -> tuple[list[DiskInfo], list[NicInfo]]:
    """Disks and NICs from `config.hardware.device` (also usable on device lists built locally)."""
    devices = list(devices or [])
    controllers = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    disks: list[DiskInfo] = []
    nics: list[NicInfo] = []
    for d in devices:
        label = d.deviceInfo.label if d.deviceInfo else str(d.key)
        if isinstance(d, vim.vm.device.VirtualDisk):
            ctrl = controllers.get(d.controllerKey) if d.controllerKey is not None else None
            backing = d.backing
            rdm = isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo)
            sharing = getattr(backing, "sharing", None)
            shared_bus = isinstance(ctrl, vim.vm.device.VirtualSCSIController) and \
                ctrl.sharedBus not in (None, "noSharing")
            capacity = d.capacityInBytes or (d.capacityInKB or 0) * 1024
            disks.append(DiskInfo(
                # a VirtualDisk always sits on a controller; the stubs make the key Optional
                key=d.key, label=label, controller_key=d.controllerKey,  # type: ignore[arg-type]
                bus=ctrl.busNumber if ctrl is not None else None, unit=d.unitNumber,
                capacity=int(capacity), file=getattr(backing, "fileName", "") or "",
                rdm=rdm, multi_writer=sharing == "sharingMultiWriter", shared_bus=shared_bus,
            ))
        elif isinstance(d, vim.vm.device.VirtualEthernetCard):
            nics.append(NicInfo(key=d.key, label=label,
                                network=_network_name(d.backing, networks or {}, portgroups or {}),
                                mac=d.macAddress))
    disks.sort(key=lambda x: (x.bus if x.bus is not None else 99, x.unit or 0, x.key))
    nics.sort(key=lambda n: n.key)
    return disks, nics


class Inventory:
    """A snapshot of one site's inventory, read with one round trip per object type."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.networks: dict[str, str] = {}
        self.portgroups: dict[str, str] = {}
        self.fields: dict[int, str] = {}
        self._vms: list[VMInfo] | None = None
        self._hosts: list[Obj] | None = None
        self._datastores: list[Obj] | None = None
        self._folders: list[Obj] | None = None
        self._pools: list[Obj] | None = None
        self._clusters: list[Obj] | None = None
        self._datacenters: list[Obj] | None = None

    # -- VMs --------------------------------------------------------------------------

    def vms(self) -> list[VMInfo]:
        """Every VM with its devices, guest state and custom values, together with the
        networks and custom field names needed to read them: one round trip."""
        if self._vms is None:
            cfm = self.client.content.customFieldsManager
            extra = [(cfm, vim.CustomFieldsManager, ["field"])] if cfm is not None else []
            objs = retrieve_types(self.client, {
                vim.VirtualMachine: VM_PATHS,
                vim.Network: ["name"],
                vim.dvs.DistributedVirtualPortgroup: ["name", "key"],
            }, extra)
            vms = []
            for o in objs:
                if isinstance(o.ref, vim.CustomFieldsManager):
                    self.fields = {f.key: f.name for f in (o.get("field") or [])}
                elif isinstance(o.ref, vim.dvs.DistributedVirtualPortgroup):
                    self.portgroups[o.get("key")] = o.name
                    self.networks[o.ref._moId] = o.name
                elif isinstance(o.ref, vim.Network):
                    self.networks[o.ref._moId] = o.name
                else:
                    vms.append(o)
            self._vms = [self._vm(o) for o in vms]
        return self._vms

    def _vm(self, o: Obj) -> VMInfo:
        disks, nics = parse_devices(o.get("config.hardware.device") or [], self.networks, self.portgroups)
        custom = {}
        for cv in o.get("customValue") or []:
            custom[self.fields.get(cv.key, str(cv.key))] = getattr(cv, "value", "")
        extra = {opt.key: str(opt.value) for opt in (o.get("config.extraConfig") or [])}
        snap = o.get("snapshot")
        return VMInfo(
            ref=o.ref, name=o.name, uuid=o.get("config.instanceUuid"),
            power_state=str(o.get("runtime.powerState") or "unknown"), host=o.get("runtime.host"),
            disks=disks, nics=nics, notes=o.get("config.annotation") or "", custom=custom, extra=extra,
            tools=o.get("guest.toolsRunningStatus"), ip=o.get("guest.ipAddress"),
            heartbeat=str(o.get("guestHeartbeatStatus")) if o.get("guestHeartbeatStatus") else None,
            has_snapshot=bool(snap and getattr(snap, "rootSnapshotList", None)),
            snapshots=vmops.snapshots(snap) if snap else [],
            resource_pool=o.get("resourcePool"), folder=o.get("parent"),
        )

    def vms_by_name(self) -> dict[str, VMInfo]:
        return {v.name: v for v in self.vms()}

    def vm(self, name: str) -> VMInfo:
        found = self.vms_by_name().get(name)
        if found is None:
            raise NotFound(f"site {self.client.site.name}: VM {name!r} not found")
        return found

    # -- the rest of the inventory ------------------------------------------------------

    def hosts(self) -> list[Obj]:
        if self._hosts is None:
            self._hosts = retrieve(self.client, vim.HostSystem, ["name", "parent", "datastore", "network"])
        return self._hosts

    def datastores(self) -> list[Obj]:
        if self._datastores is None:
            self._datastores = retrieve(self.client, vim.Datastore,
                                        ["name", "info.url", "summary.freeSpace", "summary.capacity"])
        return self._datastores

    def folders(self) -> list[Obj]:
        if self._folders is None:
            self._folders = retrieve(self.client, vim.Folder, ["name", "childType", "parent"])
        return self._folders

    def resource_pools(self) -> list[Obj]:
        if self._pools is None:
            self._pools = retrieve(self.client, vim.ResourcePool, ["name", "owner", "parent"])
        return self._pools

    def clusters(self) -> list[Obj]:
        if self._clusters is None:
            self._clusters = retrieve(self.client, vim.ComputeResource, ["name", "resourcePool", "host"])
        return self._clusters

    def datacenters(self) -> list[Obj]:
        if self._datacenters is None:
            self._datacenters = retrieve(self.client, vim.Datacenter, ["name", "vmFolder", "datastoreFolder"])
        return self._datacenters

    def network_names(self) -> set[str]:
        if self._vms is None:
            self.vms()
        return set(self.networks.values()) | set(self.portgroups.values())

    @staticmethod
    def _by_name(objs: list[Obj], name: str, kind: str, site: str) -> Obj:
        for o in objs:
            if o.name == name:
                return o
        raise NotFound(f"site {site}: {kind} {name!r} not found")

    def host(self, name: str) -> Obj:
        return self._by_name(self.hosts(), name, "host", self.client.site.name)

    def datastore(self, name: str) -> Obj:
        return self._by_name(self.datastores(), name, "datastore", self.client.site.name)

    def folder(self, name: str) -> Obj:
        vm_folders = [f for f in self.folders() if "VirtualMachine" in (f.get("childType") or [])]
        return self._by_name(vm_folders, name, "VM folder", self.client.site.name)

    def cluster(self, name: str) -> Obj:
        return self._by_name(self.clusters(), name, "cluster", self.client.site.name)

    def resource_pool(self, name: str) -> Obj:
        return self._by_name(self.resource_pools(), name, "resource pool", self.client.site.name)

    def network(self, name: str) -> Any:
        """The moid of a network or port group by name."""
        if self._vms is None:
            self.vms()
        for moid, n in self.networks.items():
            if n == name:
                return moid
        raise NotFound(f"site {self.client.site.name}: network {name!r} not found")

    def datacenter_name(self) -> str:
        want = self.client.site.datacenter
        dcs = self.datacenters()
        if want:
            return self._by_name(dcs, want, "datacenter", self.client.site.name).name
        if not dcs:
            raise NotFound(f"site {self.client.site.name}: no datacenter")
        return dcs[0].name


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


# Per site client: VM name -> its managed object reference. Weak, so a client that is
# replaced (a new login) takes its map with it.
_ids: weakref.WeakKeyDictionary[Client, dict[str, Any]] = weakref.WeakKeyDictionary()
_ids_lock = threading.Lock()


def _id_map(client: Client, refresh: bool) -> dict[str, Any]:
    with _ids_lock:
        m = None if refresh else _ids.get(client)
    if m is None:
        m = {o.name: o.ref for o in retrieve(client, vim.VirtualMachine, ["name"])}
        with _ids_lock:
            _ids[client] = m
    return m


def _read_named(client: Client, names: list[str], refresh: bool) -> dict[str, VMInfo] | None:
    """The named VMs found, or None when the map is stale (a name missing, an id gone or
    naming another VM): then the map is read again."""
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


def named_vms(client: Client, names: list[str]) -> dict[str, VMInfo]:
    """The VMs of these names that the site holds, read afresh, in the order given (a
    name the site lacks is left out). Two round trips, plus one for the id map when it
    is new or stale; the replies hold only these VMs."""
    found = _read_named(client, names, refresh=False)
    if found is None:
        found = _read_named(client, names, refresh=True) or {}
    return {n: found[n] for n in names if n in found}
