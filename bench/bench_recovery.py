"""Recovery benchmarks.

    .venv/bin/python bench/bench_recovery.py [--vms 20] [--size-gib 2] [--no-prefect] [--out bench/out]

1. Test failover of a VPG of 20 VMs in 3 boot groups with zero delays, in a two-site
   lab: the operation's wall time next to the sum of its steps run one after another
   (each step per VM as recorded in the state database), printed as a ratio (how much the
   steps overlap). Run by the engine directly and, unless --no-prefect, as the Prefect
   flow (one task run per step per VM; the ephemeral server's start is not counted).
2. Writing a 2 GiB disk (1 GiB random, 1 GiB zeros) as of a checkpoint to a datastore
   mounted on this host, next to `cp` of the same bytes (sparse source, page cache warm
   for both); and the block-by-block verification of the written copy. Medians of 3.

Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")  # the report e-mail of a lab without SMTP is noise here

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------------------
# 1. Test failover of 20 VMs


def lab_with_vpg(work: Path, n: int, disk_mib: int) -> tuple[Any, Path]:
    import yaml

    from lab import manage

    d = work / "lab"
    sites = {name: manage.start_site(name, d / name, boot_delay="200ms") for name in ("siteA", "siteB")}
    pw = d / "password"
    pw.write_text("bench")
    pw.chmod(0o600)
    seeds = [manage.VMSeed(f"app-{i:02d}", [manage.DiskSeed(disk_mib, [(0.0, 0.25)])]) for i in range(n)]
    a = manage.connect_site(sites["siteA"], "siteA")
    b = manage.connect_site(sites["siteB"], "siteB")
    try:
        manage.seed_site(a, sites["siteA"], seeds, random.Random(1))
        manage.add_portgroups(a, ["prod", "dr-test"])
        manage.add_portgroups(b, ["prod", "dr-test"])
    finally:
        a.close()
        b.close()
    groups = ["database", "application", "web"]
    cfg = {
        "database_url": f"sqlite:///{work / 'state.db'}",
        "sites": {k: manage._site_config(v, pw) for k, v in sites.items()},  # noqa: SLF001
        "journal": {"path": str(work / "journal")},
        "vpgs": [{
            "name": "bench", "protected_site": "siteA", "recovery_site": "siteB",
            "recovery": {"host": "DC0_C0_H0", "datastore": "LocalDS_0", "live_network": "prod",
                         "test_network": "dr-test"},
            "boot_groups": [{"name": g, "delay_seconds": 0} for g in groups],
            "vms": [{"name": s.name, "boot_group": groups[i * len(groups) // n],
                     "nics": [{"live_network": "prod", "test_network": "dr-test",
                               "test_ip": {"dhcp": False, "ip": f"192.168.50.{10 + i}",
                                           "netmask": "255.255.255.0"}}]}
                    for i, s in enumerate(seeds)],
        }],
    }
    path = work / "vmrep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return sites, path


def bench_test_failover(work: Path, n: int, disk_mib: int, prefect: bool) -> list[dict[str, Any]]:
    from lab import manage
    from vmrep.recovery import operations as ops
    from vmrep.replication import engine
    from vmrep.runtime import forget_runtime, get_runtime

    sites, cfg = lab_with_vpg(work, n, disk_mib)
    rows = []
    try:
        rt = get_runtime(cfg)
        t0 = time.perf_counter()
        engine.initial_sync(rt, rt.config.vpg("bench"))
        rt.store.update_runtime("bench", initial_sync_done=True)
        print(f"initial sync of {n} VMs x {disk_mib} MiB: {time.perf_counter() - t0:.2f}s", flush=True)
        runs: list[tuple[str, Any]] = [("engine (direct)", lambda: ops.run_test(str(cfg), "bench",
                                                                                verify_timeout=60))]
        if prefect:
            from flows.dr_test import dr_test

            runs.append(("Prefect flow", lambda: dr_test("bench", str(cfg), verify_timeout=60)))
        for label, fn in runs:
            s = fn()
            assert s["success"], s.get("error")
            per_step: dict[str, float] = {}
            for vm_steps in s["steps"].values():
                for st in vm_steps:
                    per_step[st["step"]] = per_step.get(st["step"], 0.0) + (st["seconds"] or 0.0)
            row = {"run": label, "vms": n, "wall_seconds": s["wall_seconds"], "steps_seconds": s["steps_seconds"],
                   "ratio": s["steps_seconds"] / s["wall_seconds"], "rto_seconds": s["rto_seconds"],
                   "by_step": {k: round(v, 3) for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])}}
            rows.append(row)
            print(f"{label:16s} wall {row['wall_seconds']:6.2f}s   steps one after another "
                  f"{row['steps_seconds']:6.2f}s   ratio {row['ratio']:.2f}x   RTO {row['rto_seconds']:.2f}s",
                  flush=True)
            print("    " + ", ".join(f"{k} {v:.2f}s" for k, v in row["by_step"].items()), flush=True)
    finally:
        forget_runtime(cfg)
        for s in sites.values():
            manage.stop_site(s)
    return rows


# --------------------------------------------------------------------------------------
# 2. A 2 GiB disk as of a checkpoint vs cp


def make_image(path: Path, size: int) -> None:
    half = size // 2
    rng = random.Random(7)
    with open(path, "wb") as f:
        left = half
        while left:
            n = min(left, 64 * MiB)
            f.write(rng.randbytes(n))
            left -= n
        f.truncate(size)  # the zero half is a hole, as on a thin disk


def bench_disk_write(work: Path, size: int) -> dict[str, Any]:
    from test_recovery import FakeDatastores

    from vmrep.journal import Journal
    from vmrep.recovery.disks import compare_disk, write_disk
    from vmrep.replication.blocks import LocalFileSource, sync_disk

    image = work / "disk.img"
    make_image(image, size)
    j = Journal.open(work / "journal2", block_size=MiB)
    t0 = time.perf_counter()
    with j.begin("b") as w:
        with LocalFileSource(image) as src:
            sync_disk(w, "vm", "scsi0:0", src, previous=None)
        cp = w.commit()
    print(f"journal: {size / GiB:.1f} GiB disk stored in {time.perf_counter() - t0:.2f}s", flush=True)
    ds = FakeDatastores({"ds": work / "ds"})
    desc = "[ds] vmrep-test-b/vm/scsi0-0.vmdk"
    flat = work / "ds" / "vmrep-test-b" / "vm" / "scsi0-0-flat.vmdk"
    vm_t, cp_t, cp_nosync_t, ver_t = [], [], [], []
    for _ in range(3):
        shutil.rmtree(work / "ds", ignore_errors=True)
        t = time.perf_counter()
        r = write_disk(j, ds, "b", cp.id, "vm", "scsi0:0", desc, threads=2)
        vm_t.append(time.perf_counter() - t)
        assert not r.skipped and not r.bad_blocks
        t = time.perf_counter()
        c = compare_disk(j, ds, "b", cp.id, "vm", "scsi0:0", desc[:-5] + "-flat.vmdk", threads=2)
        ver_t.append(time.perf_counter() - t)
        assert c.ok
        copy = work / "copy.img"
        copy.unlink(missing_ok=True)
        os.sync()
        t = time.perf_counter()
        subprocess.run(["cp", str(image), str(copy)], check=True)
        cp_nosync_t.append(time.perf_counter() - t)
        os.sync()
        cp_t.append(time.perf_counter() - t)
    assert flat.stat().st_size == size
    out = {"size_gib": size / GiB, "vmrep_write_seconds": statistics.median(vm_t),
           "cp_seconds": statistics.median(cp_t), "cp_without_sync_seconds": statistics.median(cp_nosync_t),
           "verify_seconds": statistics.median(ver_t)}
    out["ratio"] = out["vmrep_write_seconds"] / out["cp_seconds"]
    print(f"disk as of checkpoint ({size / GiB:.1f} GiB): vmrep {out['vmrep_write_seconds']:.2f}s (written, "
          f"hash-checked, fsynced)   cp + sync {out['cp_seconds']:.2f}s   ratio {out['ratio']:.2f}x   "
          f"(cp alone, not yet on disk: {out['cp_without_sync_seconds']:.2f}s)", flush=True)
    print(f"block-by-block verification of the written copy: {out['verify_seconds']:.2f}s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--disk-mib", type=int, default=16, help="size of each lab VM's disk")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--no-prefect", action="store_true")
    ap.add_argument("--skip-disk", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrep-bench-recovery-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        os.environ.setdefault("VMREP_HOME", str(work / "home"))
        result: dict[str, Any] = {"test_failover": bench_test_failover(work / "t", args.vms, args.disk_mib,
                                                                       not args.no_prefect)}
        if not args.skip_disk:
            (work / "d").mkdir()
            result["disk_write"] = bench_disk_write(work / "d", int(args.size_gib * GiB))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
