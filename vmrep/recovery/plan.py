"""What a recovery will create, decided once per operation: the checkpoint, and per VM
its name, placement, hardware, disks (with their target paths) and NICs (network and
IP settings). A plan is plain data (JSON): recorded with the operation, so that steps
retried in another process, a later commit or rollback, and the cleanup of a crashed run
all see the same decisions.

Hardware (vCPUs, memory, guest OS, controllers, NICs) comes from the protected VM when
its site answers, and is cached beside the config (`vmrep.d/hardware/<vpg>.json`) so that
a recovery works when the protected site is gone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyVmomi import vim

from vmrep.config import VPG, Config
from vmrep.errors import ConnectionFailed, Refused, TransientError, VmrepError, VSphereError
from vmrep.recovery import naming
from vmrep.vsphere.inventory import parse_devices
from vmrep.vsphere.property import retrieve
from vmrep.stamps import utcnow

log = logging.getLogger(__name__)

DEFAULT_HARDWARE = {"cpus": 1, "memory_mb": 2048, "guest_id": "otherLinux64Guest", "firmware": None,
                    "controllers": {}, "nics": [], "disks": {}, "host": None, "folder": None,
                    "datastore": None, "uuid": None}


# --------------------------------------------------------------------------------------
# Where vmrep keeps files of its own beside the config


def state_dir(config: Config) -> Path:
    if config.source is not None:
        return config.source.parent / "vmrep.d"
    return Path(os.environ.get("VMREP_HOME") or ".vmrep").resolve() / "vmrep.d"


# --------------------------------------------------------------------------------------
# Hardware of the protected VMs


HW_PATHS = ["name", "config.hardware.numCPU", "config.hardware.memoryMB", "config.guestId", "config.firmware",
            "config.hardware.device", "config.instanceUuid", "config.extraConfig", "runtime.host", "parent"]


def _recovered_by(extra: Any) -> str | None:
    for o in extra or []:
        if getattr(o, "key", "") == naming.MARK_VPG:
            return str(o.value)
    return None


def capture_hardware(rt: Any, vpg: VPG) -> dict[str, dict[str, Any]]:
    """Read the protected VMs' hardware (one collector read per object type)."""
    from vmrep.vsphere.inventory import Inventory

    client = rt.client(vpg.protected_site)
    inv = Inventory(client)
    hosts = {h.ref._moId: h.name for h in inv.hosts()}
    folders = {f.ref._moId: f.name for f in inv.folders()}
    dc_folders = {dc.get("vmFolder")._moId for dc in inv.datacenters() if dc.get("vmFolder") is not None}
    wanted = {vm.name for vm in vpg.vms}
    out: dict[str, dict[str, Any]] = {}
    for o in retrieve(client, vim.VirtualMachine, HW_PATHS):
        if o.name not in wanted:
            continue
        if _recovered_by(o.get("config.extraConfig")) == vpg.name:
            continue  # local recovery: the recovered namesake is not the protected VM
        devices = o.get("config.hardware.device") or []
        disks, nics = parse_devices(devices, inv.networks, inv.portgroups)
        controllers = {str(d.busNumber): type(d).__name__.rsplit(".", 1)[-1]
                       for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)}
        nic_types = {d.key: type(d).__name__.rsplit(".", 1)[-1]
                     for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)}
        host = o.get("runtime.host")
        parent = o.get("parent")
        out[o.name] = {
            "cpus": int(o.get("config.hardware.numCPU") or 1),
            "memory_mb": int(o.get("config.hardware.memoryMB") or 1024),
            "guest_id": o.get("config.guestId") or "otherLinux64Guest",
            "firmware": o.get("config.firmware"),
            "controllers": controllers,
            "nics": [{"adapter": nic_types.get(n.key, "VirtualVmxnet3"), "network": n.network} for n in nics],
            "disks": {d.id: d.flat for d in disks},
            "host": hosts.get(host._moId) if host is not None else None,
            "folder": (folders.get(parent._moId) if parent is not None and parent._moId not in dc_folders
                       else None),
            "datastore": disks[0].datastore if disks else None,
            "uuid": o.get("config.instanceUuid"),
        }
    return out


def hardware_cache_path(config: Config, vpg: str) -> Path:
    return state_dir(config) / "hardware" / f"{naming.safe(vpg)}.json"


def hardware(rt: Any, vpg: VPG, *, refresh: bool = True) -> tuple[dict[str, dict[str, Any]], str]:
    """(hardware per VM, where it came from: 'protected site' | 'cache' | 'defaults')."""
    path = hardware_cache_path(rt.config, vpg.name)
    if refresh:
        try:
            hw = capture_hardware(rt, vpg)
            if hw:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"captured_at": utcnow().isoformat(), "vms": hw}, indent=1))
                os.replace(tmp, path)
                return hw, "protected site"
        except (ConnectionFailed, TransientError, VSphereError, OSError) as exc:
            log.warning("VPG %s: protected site %s not readable (%s); using the cached hardware",
                        vpg.name, vpg.protected_site, exc)
    try:
        return json.loads(path.read_text())["vms"], "cache"
    except (OSError, ValueError, KeyError):
        return {}, "defaults"


# --------------------------------------------------------------------------------------
# The plan


@dataclass
class DiskPlan:
    id: str
    size: int
    bus: int
    unit: int
    descriptor: str  # '[ds] folder/vm/scsi0-0.vmdk'

    @property
    def flat(self) -> str:
        return self.descriptor[:-5] + "-flat.vmdk"


@dataclass
class NicPlan:
    network: str
    adapter: str = "VirtualVmxnet3"
    ip: dict[str, Any] | None = None  # IPSettings as dict; None: leave the guest's own setting

    @property
    def static_ip(self) -> str | None:
        if self.ip and not self.ip.get("dhcp", True):
            return self.ip.get("ip")
        return None


@dataclass
class VMPlan:
    source: str
    name: str
    group: str
    datastore: str
    host: str | None
    folder: str | None
    resource_pool: str | None
    cluster: str | None
    cpus: int
    memory_mb: int
    guest_id: str
    firmware: str | None
    controllers: dict[str, str]
    disks: list[DiskPlan]
    nics: list[NicPlan]
    source_info: dict[str, Any] = field(default_factory=dict)  # host, folder, datastore, disks, uuid, nics

    @property
    def customize(self) -> bool:
        """Re-IP by guest customization when any NIC has a static setting."""
        return any(n.static_ip for n in self.nics)

    @property
    def expected_ips(self) -> list[str]:
        return [ip for ip in (n.static_ip for n in self.nics) if ip]


@dataclass
class Plan:
    vpg: str
    operation: str  # test | failover | move
    operation_id: str
    kind: str  # naming.KIND_TEST | naming.KIND_LIVE
    site: str
    checkpoint_id: str
    checkpoint_time: str
    folder: str
    vms: list[VMPlan]
    groups: list[dict[str, Any]]  # [{name, delay_seconds, vms: [...]}] in boot order
    hardware_from: str = "defaults"

    @property
    def datastores(self) -> list[str]:
        return sorted({v.datastore for v in self.vms})

    def vm(self, source: str) -> VMPlan:
        for v in self.vms:
            if v.source == source:
                return v
        raise VmrepError(f"VPG {self.vpg}: VM {source} is not part of operation {self.operation_id[:8]}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        vms = []
        for v in d.pop("vms"):
            v = dict(v)
            v["disks"] = [DiskPlan(**x) for x in v["disks"]]
            v["nics"] = [NicPlan(**x) for x in v["nics"]]
            vms.append(VMPlan(**v))
        return cls(vms=vms, **d)


def _parse_disk_id(disk_id: str, fallback_unit: int) -> tuple[int, int]:
    if disk_id.startswith("scsi") and ":" in disk_id:
        bus, unit = disk_id[4:].split(":", 1)
        if bus.isdigit() and unit.isdigit():
            return int(bus), int(unit)
    return 0, fallback_unit


def networks_for(vpg: VPG, vm_name: str, kind: str, nic_count: int) -> list[tuple[str | None, Any]]:
    """(network, IPSettings or None) per NIC for a test or a live recovery."""
    spec = vpg.vm(vm_name)
    test = kind == naming.KIND_TEST
    default = vpg.recovery.test_network if test else vpg.recovery.live_network
    out: list[tuple[str | None, Any]] = []
    n = len(spec.nics) if spec.nics else max(nic_count, 1)
    for i in range(n):
        nic = spec.nics[i] if i < len(spec.nics) else None
        if nic is not None:
            net = (nic.test_network if test else nic.live_network) or default
            ip = nic.test_ip if test else nic.live_ip
        else:
            net, ip = default, None
        out.append((net, ip))
    return out


def check_test_networks(vpg: VPG, nic_counts: dict[str, int] | None = None) -> None:
    """Refuse a test whose network is missing or is the production network."""
    for spec in vpg.vms:
        count = (nic_counts or {}).get(spec.name, 1)
        live = networks_for(vpg, spec.name, naming.KIND_LIVE, count)
        test = networks_for(vpg, spec.name, naming.KIND_TEST, count)
        for i, ((lnet, _), (tnet, _)) in enumerate(zip(live, test, strict=True)):
            if not tnet:
                raise Refused(f"VPG {vpg.name}: test refused: VM {spec.name} NIC {i + 1} has no test network "
                              "(set recovery.test_network or the NIC's test_network)")
            if lnet and tnet == lnet:
                raise Refused(f"VPG {vpg.name}: test refused: the test network {tnet!r} of VM {spec.name} "
                              f"NIC {i + 1} is the production network; a test must run isolated")


def build_plan(rt: Any, vpg: VPG, *, operation: str, operation_id: str, checkpoint_id: str,
               refresh_hardware: bool = True) -> Plan:
    kind = naming.KIND_TEST if operation == "test" else naming.KIND_LIVE
    cp = rt.journal.checkpoint(vpg.name, checkpoint_id)
    disks_at = rt.journal.disks(vpg.name, cp.id)
    # A failover that found the protected site gone does not ask it again (reach.py).
    from vmrep.recovery.reach import is_unreachable

    refresh_hardware = refresh_hardware and not is_unreachable(rt.store, operation_id)
    hw, hw_from = hardware(rt, vpg, refresh=refresh_hardware)
    folder = naming.scratch_folder(vpg.name) if kind == naming.KIND_TEST else naming.live_folder(vpg.name,
                                                                                                 operation_id)
    r = vpg.recovery
    vms: list[VMPlan] = []
    for spec in vpg.vms:
        own = sorted(((d, size) for (v, d), size in disks_at.items() if v == spec.name))
        if not own:
            raise VmrepError(f"VPG {vpg.name}: VM {spec.name} has no disk in checkpoint {cp.id}")
        h = {**DEFAULT_HARDWARE, **hw.get(spec.name, {})}
        datastore = spec.recovery_datastore or r.datastore
        if not datastore:
            raise VmrepError(f"VPG {vpg.name}: VM {spec.name} has no recovery datastore (set recovery.datastore)")
        name = naming.test_vm_name(spec.name) if kind == naming.KIND_TEST else spec.name
        disks = []
        for k, (disk_id, size) in enumerate(own):
            bus, unit = _parse_disk_id(disk_id, k)
            disks.append(DiskPlan(disk_id, int(size), bus, unit,
                                  naming.disk_descriptor(datastore, folder, spec.name, disk_id)))
        # Units must be unique per bus (unit 7 is the controller's own)
        used: set[tuple[int, int]] = set()
        for d in disks:
            while (d.bus, d.unit) in used or d.unit == 7:
                d.unit += 1
            used.add((d.bus, d.unit))
        hw_nics = h.get("nics") or []
        nics = []
        for i, (net, ip) in enumerate(networks_for(vpg, spec.name, kind, len(hw_nics))):
            if not net:
                what = "test" if kind == naming.KIND_TEST else "live"
                raise Refused(f"VPG {vpg.name}: VM {spec.name} NIC {i + 1} has no {what} network "
                              f"(set recovery.{what}_network)")
            adapter = hw_nics[i]["adapter"] if i < len(hw_nics) else "VirtualVmxnet3"
            nics.append(NicPlan(net, adapter, ip.model_dump() if ip is not None else None))
        group = spec.boot_group or "default"
        vms.append(VMPlan(
            source=spec.name, name=name, group=group, datastore=datastore,
            host=spec.recovery_host or r.host, folder=spec.recovery_folder or r.folder,
            resource_pool=r.resource_pool, cluster=r.cluster,
            cpus=int(h["cpus"]), memory_mb=int(h["memory_mb"]), guest_id=h["guest_id"], firmware=h.get("firmware"),
            controllers=dict(h.get("controllers") or {}), disks=disks, nics=nics,
            source_info={k: h.get(k) for k in ("host", "folder", "datastore", "disks", "uuid", "nics")},
        ))
    if kind == naming.KIND_TEST:
        check_test_networks(vpg, {v.source: len(v.nics) for v in vms})
    groups = [{"name": g.name, "delay_seconds": g.delay_seconds, "vms": [m.name for m in members]}
              for g, members in vpg.ordered_boot_groups()]
    return Plan(vpg=vpg.name, operation=operation, operation_id=operation_id, kind=kind, site=vpg.recovery_site,
                checkpoint_id=cp.id, checkpoint_time=cp.time.isoformat(), folder=folder, vms=vms, groups=groups,
                hardware_from=hw_from)
