"""The monitor's vSphere reads against a naive per-attribute loop, on lab inventories of
1,000 and 5,000 VMs.

    .venv/bin/python bench/bench_monitor.py [--sizes 1000,5000] [--vpg-size 10] [--repeat 3]
    .venv/bin/python bench/bench_monitor.py --sizes 1000 --rtt-ms 20     # as across a WAN

For each size, a lab site (one simulator process, `vms_per_pool` = size / 2: the default
model has two pools) is started, and with the same logged-in client:

- vmrep inventory: `Inventory(client).vms()`, every VM with its devices, power state,
  guest state, notes, custom values and snapshots, plus the networks and custom field
  names: what the monitor reads from vSphere;
- vmrep monitor pass: `vmrep.monitor.monitor_pass` over VPGs of `--vpg-size` VMs covering
  every VM (local VPGs on that site): the inventory read, then per VPG the judgement,
  alerts and one stored sample;
- naive loop: pyVmomi's lazy attributes VM by VM, as a script would read the same facts:
  vm.name, vm.config.hardware.device, vm.config.annotation, vm.runtime.powerState,
  vm.guest.toolsRunningStatus / ipAddress, vm.guestHeartbeatStatus, vm.customValue.

SOAP round trips come from the launcher's control endpoint (GET /calls, reset before each
variant); wall time is measured around the variant. vmrep's figures are medians of
`--repeat` runs; the naive loop runs once (it is the slow one). Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
import yaml  # noqa: E402

from lab import manage  # noqa: E402


def calls(control: str) -> dict[str, int]:
    r = requests.get(f"{control}/calls", timeout=10)
    r.raise_for_status()
    return r.json()


def reset(control: str) -> None:
    requests.delete(f"{control}/calls", timeout=10).raise_for_status()


def soap(counts: dict[str, int]) -> int:
    return sum(n for k, n in counts.items() if not k.startswith("DatastoreFile"))


def measure(control: str, fn: Callable[[], Any]) -> tuple[float, int, dict[str, int], Any]:
    reset(control)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    c = calls(control)
    return wall, soap(c), c, out


def naive_loop(client: Any) -> int:
    """What a script does with pyVmomi's lazy attributes: a property read per access."""
    from pyVmomi import vim

    content = client.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        n = 0
        for vm in view.view:
            name = vm.name
            devices = vm.config.hardware.device
            notes = vm.config.annotation
            power = vm.runtime.powerState
            guest = vm.guest
            tools, ip = guest.toolsRunningStatus, guest.ipAddress
            heartbeat = vm.guestHeartbeatStatus
            custom = vm.customValue
            n += bool(name) + len(devices) * 0 + bool(notes or power or tools or ip or heartbeat or custom)
        return len(view.view)
    finally:
        view.DestroyView()


def write_config(d: Path, site: manage.SiteProcess, vm_names: list[str], vpg_size: int) -> Path:
    pw = d / "password"
    pw.write_text("bench")
    pw.chmod(0o600)
    vpgs = []
    for i in range(0, len(vm_names), vpg_size):
        names = vm_names[i:i + vpg_size]
        vpgs.append({"name": f"vpg{i // vpg_size:04d}", "protected_site": "s", "recovery_site": "s",
                     "vms": [{"name": n} for n in names], "rpo_target_seconds": 300})
    cfg = {"database_url": f"sqlite:///{d / 'state.db'}", "journal": {"path": str(d / "journal")},
           "sites": {"s": {"host": site.host, "user": "bench", "password": {"file": str(pw)},
                           "tls": {"ca_file": site.ca_file}, "datastore_mounts": dict(site.datastores)}},
           "vpgs": vpgs}
    p = d / "vmrep.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def add_latency(control: str, ms: int) -> None:
    """Every SOAP request waits `ms` before it is served: a vCenter across a WAN."""
    if ms > 0:
        requests.post(f"{control}/faults", json={"method": "*", "action": "delay", "delay_ms": ms, "count": 0},
                      timeout=10).raise_for_status()


def run_size(size: int, vpg_size: int, repeat: int, naive: bool, rtt_ms: int = 0) -> dict[str, Any]:
    from vmrep.monitor import monitor_pass
    from vmrep.runtime import forget_runtime, get_runtime
    from vmrep.vsphere.inventory import Inventory

    with tempfile.TemporaryDirectory(prefix=f"bench-monitor-{size}-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        site = manage.start_site(f"bench{size}", d / "site", vms_per_pool=size // 2, timeout=300)
        started = time.perf_counter() - t0
        try:
            control = site.control_url.rstrip("/")
            client = manage.connect_site(site, "s")
            try:
                names = sorted(v.name for v in Inventory(client).vms())
                config = write_config(d, site, names, vpg_size)
                rt = get_runtime(config)
                rt.client("s")  # log in before measuring
                add_latency(control, rtt_ms)
                res: dict[str, Any] = {"vms": len(names), "vpgs": len(rt.config.vpgs), "site_start_s": started}

                inv = [measure(control, lambda: Inventory(rt.client("s")).vms()) for _ in range(repeat)]
                res["inventory"] = {"wall_s": statistics.median(w for w, *_ in inv), "soap": inv[0][1],
                                    "calls": inv[0][2]}
                mon = [measure(control, lambda: monitor_pass(rt)) for _ in range(repeat)]
                res["monitor_pass"] = {"wall_s": statistics.median(w for w, *_ in mon), "soap": mon[0][1],
                                       "calls": mon[0][2]}
                if naive:
                    w, s, c, n = measure(control, lambda: naive_loop(client))
                    assert n == len(names), (n, len(names))
                    res["naive"] = {"wall_s": w, "soap": s, "calls": c}
                forget_runtime(config)
            finally:
                client.close()
        finally:
            manage.stop_site(site)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000", help="VM counts (even numbers)")
    ap.add_argument("--vpg-size", type=int, default=10, help="VMs per VPG in the monitor pass")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    ap.add_argument("--rtt-ms", type=int, default=0,
                    help="added latency per SOAP request (the launcher's delay rule), as to a remote vCenter")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = ap.parse_args(argv)
    results = {}
    for size in (int(s) for s in a.sizes.split(",")):
        print(f"{size} VMs ...", flush=True)
        results[size] = r = run_size(size, a.vpg_size, a.repeat, not a.no_naive, a.rtt_ms)
        print(f"  site started in {r['site_start_s']:.1f}s; {r['vms']} VMs in {r['vpgs']} VPGs", flush=True)
    print()
    if a.rtt_ms:
        print(f"with {a.rtt_ms} ms added to every SOAP request")
    head = (f"{'VMs':>6} {'variant':<22} {'SOAP calls':>10} {'wall s':>8} "
            f"{'naive/this (calls)':>19} {'naive/this (time)':>18}")
    print(head)
    print("-" * len(head))
    for r in results.values():
        naive = r.get("naive")
        for key, label in (("inventory", "vmrep inventory read"), ("monitor_pass", "vmrep monitor pass"),
                           ("naive", "naive per-attribute")):
            v = r.get(key)
            if v is None:
                continue
            rc = f"{naive['soap'] / v['soap']:.0f}x" if naive and key != "naive" else "-"
            rt = f"{naive['wall_s'] / v['wall_s']:.1f}x" if naive and key != "naive" else "-"
            print(f"{r['vms']:>6} {label:<22} {v['soap']:>10} {v['wall_s']:>8.2f} {rc:>19} {rt:>18}")
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"bench_monitor{f'-rtt{a.rtt_ms}ms' if a.rtt_ms else ''}.json"
    (a.out / name).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nraw figures: {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
