"""The two-site vSphere lab: start, seed, describe and stop simulator processes.

`vmrep lab up` starts a protected site (siteA) and a recovery site (siteB), each its own
simulator process, seeds VMs whose disks hold real bytes (uploaded through the datastore's
`/folder`, as onto a real datastore), powers them on (tools running, IPs reported, as
production VMs run), adds a production and an isolated test network, and writes a ready
`vmrep.yaml` with two VPGs: `erp` replicates
remotely (siteA -> siteB), `files` locally (siteA, to another host and datastore).
`vmrep lab down` stops only the processes `lab up` started (by PID, checked against the
command line) and removes their folders.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from pyVmomi import vim

from vmrep.errors import VmrepError

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "build" / "vcsim-lab"
MiB = 1024 * 1024


class LabError(VmrepError):
    pass


def home() -> Path:
    return Path(os.environ.get("VMREP_HOME", ".vmrep")).resolve()


def lab_dir(base: Path | None = None) -> Path:
    return (base or home()) / "lab"


# --------------------------------------------------------------------------------------
# The launcher process


def ensure_launcher() -> Path:
    """Build the Go launcher if it is missing or older than its sources."""
    src = REPO / "lab" / "launcher"
    sources = list(src.glob("*.go"))
    if LAUNCHER.exists() and all(LAUNCHER.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return LAUNCHER
    if not sources:
        raise LabError(f"lab launcher sources missing in {src}")
    LAUNCHER.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOFLAGS="-mod=mod",
               GOCACHE=str(REPO / "build" / "gocache"))
    env.pop("GOFLAGS")
    r = subprocess.run(["go", "build", "-o", str(LAUNCHER), "."], cwd=src, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"building the lab launcher failed: {r.stderr.strip().splitlines()[-1:]}")
    return LAUNCHER


@dataclass
class SiteProcess:
    name: str
    pid: int
    url: str
    host: str
    control_url: str
    ca_file: str
    thumbprint: str
    datastores: dict[str, str]
    workdir: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


LAB_USER = "lab-admin"


def start_site(name: str, workdir: Path, *, vms_per_pool: int = 0, datastores: int = 2,
               boot_delay: str = "1s", extra: list[str] | None = None, timeout: float = 30.0,
               password_file: Path | None = None) -> SiteProcess:
    binary = ensure_launcher()
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state.json"
    state.unlink(missing_ok=True)
    args = [str(binary), "-listen", "127.0.0.1:0", "-tls-dir", str(workdir), "-state-file", str(state),
            "-vm", str(vms_per_pool), "-ds", str(datastores), "-boot-delay", boot_delay, *(extra or [])]
    if password_file is not None:
        args += ["-username", LAB_USER, "-password-file", str(password_file)]
    log = open(workdir / "launcher.log", "ab")
    env = dict(os.environ, TMPDIR=str(workdir))  # the simulator's datastore folders live here
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (workdir / "launcher.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LabError(f"lab site {name} exited at start: {' | '.join(tail)}")
        if state.exists():
            try:
                info = json.loads(state.read_text())
            except json.JSONDecodeError:
                time.sleep(0.05)
                continue
            return SiteProcess(name=name, pid=proc.pid, url=info["url"], host=info["host"],
                               control_url=info["control_url"], ca_file=info["ca_file"],
                               thumbprint=info["thumbprint"], datastores=info["datastores"],
                               workdir=str(workdir))
        time.sleep(0.05)
    proc.kill()
    raise LabError(f"lab site {name} did not become ready within {timeout:.0f}s")


def _is_our_launcher(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"vcsim-lab")


def stop_site(site: SiteProcess | dict[str, Any], timeout: float = 10.0) -> None:
    pid = site.pid if isinstance(site, SiteProcess) else int(site["pid"])
    if not _is_our_launcher(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _is_our_launcher(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _is_our_launcher(pid):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------
# Seeding


@dataclass
class DiskSeed:
    size_mib: int
    random_regions: list[tuple[float, float]]  # (start, end) as fractions of the disk


@dataclass
class VMSeed:
    name: str
    disks: list[DiskSeed]
    host: str = "DC0_C0_H0"
    datastore: str = "LocalDS_0"
    notes: str = ""


SHARED_BLOCK = random.Random(7).randbytes(MiB)  # present in several VMs: dedup has something to find

DEFAULT_VMS = [
    VMSeed("erp-db", [DiskSeed(32, [(0.0, 0.3), (0.6, 0.7)]), DiskSeed(16, [(0.1, 0.5)])]),
    VMSeed("erp-app", [DiskSeed(24, [(0.0, 0.25), (0.5, 0.6)])]),
    VMSeed("erp-web", [DiskSeed(16, [(0.0, 0.5)])]),
    VMSeed("files-01", [DiskSeed(24, [(0.0, 0.4)]), DiskSeed(8, [(0.25, 0.75)])]),
]


def disk_image_chunks(seed: DiskSeed, rng: random.Random) -> Iterator[bytes]:
    """The seeded disk's bytes, 1 MiB at a time: random regions, zeros elsewhere, and the
    shared block at the end (as long as the disk's capacity)."""
    size = seed.size_mib * MiB
    data: set[int] = set()
    for start, end in seed.random_regions:
        data.update(range(int(size * start) // MiB * MiB, int(size * end) // MiB * MiB, MiB))
    blocks = {off: rng.randbytes(MiB) for off in sorted(data)}  # drawn in the order they were before
    zero = bytes(MiB)
    for off in range(0, size, MiB):
        yield SHARED_BLOCK if off == size - MiB else blocks.get(off, zero)


def upload_disk_image(client: Any, path: str, seed: DiskSeed, rng: random.Random) -> None:
    """Put a new VM's flat extent through the datastore's /folder upload, as onto a real
    datastore (the launcher keeps zero runs as holes: a thin disk)."""
    from vmrep.vsphere.datastore import HttpDatastore

    HttpDatastore(client, "DC0").write(path, list(disk_image_chunks(seed, rng)), seed.size_mib * MiB)


def _device_specs(vm_name: str, ds: str, disks: list[DiskSeed], network: Any, net_name: str) -> list[Any]:
    specs = []
    ctrl = vim.vm.device.VirtualLsiLogicController(key=1000, busNumber=0, sharedBus="noSharing")
    specs.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl))
    for i, d in enumerate(disks):
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{ds}] {vm_name}/disk{i}.vmdk", diskMode="persistent", thinProvisioned=True)
        disk = vim.vm.device.VirtualDisk(key=2000 + i, controllerKey=1000, unitNumber=i,
                                         capacityInKB=d.size_mib * 1024, backing=backing,
                                         deviceInfo=vim.Description(label=f"Hard disk {i + 1}",
                                                                    summary=f"{d.size_mib * 1024} KB"))
        specs.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
    nic = vim.vm.device.VirtualVmxnet3(
        key=4000, backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(network=network, deviceName=net_name),
        addressType="generated")
    specs.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    return specs


def _site_config(site: SiteProcess, password_file: Path) -> dict[str, Any]:
    return {
        "host": site.host,
        "user": LAB_USER,
        "password": {"file": str(password_file)},
        "tls": {"ca_file": site.ca_file},
        "datastore_mounts": dict(site.datastores),
        "lab_control_url": site.control_url,
    }


def connect_site(site: SiteProcess, name: str, password: str = "lab") -> Any:
    from vmrep.config import Site
    from vmrep.vsphere.connection import Client

    cfg = Site(name=name, host=site.host, user=LAB_USER, password={"env": "UNUSED"},
               tls={"ca_file": site.ca_file}, datastore_mounts=site.datastores)
    return Client(cfg, password)


def create_vm(client: Any, seed: VMSeed, *, folder: Any, pool: Any, host: Any, network: Any, net_name: str,
              datastores: dict[str, str], rng: random.Random) -> Any:
    from vmrep.vsphere import vm as vmops

    spec = vim.vm.ConfigSpec(
        name=seed.name, guestId="otherLinux64Guest", numCPUs=1, memoryMB=256,
        files=vim.vm.FileInfo(vmPathName=f"[{seed.datastore}]"), annotation=seed.notes,
        deviceChange=_device_specs(seed.name, seed.datastore, seed.disks, network, net_name),
    )
    ref = vmops.create(client, seed.name, folder, spec, pool, host)
    for i, d in enumerate(seed.disks):
        upload_disk_image(client, f"[{seed.datastore}] {seed.name}/disk{i}-flat.vmdk", d, rng)
    return ref


def _find(client: Any, vimtype: type, name: str) -> Any:
    from vmrep.vsphere.property import retrieve

    for o in retrieve(client, vimtype, ["name"]):
        if o.name == name:
            return o.ref
    raise LabError(f"lab: {vimtype.__name__} {name!r} not found")


def add_portgroups(client: Any, names: list[str]) -> None:
    from vmrep.vsphere.task import run_task

    from vmrep.vsphere.property import retrieve

    switches = retrieve(client, vim.DistributedVirtualSwitch, ["name"])
    if not switches:
        raise LabError("lab: no distributed switch to add port groups to")
    specs = [vim.dvs.DistributedVirtualPortgroup.ConfigSpec(name=n, type="earlyBinding", numPorts=32) for n in names]
    run_task(client, switches[0].name, switches[0].ref.AddDVPortgroup_Task, specs)


def seed_site(client: Any, site: SiteProcess, vms: list[VMSeed], rng: random.Random) -> None:
    from vmrep.vsphere.property import retrieve

    dc = retrieve(client, vim.Datacenter, ["name", "vmFolder"])[0]
    folder = dc.get("vmFolder")
    hosts = {o.name: o for o in retrieve(client, vim.HostSystem, ["name", "parent"])}
    pools = {o.ref._moId: o.get("resourcePool")
             for o in retrieve(client, vim.ComputeResource, ["name", "resourcePool"])}
    network = _find(client, vim.Network, "VM Network")
    for seed in vms:
        h = hosts[seed.host]
        pool = pools[h.get("parent")._moId]
        create_vm(client, seed, folder=folder, pool=pool, host=h.ref, network=network, net_name="VM Network",
                  datastores=site.datastores, rng=rng)


def power_on(client: Any, names: list[str], timeout: float = 30.0) -> dict[str, str]:
    """Power the VMs on, as production VMs run, and wait until each one's tools run and it
    reports an IP; returns name -> IP."""
    from vmrep.recovery import vms as vmops

    refs = {sv.name: sv.ref for sv in vmops.site_vms(client)}
    for n in names:
        vmops.power_on(client, n, refs[n])
    ips: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    for n in names:
        while True:
            g = vmops.guest_state(client, refs[n])
            if g.tools == "guestToolsRunning" and g.ip:
                ips[n] = g.ip
                break
            if time.monotonic() > deadline:
                raise LabError(f"lab: VM {n} did not report tools and an IP within {timeout:.0f}s")
            time.sleep(0.05)
    return ips


def journal_service_files(d: Path) -> dict[str, Any]:
    """The recovery site's journal service (`vmrep journal serve`): a CA and a server
    certificate (as the launcher makes the vCenters'), a writer token for siteA and an
    admin token for siteB, and a free port. Returns the config's `journal.service`; the
    matching client setting for siteA's workers (`sites.siteB.journal_service`) is in
    `journal-service/client.yaml`, to add when replication should cross the service
    (the demo replicates without it: docs/journal-service.md)."""
    import socket

    from vmrep.journal.service import make_certificate

    sd = d / "journal-service"
    ca, cert, key, thumb = make_certificate(sd, ["127.0.0.1", "localhost"])
    tokens = {}
    for name in ("siteA-writer", "siteB-admin"):
        f = sd / f"{name}.token"
        f.write_text(secrets.token_hex(24))
        f.chmod(0o600)
        tokens[name] = f
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = {"url": f"https://127.0.0.1:{port}", "credential": f"file:{tokens['siteA-writer']}",
              "tls": {"ca_file": str(ca)}}
    (sd / "client.yaml").write_text(yaml.safe_dump({"journal_service": client}, sort_keys=False))
    (sd / "thumbprint").write_text(thumb + "\n")
    return {"listen": f"127.0.0.1:{port}", "cert_file": str(cert), "key_file": str(key),
            "credentials": [
                {"name": "siteA-writer", "role": "writer", "site": "siteA", "token": f"file:{tokens['siteA-writer']}"},
                {"name": "siteB-admin", "role": "admin", "token": f"file:{tokens['siteB-admin']}"}]}


def lab_config(a: SiteProcess, b: SiteProcess, password_file: Path, journal: Path,
               database_url: str | None = None, notifications: dict[str, Any] | None = None,
               journal_service: dict[str, Any] | None = None) -> dict[str, Any]:
    def nic(live: str, test: str, base: int, i: int) -> dict[str, Any]:
        return {"live_network": live, "test_network": test,
                "live_ip": {"dhcp": False, "ip": f"10.20.{base}.{10 + i}", "netmask": "255.255.255.0",
                            "gateway": f"10.20.{base}.1", "dns": [f"10.20.{base}.2"]},
                "test_ip": {"dhcp": False, "ip": f"192.168.{base}.{10 + i}", "netmask": "255.255.255.0",
                            "gateway": f"192.168.{base}.1"}}

    extra: dict[str, Any] = {"database_url": database_url} if database_url else {}
    if notifications:
        extra["notifications"] = notifications
    return {
        **extra,
        "sites": {"siteA": _site_config(a, password_file), "siteB": _site_config(b, password_file)},
        "journal": {"path": str(journal), **({"service": journal_service} if journal_service else {})},
        "vpgs": [
            {
                "name": "erp",
                "protected_site": "siteA",
                "recovery_site": "siteB",
                "rpo_target_seconds": 60,
                "journal_history_hours": 1,
                "test_interval_months": 3,
                "recovery": {"cluster": "DC0_C0", "host": "DC0_C0_H0", "datastore": "LocalDS_0",
                             "live_network": "prod", "test_network": "dr-test"},
                "boot_groups": [{"name": "database", "delay_seconds": 1},
                                {"name": "application", "delay_seconds": 1},
                                {"name": "web", "delay_seconds": 0}],
                "vms": [
                    {"name": "erp-db", "boot_group": "database", "nics": [nic("prod", "dr-test", 1, 0)]},
                    {"name": "erp-app", "boot_group": "application", "nics": [nic("prod", "dr-test", 1, 1)]},
                    {"name": "erp-web", "boot_group": "web", "nics": [nic("prod", "dr-test", 1, 2)]},
                ],
                "email_to": ["dr-team@example.test"],
            },
            {
                "name": "files",
                "protected_site": "siteA",
                "recovery_site": "siteA",
                "rpo_target_seconds": 120,
                "journal_history_hours": 1,
                "recovery": {"host": "DC0_H0", "datastore": "LocalDS_1", "folder": "recovered",
                             "live_network": "prod", "test_network": "dr-test"},
                "vms": [{"name": "files-01", "recovery_datastore": "LocalDS_1"}],
            },
        ],
    }


@dataclass
class Lab:
    dir: Path
    config_path: Path
    sites: dict[str, SiteProcess] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)  # protected VM -> the IP it reported at 'lab up'

    def state(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "config": str(self.config_path),
                "sites": {k: v.to_json() for k, v in self.sites.items()}}


def up(base: Path | None = None, config_path: Path | None = None, *, boot_delay: str = "1s",
       seed: int = 1, database_url: str | None = None, notifications: dict[str, Any] | None = None) -> Lab:
    d = lab_dir(base)
    if (d / "lab.json").exists():
        existing = json.loads((d / "lab.json").read_text())
        if all(_is_our_launcher(int(s["pid"])) for s in existing["sites"].values()):
            raise LabError(f"a lab is already running (state in {d / 'lab.json'}); run 'vmrep lab down' first")
        down(base)
    d.mkdir(parents=True, exist_ok=True)
    config_path = (config_path or Path("vmrep.yaml")).resolve()
    lab = Lab(dir=d, config_path=config_path)
    rng = random.Random(seed)
    password_file = d / "password"
    password = secrets.token_hex(16)
    password_file.write_text(password)
    password_file.chmod(0o600)
    try:
        for name in ("siteA", "siteB"):
            lab.sites[name] = start_site(name, d / name, boot_delay=boot_delay, password_file=password_file)
        (d / "lab.json").write_text(json.dumps(lab.state(), indent=2))
        a = connect_site(lab.sites["siteA"], "siteA", password)
        b = connect_site(lab.sites["siteB"], "siteB", password)
        try:
            seed_site(a, lab.sites["siteA"], DEFAULT_VMS, rng)
            add_portgroups(a, ["prod", "dr-test"])
            add_portgroups(b, ["prod", "dr-test"])
            dc = _find(a, vim.Datacenter, "DC0")
            from vmrep.vsphere.property import retrieve_one
            vm_folder = retrieve_one(a, dc, ["vmFolder"]).get("vmFolder")
            a.call("folder recovered", vm_folder.CreateFolder, "recovered")
            # Protected VMs run, as in production: guests write, shutdown policies have
            # something to shut down.
            lab.ips = power_on(a, [v.name for v in DEFAULT_VMS])
        finally:
            a.close()
            b.close()
        config_path.write_text(
            "# Written by 'vmrep lab up': a two-site lab (siteA protected, siteB recovery).\n"
            + yaml.safe_dump(lab_config(lab.sites["siteA"], lab.sites["siteB"], password_file, d / "journal",
                                        database_url, notifications, journal_service_files(d)),
                             sort_keys=False))
        (d / "lab.json").write_text(json.dumps(lab.state(), indent=2))
        return lab
    except BaseException:
        for s in lab.sites.values():
            stop_site(s)
        raise


def down(base: Path | None = None) -> list[str]:
    d = lab_dir(base)
    state_file = d / "lab.json"
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    stopped = []
    for name, s in state["sites"].items():
        stop_site(s)
        stopped.append(name)
    shutil.rmtree(d, ignore_errors=True)
    return stopped


SITE_STATES = ("up", "down", "hang")


def _site_state(control_url: str) -> str | None:
    """What the launcher's site switch says ('up', 'down', 'hang'), None if it does not answer."""
    import requests

    try:
        r = requests.get(f"{control_url.rstrip('/')}/site", timeout=5)
        r.raise_for_status()
        return str(r.json()["state"])
    except (requests.RequestException, ValueError, KeyError):
        return None


def set_site_state(site: str, state: str, base: Path | None = None) -> dict[str, Any]:
    """Take a lab site off the network ('down': connections refused; 'hang': connections
    accepted, never answered) or bring it back ('up': same port, same inventory, disks and
    power states: the launcher process keeps running throughout)."""
    import requests

    if state not in SITE_STATES:
        raise LabError(f"site state {state!r}: not one of {', '.join(SITE_STATES)}")
    d = lab_dir(base)
    if not (d / "lab.json").exists():
        raise LabError(f"lab site {site!r}: no lab running (run 'vmrep lab up' first)")
    sites = json.loads((d / "lab.json").read_text())["sites"]
    if site not in sites:
        raise LabError(f"lab site {site!r} not found (sites: {', '.join(sorted(sites))})")
    s = sites[site]
    if not _is_our_launcher(int(s["pid"])):
        raise LabError(f"lab site {site} is not running (pid {s['pid']} gone); run 'vmrep lab up'")
    try:
        r = requests.post(f"{s['control_url'].rstrip('/')}/site", json={"state": state}, timeout=15)
    except requests.RequestException as exc:
        raise LabError(f"lab site {site}: control endpoint {s['control_url']} not answering: {exc}") from None
    if r.status_code != 200:
        raise LabError(f"lab site {site}: {state} failed: {r.text.strip()}")
    return {"site": site, **r.json()}


def status(base: Path | None = None) -> dict[str, Any]:
    d = lab_dir(base)
    state_file = d / "lab.json"
    if not state_file.exists():
        return {"running": False, "sites": {}}
    state = json.loads(state_file.read_text())
    sites: dict[str, dict[str, Any]] = {}
    for name, s in state["sites"].items():
        alive = _is_our_launcher(int(s["pid"]))
        # A site taken down by 'lab site-down' keeps its process: running, but not reachable.
        site_state = _site_state(s["control_url"]) if alive else None
        sites[name] = {"url": s["url"], "pid": s["pid"], "running": alive,
                       "state": site_state if alive else "stopped",
                       "reachable": alive and site_state == "up"}
    return {"running": all(s["running"] for s in sites.values()), "config": state.get("config"), "sites": sites}


def load(base: Path | None = None) -> Lab:
    d = lab_dir(base)
    state = json.loads((d / "lab.json").read_text())
    return Lab(dir=d, config_path=Path(state["config"]),
               sites={k: SiteProcess(**v) for k, v in state["sites"].items()})


if __name__ == "__main__":  # pragma: no cover - manual use
    print(json.dumps(up().state(), indent=2), file=sys.stdout)
