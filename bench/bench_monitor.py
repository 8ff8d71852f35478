"""The monitor pass at 1,000 and 5,000 VMs: kept watch (changes only) against a full read
and a naive per-attribute loop.

    .venv/bin/python bench/bench_monitor.py [--sizes 1000,5000] [--vpg-size 10] [--repeat 3]
    .venv/bin/python bench/bench_monitor.py --sizes 1000 --rtt-ms 20     # as across a WAN

For each size, a lab site (one simulator process, `vms_per_pool` = size / 2: the default
model has two pools) is started, and with the same logged-in client:

- pass, nothing changed: `vmrep.monitor.monitor_pass` over VPGs of `--vpg-size` VMs
  covering every VM (local VPGs on that site), its watch kept from the previous pass: one
  WaitForUpdatesEx per site, no VM decoded again, then per VPG the judgement, alerts and a
  sample, all in one store transaction;
- pass, 5 % changed: the same after the annotation of 5 % of the VMs was changed
  (ReconfigVM_Task, untimed): the changes taken, those VMs decoded again;
- pass, full read: the same pass with the watch dropped first, so it reads and decodes the
  whole inventory, as every pass did before the watch (and as the first pass of a run and
  the pass after a fault still do);
- inventory read: `Inventory(client).vms()` alone (RetrievePropertiesEx), the read part
  of the full-read pass;
- naive loop: pyVmomi's lazy attributes VM by VM, as a script would read the same facts:
  vm.name, vm.config.hardware.device, vm.config.annotation, vm.runtime.powerState,
  vm.guest.toolsRunningStatus / ipAddress, vm.guestHeartbeatStatus, vm.customValue
  (`--naive-max` VMs at most: it is the slow one; its time is scaled to the size).

SOAP round trips come from the launcher's control endpoint (GET /calls, reset before each
variant); wall time is measured around the variant. vmrep's figures are medians of
`--repeat` runs; the naive loop runs once. Ratios are the full-read pass's and the naive
loop's time over the variant's. Not part of pytest.
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


def naive_loop(client: Any, limit: int) -> int:
    """What a script does with pyVmomi's lazy attributes: a property read per access."""
    from pyVmomi import vim

    content = client.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        n = 0
        for vm in list(view.view)[:limit]:
            name = vm.name
            devices = vm.config.hardware.device
            notes = vm.config.annotation
            power = vm.runtime.powerState
            guest = vm.guest
            tools, ip = guest.toolsRunningStatus, guest.ipAddress
            heartbeat = vm.guestHeartbeatStatus
            custom = vm.customValue
            n += bool(name) + len(devices) * 0 + bool(notes or power or tools or ip or heartbeat or custom)
        return min(limit, len(view.view))
    finally:
        view.DestroyView()


def change_notes(client: Any, vms: list[Any], tag: str) -> None:
    """Change the annotation of `vms` (all tasks started, then waited for): untimed."""
    from pyVmomi import vim

    from vmrep.vsphere.task import wait_for_task

    tasks = [vm.ref.ReconfigVM_Task(vim.vm.ConfigSpec(annotation=f"bench {tag}")) for vm in vms]
    for vm, t in zip(vms, tasks, strict=True):
        wait_for_task(client, t, vm.name)


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


def run_size(size: int, vpg_size: int, repeat: int, naive_max: int, rtt_ms: int = 0,
             changed_share: float = 0.05, changed_repeat: int = 1) -> dict[str, Any]:
    from vmrep.monitor import monitor_pass, site_watches
    from vmrep.runtime import forget_runtime, get_runtime
    from vmrep.vsphere.inventory import Inventory

    with tempfile.TemporaryDirectory(prefix=f"bench-monitor-{size}-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        site = manage.start_site(f"bench{size}", d / "site", vms_per_pool=size // 2, timeout=600)
        started = time.perf_counter() - t0
        try:
            control = site.control_url.rstrip("/")
            client = manage.connect_site(site, "s")
            try:
                vms = Inventory(client).vms()
                names = sorted(v.name for v in vms)
                config = write_config(d, site, names, vpg_size)
                rt = get_runtime(config)
                rt.client("s")  # log in before measuring
                monitor_pass(rt)  # the runtime rows exist; guest state settled below
                time.sleep(3)
                add_latency(control, rtt_ms)
                res: dict[str, Any] = {"vms": len(names), "vpgs": len(rt.config.vpgs), "site_start_s": started}

                def entry(runs: list[tuple[float, int, dict[str, int], Any]]) -> dict[str, Any]:
                    return {"wall_s": statistics.median(w for w, *_ in runs), "soap": runs[0][1],
                            "calls": runs[0][2], "runs": [w for w, *_ in runs]}

                def full_pass() -> Any:
                    site_watches(rt).close()  # as at a run's start or after a fault
                    return monitor_pass(rt)

                def waited() -> float:  # seconds the last pass waited for the simulator's WaitForUpdatesEx
                    w = site_watches(rt).watches.get("s")
                    return w.last.wait_seconds if w is not None else 0.0

                monitor_pass(rt)
                runs, waits = [], []
                for _ in range(repeat):
                    runs.append(measure(control, lambda: monitor_pass(rt)))
                    waits.append(waited())
                res["unchanged_pass"] = entry(runs)
                res["unchanged_pass"]["wait_s"] = statistics.median(waits)
                res["full_pass"] = entry([measure(control, full_pass) for _ in range(repeat)])
                res["inventory"] = entry([measure(control, lambda: Inventory(rt.client("s")).vms())
                                          for _ in range(repeat)])
                if naive_max:
                    w, s, c, n = measure(control, lambda: naive_loop(client, naive_max))
                    res["naive"] = {"wall_s": w * len(names) / n, "soap": s * len(names) // n, "calls": c,
                                    "measured_vms": n, "measured_wall_s": w}
                monitor_pass(rt)
                step = max(1, round(1 / changed_share))
                runs, waits = [], []
                for i in range(changed_repeat):
                    change_notes(client, vms[i % step::step], f"{i}")
                    time.sleep(1)  # the changes reach the collector's queue
                    runs.append(measure(control, lambda: monitor_pass(rt)))
                    waits.append(waited())
                res["changed_pass"] = entry(runs)
                res["changed_pass"]["vms_changed"] = len(vms[::step])
                res["changed_pass"]["wait_s"] = statistics.median(waits)
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
    ap.add_argument("--naive-max", type=int, default=500,
                    help="VMs the naive loop reads (its time is scaled to the size; 0: skip it)")
    ap.add_argument("--changed", type=float, default=0.05, help="share of VMs changed before a pass")
    ap.add_argument("--changed-repeat", type=int, default=1,
                    help="passes after a change (--changed of the VMs changed anew before each)")
    ap.add_argument("--rtt-ms", type=int, default=0,
                    help="added latency per SOAP request (the launcher's delay rule), as to a remote vCenter")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = ap.parse_args(argv)
    results = {}
    for size in (int(s) for s in a.sizes.split(",")):
        print(f"{size} VMs ...", flush=True)
        results[size] = r = run_size(size, a.vpg_size, a.repeat, a.naive_max, a.rtt_ms, a.changed, a.changed_repeat)
        print(f"  site started in {r['site_start_s']:.1f}s; {r['vms']} VMs in {r['vpgs']} VPGs", flush=True)
        print("  " + json.dumps({k: {x: y for x, y in v.items() if x != "calls"} if isinstance(v, dict) else v
                                 for k, v in r.items()}, default=str), flush=True)
    print()
    if a.rtt_ms:
        print(f"with {a.rtt_ms} ms added to every SOAP request")
    head = (f"{'VMs':>6} {'variant':<30} {'SOAP calls':>10} {'wall s':>8} "
            f"{'full pass/this':>15} {'naive/this':>11}")
    print(head)
    print("-" * len(head))
    for r in results.values():
        full, naive = r["full_pass"], r.get("naive")
        for key, label in (("unchanged_pass", "pass, nothing changed"),
                           ("changed_pass", f"pass, {r['changed_pass']['vms_changed']} VMs changed"),
                           ("full_pass", "pass, full read (before)"), ("inventory", "inventory read alone"),
                           ("naive", "naive per-attribute (scaled)")):
            v = r.get(key)
            if v is None:
                continue
            rf = f"{full['wall_s'] / v['wall_s']:.1f}x" if key != "naive" else "-"
            rn = f"{naive['wall_s'] / v['wall_s']:.1f}x" if naive and key != "naive" else "-"
            wait = f"  (of which {v['wait_s']:.2f} s waiting for WaitForUpdatesEx)" if "wait_s" in v else ""
            print(f"{r['vms']:>6} {label:<30} {v['soap']:>10} {v['wall_s']:>8.2f} {rf:>15} {rn:>11}{wait}")
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"bench_monitor{f'-rtt{a.rtt_ms}ms' if a.rtt_ms else ''}.json"
    (a.out / name).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nraw figures: {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
