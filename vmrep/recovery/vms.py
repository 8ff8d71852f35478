"""VMs at the recovery site (and the source VMs' power): create from a plan, re-IP by
guest customization, power, find again by their markers, wait for the guest, remove.

Every function is one step a retry may repeat: creation first looks for the VM its
previous try created (by the markers written with CreateVM), power operations look at
the power state first, removal of what is not there is nothing to do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pyVmomi import vim

from vmrep.errors import NotFound, VmrepError, VSphereError
from vmrep.recovery import naming
from vmrep.recovery.plan import Plan, VMPlan
from vmrep.vsphere.connection import Client
from vmrep.vsphere.property import retrieve, retrieve_one
from vmrep.vsphere import vm as vmops
from vmrep.vsphere.task import run_task

log = logging.getLogger(__name__)

SITE_VM_PATHS = ["name", "config.extraConfig", "runtime.powerState", "config.instanceUuid"]


@dataclass
class SiteVM:
    ref: Any
    name: str
    power: str
    extra: dict[str, str]
    uuid: str | None = None

    @property
    def marked_vpg(self) -> str | None:
        return self.extra.get(naming.MARK_VPG)

    @property
    def committed(self) -> bool:
        return self.extra.get(naming.MARK_STATE) == naming.STATE_COMMITTED


def site_vms(client: Client, *, fresh_view: bool = False) -> list[SiteVM]:
    """Every VM of a site with its vmrep markers: one collector read (through the
    session's container view, or with `fresh_view` through one made for this read)."""
    out = []
    container = client.content.rootFolder if fresh_view else None
    for o in retrieve(client, vim.VirtualMachine, SITE_VM_PATHS, container=container):
        extra: dict[str, str] = {}
        for opt in o.get("config.extraConfig") or []:
            if str(opt.key).startswith("vmrep."):
                extra[opt.key] = str(opt.value)  # the last value set wins
        out.append(SiteVM(o.ref, o.name, str(o.get("runtime.powerState") or "unknown"), extra,
                          o.get("config.instanceUuid")))
    return out


def find_recovered(client: Client, vpg: str, *, operation_id: str | None = None, source: str | None = None,
                   kind: str | None = None) -> list[SiteVM]:
    out = []
    for v in site_vms(client):
        if v.marked_vpg != vpg:
            continue
        if operation_id is not None and v.extra.get(naming.MARK_OPERATION) != operation_id:
            continue
        if source is not None and v.extra.get(naming.MARK_SOURCE) != source:
            continue
        if kind is not None and v.extra.get(naming.MARK_KIND) != kind:
            continue
        out.append(v)
    return out


# --------------------------------------------------------------------------------------
# Where things go at the recovery site


@dataclass
class Catalog:
    """Names to references at one site, read once per operation (one read per type)."""

    datacenter: Any
    vm_folder: Any
    hosts: dict[str, Any]
    host_parent: dict[str, Any]  # host name -> compute resource ref
    compute: dict[str, Any]  # compute resource name -> ref
    compute_pool: dict[str, Any]  # compute resource moid -> root resource pool
    pools: dict[str, Any]
    folders: dict[str, Any]
    networks: dict[str, dict[str, Any]]  # name -> {ref, kind: std|dvpg, key, switch_uuid}
    datastores: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, client: Client) -> "Catalog":
        want_dc = client.site.datacenter
        dcs = retrieve(client, vim.Datacenter, ["name", "vmFolder"])
        if not dcs:
            raise NotFound(f"site {client.site.name}: no datacenter")
        dc = next((d for d in dcs if d.name == want_dc), None) if want_dc else dcs[0]
        if dc is None:
            raise NotFound(f"site {client.site.name}: datacenter {want_dc!r} not found")
        hosts = retrieve(client, vim.HostSystem, ["name", "parent"])
        comp = retrieve(client, vim.ComputeResource, ["name", "resourcePool"])
        pools = retrieve(client, vim.ResourcePool, ["name"])
        folders = retrieve(client, vim.Folder, ["name", "childType"])
        nets: dict[str, dict[str, Any]] = {}
        for o in retrieve(client, vim.Network, ["name"]):
            if not isinstance(o.ref, vim.dvs.DistributedVirtualPortgroup):
                nets[o.name] = {"ref": o.ref, "kind": "std"}
        dvs_uuid = {o.ref._moId: o.get("uuid") for o in retrieve(client, vim.DistributedVirtualSwitch, ["uuid"])}
        for o in retrieve(client, vim.dvs.DistributedVirtualPortgroup,
                          ["name", "key", "config.distributedVirtualSwitch"]):
            sw = o.get("config.distributedVirtualSwitch")
            nets[o.name] = {"ref": o.ref, "kind": "dvpg", "key": o.get("key"),
                            "switch_uuid": dvs_uuid.get(sw._moId) if sw is not None else None}
        ds = {o.name for o in retrieve(client, vim.Datastore, ["name"])}
        return cls(
            datacenter=dc.ref, vm_folder=dc.get("vmFolder"),
            hosts={h.name: h.ref for h in hosts}, host_parent={h.name: h.get("parent") for h in hosts},
            compute={c.name: c.ref for c in comp}, compute_pool={c.ref._moId: c.get("resourcePool") for c in comp},
            pools={p.name: p.ref for p in pools},
            folders={f.name: f.ref for f in folders if "VirtualMachine" in (f.get("childType") or [])},
            networks=nets, datastores=ds,
        )

    def check(self, plan: Plan) -> None:
        """Every name the plan uses exists at the site (before anything is written)."""
        site = plan.site
        missing: list[str] = []
        for v in plan.vms:
            if v.datastore not in self.datastores:
                missing.append(f"datastore {v.datastore!r}")
            if v.host and v.host not in self.hosts:
                missing.append(f"host {v.host!r}")
            if v.cluster and v.cluster not in self.compute:
                missing.append(f"cluster {v.cluster!r}")
            if v.resource_pool and v.resource_pool not in self.pools:
                missing.append(f"resource pool {v.resource_pool!r}")
            if v.folder and v.folder not in self.folders:
                missing.append(f"VM folder {v.folder!r}")
            for n in v.nics:
                if n.network not in self.networks:
                    missing.append(f"network {n.network!r}")
        if missing:
            uniq = list(dict.fromkeys(missing))
            raise NotFound(f"VPG {plan.vpg}: not found at recovery site {site}: {', '.join(uniq)}")

    def placement(self, v: VMPlan) -> tuple[Any, Any, Any]:
        """(folder, resource pool, host or None) for a VM."""
        folder = self.folders[v.folder] if v.folder else self.vm_folder
        host = self.hosts.get(v.host) if v.host else None
        if v.resource_pool:
            pool = self.pools[v.resource_pool]
        elif v.host:
            pool = self.compute_pool.get(self.host_parent[v.host]._moId)
        elif v.cluster:
            pool = self.compute_pool.get(self.compute[v.cluster]._moId)
        else:
            pool = next(iter(self.compute_pool.values()))
        if pool is None:
            raise NotFound(f"no resource pool for VM {v.name}")
        return folder, pool, host

    def backing(self, network: str) -> Any:
        n = self.networks[network]
        if n["kind"] == "dvpg":
            return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(portgroupKey=n["key"], switchUuid=n["switch_uuid"]))
        return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(network=n["ref"], deviceName=network)


# --------------------------------------------------------------------------------------
# Create


def _device_class(name: str, default: type) -> type:
    cls = getattr(vim.vm.device, name, None)
    return cls if isinstance(cls, type) else default


def config_spec(plan: Plan, v: VMPlan, catalog: Catalog) -> Any:
    dev = vim.vm.device
    specs = []
    buses = sorted({d.bus for d in v.disks})
    for bus in buses:
        cls = _device_class(v.controllers.get(str(bus), "VirtualLsiLogicController"), dev.VirtualLsiLogicController)
        ctrl = cls(key=1000 + bus, busNumber=bus, sharedBus="noSharing")
        specs.append(dev.VirtualDeviceSpec(operation="add", device=ctrl))
    for i, d in enumerate(v.disks):
        backing = dev.VirtualDisk.FlatVer2BackingInfo(fileName=d.descriptor, diskMode="persistent",
                                                      thinProvisioned=True)
        disk = dev.VirtualDisk(key=2000 + i, controllerKey=1000 + d.bus, unitNumber=d.unit,
                               capacityInKB=-(-d.size // 1024), capacityInBytes=d.size, backing=backing)
        specs.append(dev.VirtualDeviceSpec(operation="add", device=disk))  # existing file: no fileOperation
    for i, n in enumerate(v.nics):
        cls = _device_class(n.adapter, dev.VirtualVmxnet3)
        nic = cls(key=4000 + i, addressType="generated", backing=catalog.backing(n.network),
                  connectable=dev.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True,
                                                            connected=False))
        specs.append(dev.VirtualDeviceSpec(operation="add", device=nic))
    marks = {naming.MARK_VPG: plan.vpg, naming.MARK_SOURCE: v.source, naming.MARK_OPERATION: plan.operation_id,
             naming.MARK_KIND: plan.kind}
    spec = vim.vm.ConfigSpec(
        name=v.name, guestId=v.guest_id, numCPUs=v.cpus, memoryMB=v.memory_mb,
        files=vim.vm.FileInfo(vmPathName=f"[{v.datastore}]"),
        annotation=(f"Recovered by vmrep: VPG {plan.vpg}, {plan.operation} {plan.operation_id[:8]}, "
                    f"checkpoint {plan.checkpoint_id} ({plan.checkpoint_time})"),
        extraConfig=[vim.option.OptionValue(key=k, value=val) for k, val in marks.items()],
        deviceChange=specs,
    )
    if v.firmware:
        spec.firmware = v.firmware
    return spec


def create_vm(client: Client, plan: Plan, v: VMPlan, catalog: Catalog) -> tuple[Any, bool]:
    """(VM ref, created now). Each attempt first looks for what an earlier one created."""
    folder, pool, host = catalog.placement(v)
    spec = config_spec(plan, v, catalog)

    def existing() -> Any:
        found = find_recovered(client, plan.vpg, operation_id=plan.operation_id, source=v.source)
        if len(found) > 1:
            log.warning("VPG %s: %d VMs for %s of operation %s; using the first", plan.vpg, len(found),
                        v.source, plan.operation_id[:8])
        return found[0].ref if found else None

    def attempt() -> tuple[str, Any]:
        ref = existing()
        if ref is not None:
            return "vm", ref
        return "task", vmops.start_create(folder, spec, pool, host)

    kind, obj = client.call(f"VM {v.name}", attempt, method_name="CreateVM_Task")
    if kind == "vm":
        return obj, False
    return vmops.wait_created(client, v.name, obj), True


def customization_spec(v: VMPlan) -> Any:
    c = vim.vm.customization
    adapters = []
    dns: list[str] = []
    for n in v.nics:
        ip = n.ip or {}
        if n.static_ip:
            s = c.IPSettings(ip=c.FixedIp(ipAddress=ip["ip"]), subnetMask=ip.get("netmask"),
                             gateway=[ip["gateway"]] if ip.get("gateway") else [],
                             dnsServerList=list(ip.get("dns") or []))
            dns.extend(ip.get("dns") or [])
        else:
            s = c.IPSettings(ip=c.DhcpIpGenerator())
        adapters.append(c.AdapterMapping(adapter=s))
    if v.guest_id.lower().startswith("win"):
        identity = c.Sysprep(
            guiUnattended=c.GuiUnattended(autoLogon=False, autoLogonCount=0, timeZone=85),
            userData=c.UserData(computerName=c.FixedName(name=naming.hostname(v.source, 15)),
                                fullName="vmrep", orgName="vmrep", productId=""),
            identification=c.Identification(joinWorkgroup="WORKGROUP"))
    else:
        identity = c.LinuxPrep(hostName=c.FixedName(name=naming.hostname(v.source)), domain="localdomain")
    return c.Specification(identity=identity, globalIPSettings=c.GlobalIPSettings(dnsServerList=dns or None),
                           nicSettingMap=adapters)


def power_state(client: Client, ref: Any) -> str:
    return vmops.power_state(client, ref)


def customize(client: Client, v: VMPlan, ref: Any) -> bool:
    """Re-IP at next power-on; nothing to do once powered on (a retry after power-on)."""
    if power_state(client, ref) == "poweredOn":
        return False
    vmops.customize(client, v.name, ref, customization_spec(v))
    return True


def power_on(client: Client, name: str, ref: Any) -> bool:
    if power_state(client, ref) == "poweredOn":
        return False
    vmops.power_on(client, name, ref)
    return True


def power_off(client: Client, name: str, ref: Any) -> bool:
    if power_state(client, ref) != "poweredOn":
        return False
    vmops.power_off(client, name, ref)
    return True


def destroy(client: Client, vm: SiteVM) -> None:
    """Power off and destroy (vSphere deletes the VM's files and attached disks with it)."""
    try:
        power_off(client, vm.name, vm.ref)
        vmops.destroy(client, vm.name, vm.ref)
    except NotFound:
        pass  # gone already (a retry after the destroy went through)


def mark(client: Client, name: str, ref: Any, values: dict[str, str]) -> None:
    vmops.set_extra_config(client, name, ref, values)


def unregister(client: Client, vm: SiteVM) -> None:
    """Remove from the inventory, keeping its files (reverse protection pre-seeds from them)."""
    power_off(client, vm.name, vm.ref)
    try:
        vmops.unregister(client, vm.name, vm.ref)
    except NotFound:
        pass


def datacenter_ref(client: Client) -> Any:
    want = client.site.datacenter
    dcs = retrieve(client, vim.Datacenter, ["name"])
    for d in dcs:
        if want is None or d.name == want:
            return d.ref
    raise NotFound(f"site {client.site.name}: datacenter {want!r} not found")


def delete_folder(client: Client, catalog_dc: Any, path: str) -> bool:
    """Delete a datastore folder ('[ds] dir') with everything in it; False if not there."""
    fm = client.content.fileManager
    try:
        run_task(client, f"datastore folder {path}", fm.DeleteDatastoreFile_Task, name=path, datacenter=catalog_dc)
        return True
    except NotFound:
        return False
    except VSphereError as exc:
        if exc.fault in ("FileNotFound", "NotFound"):
            return False
        raise


# --------------------------------------------------------------------------------------
# The guest


@dataclass
class GuestState:
    power: str
    tools: str | None
    heartbeat: str | None
    ip: str | None
    ips: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"power": self.power, "tools": self.tools, "heartbeat": self.heartbeat, "ip": self.ip,
                "ips": self.ips}


def guest_state(client: Client, ref: Any) -> GuestState:
    o = retrieve_one(client, ref, ["runtime.powerState", "guest.toolsRunningStatus", "guestHeartbeatStatus",
                                   "guest.ipAddress", "guest.net"])
    ips: list[str] = []
    for n in o.get("guest.net") or []:
        ips.extend(n.ipAddress or [])
    hb = o.get("guestHeartbeatStatus")
    return GuestState(str(o.get("runtime.powerState") or "unknown"), o.get("guest.toolsRunningStatus"),
                      str(hb) if hb else None, o.get("guest.ipAddress"), ips)


def guest_problems(g: GuestState, expected_ips: list[str]) -> list[str]:
    out = []
    if g.power != "poweredOn":
        out.append(f"not powered on ({g.power})")
    if g.tools != "guestToolsRunning":
        out.append(f"VMware Tools not running ({g.tools or 'no status'})")
    if g.heartbeat != "green":
        out.append(f"heartbeat {g.heartbeat or 'none'}")
    have = set(g.ips) | ({g.ip} if g.ip else set())
    missing = [ip for ip in expected_ips if ip not in have]
    if missing:
        out.append(f"IP {', '.join(missing)} expected, guest reports {', '.join(sorted(have)) or 'none'}")
    elif not expected_ips and not have:
        out.append("no IP address")
    return out


def wait_guest(client: Client, ref: Any, expected_ips: list[str], timeout: float,
               sleep: Callable[[float], None] = time.sleep) -> tuple[GuestState, list[str]]:
    """Poll until the guest is up with the expected IP, or the timeout: (state, problems)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        g = guest_state(client, ref)
        problems = guest_problems(g, expected_ips)
        if not problems or time.monotonic() >= deadline:
            return g, problems
        sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 2.0)


# --------------------------------------------------------------------------------------
# Source VMs


def source_vm(client: Client, vpg: str, name: str, uuid: str | None = None, *,
              fresh_view: bool = False) -> SiteVM | None:
    """The protected VM of `vpg`: by name, preferring the given uuid, never a VM that
    `vpg` itself recovered (a namesake in a local recovery). A VM recovered for another
    VPG is a source like any other (failback protects recovered VMs)."""
    cands = [v for v in site_vms(client, fresh_view=fresh_view) if v.name == name and v.marked_vpg != vpg]
    if uuid:
        exact = [v for v in cands if v.uuid == uuid]
        if exact:
            return exact[0]
    return cands[0] if cands else None


def wait_power(client: Client, ref: Any, want: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if power_state(client, ref) == want:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def shutdown(client: Client, vm: SiteVM, policy: str, timeout: float) -> dict[str, Any]:
    """Apply a shutdown policy to a source VM; returns what was done."""
    state = power_state(client, vm.ref)
    detail: dict[str, Any] = {"was": state, "policy": policy, "powered_off": False}
    if state != "poweredOn" or policy == "none":
        detail["action"] = "none"
        return detail
    g = guest_state(client, vm.ref)
    tools = g.tools == "guestToolsRunning"
    if policy == "graceful" and not tools:
        raise VmrepError(f"VM {vm.name}: graceful shutdown impossible: VMware Tools do not answer "
                         f"({g.tools or 'no status'}); use --shutdown force or none")
    if tools:
        try:
            vmops.shutdown_guest(client, vm.name, vm.ref)
        except VSphereError as exc:
            if policy == "graceful":
                raise VmrepError(f"VM {vm.name}: graceful shutdown failed: {exc}") from exc
        if wait_power(client, vm.ref, "poweredOff", timeout):
            detail.update(action="guest shutdown", powered_off=True)
            return detail
        if policy == "graceful":
            raise VmrepError(f"VM {vm.name}: still powered on {timeout:.0f}s after the guest shutdown")
    vmops.power_off(client, vm.name, vm.ref)
    detail.update(action="power off", powered_off=True)
    return detail
