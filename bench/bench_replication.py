"""vmrep's block engine and journal against borg, restic and rsync on one disk image.

    .venv/bin/python bench/bench_replication.py [--size-gib 2] [--out bench/out]
    .venv/bin/python bench/bench_replication.py --block-sizes 256K,1M,4M   # vmrep only

Creates an image (half random, half zeros), then in one run: initial copy by every tool;
then, three times each, change 1 % of the 1 MiB blocks at random and let every tool take
the change (vmrep by hash scan and given the changed-block list, restic, borg with fixed
1 MiB chunks, rsync delta onto its previous copy); the same at 10 %; `cat` as the read
limit; vmrep restore_disk against cp. Medians of the three cycles. Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import drop_tree, du, ensure_peers, peer_env, run  # noqa: E402

from vmrep.journal import Journal  # noqa: E402
from vmrep.replication.blocks import LocalFileSource, resident_fraction, sync_disk  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
VPG, VM, DISK = "bench", "vm1", "disk1"


@dataclass
class Row:
    scenario: str
    tool: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    read: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    note: str = ""

    @property
    def t(self) -> float:
        return statistics.median(self.seconds)

    @property
    def c(self) -> float:
        return statistics.median(self.cpu) if self.cpu else -1.0

    @property
    def r(self) -> int:
        return int(statistics.median(self.read)) if self.read else -1

    @property
    def s(self) -> int:
        return int(statistics.median(self.stored)) if self.stored else -1


def cpu_total() -> float:
    """CPU seconds (user + system) of this process and its waited-for children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


_cpu_mark = [0.0, 0.0]  # at the start of the timed section, CPU used by it


def mark() -> None:
    _cpu_mark[0] = cpu_total()


def stop() -> None:
    _cpu_mark[1] = cpu_total() - _cpu_mark[0]


def human(n: int) -> str:
    if n < 0:
        return "-"
    for unit, f in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": MiB, "G": GiB}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def make_image(path: Path, size: int) -> None:
    half = size // 2
    with open(path, "wb") as f:
        left = half
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
        zero = bytes(64 * MiB)
        left = size - half
        while left:
            n = min(left, len(zero))
            f.write(zero[:n])
            left -= n


def change_image(path: Path, size: int, percent: float, rng: random.Random) -> list[tuple[int, int]]:
    """Overwrite `percent` % of the 1 MiB blocks with random data; return the ranges."""
    nblocks = size // MiB
    k = max(1, int(nblocks * percent / 100))
    picked = sorted(rng.sample(range(nblocks), k))
    with open(path, "r+b") as f:
        for b in picked:
            f.seek(b * MiB)
            f.write(os.urandom(MiB))
    return [(b * MiB, MiB) for b in picked]


def scatter_small_writes(path: Path, size: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    out = []
    with open(path, "r+b") as f:
        for _ in range(count):
            off = rng.randrange(size // 4096) * 4096
            f.seek(off)
            f.write(os.urandom(4096))
            out.append((off, 4096))
    return out


def meminfo_mib() -> tuple[int, int]:
    """(Dirty, Writeback) of the whole machine, MiB: pages other writers leave to flush."""
    d: dict[str, int] = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":", 1)
        d[k] = int(v.split()[0]) // 1024
    return d.get("Dirty", -1), d.get("Writeback", -1)


def cached_share(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        return resident_fraction(fd, 0, os.fstat(fd).st_size) or 0.0
    finally:
        os.close(fd)


def set_regime(image: Path, regime: str) -> str:
    """Put the image in the page-cache regime asked for (untimed) and say what it is.

    hot: read once (every page cached, as right after the guest wrote it); cold: dirty
    pages written out, then the image's pages dropped (POSIX_FADV_DONTNEED: this file
    only, nobody else's cache), as for a disk not read since the host booted."""
    os.sync()
    if regime == "cold":
        fd = os.open(image, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    else:
        subprocess.run(f"cat '{image}' > /dev/null", shell=True, check=True)
    dirty, wb = meminfo_mib()
    # The machine's load too: on 2 shared CPUs the same work's CPU seconds grow with it
    # (cache and memory bandwidth shared with the other runs), hot or cold alike.
    load = os.getloadavg()[0]
    return (f"{regime}: {cached_share(image):.0%} of the image in the page cache, dirty {dirty} MiB, "
            f"writeback {wb} MiB, load {load:.1f}")


class VmrepPeer:
    """A journal kept across cycles, as the replication service keeps one."""

    def __init__(self, root: Path, block_size: int, cbt: bool) -> None:
        self.root = root
        drop_tree(root)
        self.j = Journal.open(root, block_size=block_size, compression_level=1)
        self.cbt = cbt

    def cycle(self, image: Path, ranges: list[tuple[int, int]] | None) -> tuple[float, int, int]:
        before = du(self.root)
        os.sync()  # as for the peers: start without anyone else's dirty pages
        mark()
        t0 = time.perf_counter()
        cps = self.j.checkpoints(VPG)
        prev = self.j.block_map(VPG, cps[-1].id, VM, DISK) if cps else None
        with self.j.begin(VPG) as w, LocalFileSource(image) as src:
            st = sync_disk(w, VM, DISK, src, previous=prev,
                           changed_ranges=ranges if (self.cbt and prev is not None) else None, threads=2)
            w.commit()
        dt = time.perf_counter() - t0
        stop()
        self.reads = dict(src.reads)
        return dt, st.bytes_read, du(self.root) - before


def bench_vmrep_only(args: argparse.Namespace, work: Path, image: Path, size: int) -> None:
    """Block-size sweep: vmrep alone, 1 % of 1 MiB blocks and scattered 4 KiB writes."""
    rng = random.Random(7)
    lines = ["| block size | initial s | +1 % (1 MiB extents) s / stored | +1 % CBT s | "
             "2048 × 4 KiB writes s / stored | restore s | journal after |", "|---|---|---|---|---|---|---|"]
    for bs_s in args.block_sizes.split(","):
        bs = parse_size(bs_s)
        make_image(image, size)
        a = VmrepPeer(work / f"j-{bs}", bs, cbt=False)
        t_init, _, _ = a.cycle(image, None)
        inc, cbt, small = [], [], []
        for _ in range(args.repeat):
            ranges = change_image(image, size, 1, rng)
            inc.append(a.cycle(image, None))
            a.cbt = True
            ranges = change_image(image, size, 1, rng)
            cbt.append(a.cycle(image, ranges))
            ranges = scatter_small_writes(image, size, 2048, rng)
            small.append(a.cycle(image, ranges))
            a.cbt = False
        out = work / "restore.img"
        t0 = time.perf_counter()
        a.j.restore_disk(VPG, "latest", VM, DISK, out, fsync=False)
        t_rest = time.perf_counter() - t0
        assert out.read_bytes() == image.read_bytes(), "restore mismatch"
        out.unlink()

        def med(xs, k):
            return statistics.median(x[k] for x in xs)

        lines.append(
            f"| {human(bs)} | {t_init:.2f} | {med(inc, 0):.3f} / {human(int(med(inc, 2)))} | "
            f"{med(cbt, 0):.3f} | {med(small, 0):.3f} / {human(int(med(small, 2)))} | {t_rest:.2f} | "
            f"{human(du(a.root))} |"
        )
        a.j.close()
        drop_tree(a.root)
        print(lines[-1], flush=True)
    print("\n".join(lines))
    (Path(args.out) / "bench_block_sizes.md").write_text("\n".join(lines) + "\n")


def bench_lab(args: argparse.Namespace, out: Path) -> int:
    """A VPG of `--lab-vms` VMs with one `--lab-disk-mib` disk each in a two-site lab, its
    protected site read over HTTPS (/folder, as from a vCenter without NFS). Between
    cycles the guest of every VM writes 1 % (then 10 %) of its disk through the launcher
    (/guest/write, 1 MiB writes at random 1 MiB-aligned offsets); then one cycle by CBT
    and one by hash scan (two journals, same VMs), each's bytes read counted by the
    launcher (/served), and the floor: the changed bytes alone read over the same
    interface (2 threads, as a transfer). Medians of `--repeat`."""
    import tempfile

    import yaml
    from bench_recovery import lab_with_vpg

    from lab import manage
    from vmrep.replication import engine
    from vmrep.runtime import forget_runtime, get_runtime

    work = Path(tempfile.mkdtemp(prefix="vmrep-bench-lab-"))
    sites, cfg_path = lab_with_vpg(work, args.lab_vms, args.lab_disk_mib)
    ctl_url = sites["siteA"].control_url
    import requests

    http = requests.Session()
    rows: list[dict[str, object]] = []
    try:
        base = yaml.safe_load(cfg_path.read_text())
        base["sites"]["siteA"]["datastore_mounts"] = {}  # every read through /folder
        paths = {}
        for mode, tracking in (("cbt", "enable"), ("scan", "off")):
            c = json.loads(json.dumps(base))
            c["database_url"] = f"sqlite:///{work / f'state-{mode}.db'}"
            c["journal"] = {"path": str(work / f"journal-{mode}")}
            c["vpgs"][0]["change_tracking"] = tracking
            paths[mode] = work / f"vmrep-{mode}.yaml"
            paths[mode].write_text(yaml.safe_dump(c, sort_keys=False))
        rts = {m: get_runtime(p) for m, p in paths.items()}
        from vmrep.recovery import vms as vmops

        client = rts["cbt"].client("siteA")
        for sv in vmops.site_vms(client):  # production VMs run; their guests write
            if sv.name.startswith("app-"):
                vmops.power_on(client, sv.name, sv.ref)
        for m, rt in rts.items():
            t0 = time.perf_counter()
            r = engine.initial_sync(rt, rt.config.vpg("bench"))
            print(f"initial sync ({m}): {time.perf_counter() - t0:.2f} s, read {human(r.bytes_read)}", flush=True)
        vms = engine.vpg_vms(rts["cbt"], rts["cbt"].config.vpg("bench"))
        flats = {name: vm.disks[0].flat for name, vm in vms.items()}
        ds = rts["cbt"].datastores("siteA")
        rng = random.Random(3)
        disk_bytes = args.lab_disk_mib * MiB

        def served() -> int:
            return int(http.get(f"{ctl_url}/served", timeout=5).json()["DatastoreFile.GET"])

        for pct in (1, 10):
            for _ in range(args.repeat):
                written: list[tuple[str, int]] = []
                for name in vms:
                    n = max(1, disk_bytes * pct // 100 // MiB)
                    for b in rng.sample(range(args.lab_disk_mib), n):
                        r = http.post(f"{ctl_url}/guest/write", params={"vm": name, "disk": 0, "offset": b * MiB},
                                      data=os.urandom(MiB), timeout=60)
                        r.raise_for_status()
                        written.append((name, b * MiB))
                row: dict[str, object] = {"percent": pct, "changed": len(written) * MiB}
                for m, rt in rts.items():
                    http.delete(f"{ctl_url}/served", timeout=5)
                    t0 = time.perf_counter()
                    c = engine.run_cycle(rt, rt.config.vpg("bench"))
                    row[f"{m}_seconds"] = time.perf_counter() - t0
                    row[f"{m}_transfer_seconds"] = c.transfer_seconds
                    row[f"{m}_read"] = served()
                    row[f"{m}_methods"] = sorted({s.method for t in c.vms.values() for s in t.disks.values()})
                http.delete(f"{ctl_url}/served", timeout=5)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda w: ds.read(flats[w[0]], w[1], MiB), written))
                row["floor_seconds"] = time.perf_counter() - t0
                row["floor_read"] = served()
                rows.append(row)
                print(f"  +{pct} %: changed {human(int(row['changed']))}  "  # type: ignore[call-overload]
                      f"CBT {row['cbt_seconds']:.2f} s read {human(int(row['cbt_read']))}  "  # type: ignore[call-overload]
                      f"scan {row['scan_seconds']:.2f} s read {human(int(row['scan_read']))}  "  # type: ignore[call-overload]
                      f"floor {row['floor_seconds']:.2f} s", flush=True)
    finally:
        for p in list(locals().get("paths", {}).values()):
            forget_runtime(p)
        for site in sites.values():
            manage.stop_site(site)
        drop_tree(work)
    lines = [f"lab: VPG of {args.lab_vms} VMs x {args.lab_disk_mib} MiB disk, protected site read over /folder, "
             f"medians of {args.repeat}", "",
             "| guest writes | changed | CBT read | CBT cycle s | scan read | scan cycle s | floor s | "
             "CBT / floor | scan / CBT |", "|---|---|---|---|---|---|---|---|---|"]
    for pct in (1, 10):
        def med(k: str, pct: int = pct) -> float:
            return statistics.median(float(r[k]) for r in rows if r["percent"] == pct)  # type: ignore[arg-type]

        lines.append(f"| {pct} % of each disk | {human(int(med('changed')))} | {human(int(med('cbt_read')))} | "
                     f"{med('cbt_seconds'):.2f} | {human(int(med('scan_read')))} | {med('scan_seconds'):.2f} | "
                     f"{med('floor_seconds'):.2f} | {med('cbt_seconds') / med('floor_seconds'):.1f}× | "
                     f"{med('scan_seconds') / med('cbt_seconds'):.1f}× |")
    text = "\n".join(lines)
    print()
    print(text)
    (out / "bench_replication_lab.md").write_text(text + "\n")
    (out / "bench_replication_lab.json").write_text(json.dumps(rows, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--block-size", default="1M")
    ap.add_argument("--block-sizes", default=None, help="sweep vmrep alone over these block sizes")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--regimes", default="hot,cold",
                    help="page-cache regimes of the initial copy: hot (image cached), cold (dropped)")
    ap.add_argument("--lab", action="store_true", help="the lab VPG: CBT against hash scan against the floor")
    ap.add_argument("--lab-vms", type=int, default=3)
    ap.add_argument("--lab-disk-mib", type=int, default=1024)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if args.lab:
        out.mkdir(parents=True, exist_ok=True)
        return bench_lab(args, out)
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    drop_tree(work)
    work.mkdir(parents=True)
    size = int(args.size_gib * GiB) // MiB * MiB
    image = work / "disk.img"
    if args.block_sizes:
        bench_vmrep_only(args, work, image, size)
        drop_tree(work)
        return 0
    bs = parse_size(args.block_size)
    peers = [] if args.no_peers else ["borg", "restic", "rsync"]
    missing = ensure_peers(peers)
    for m in missing:
        print(f"warning: {m} is not installed; skipped", file=sys.stderr)
        peers.remove(m)
    env = peer_env(work)
    print(f"image {human(size)} (half random, half zeros), vmrep block size {human(bs)}, "
          f"{os.cpu_count()} CPUs", flush=True)
    make_image(image, size)
    rows: dict[tuple[str, str], Row] = {}

    def rec(scn: str, tool: str, t: float, read: int = -1, stored: int = -1, note: str = "") -> None:
        r = rows.setdefault((scn, tool), Row(scn, tool, note=note))
        r.seconds.append(t)
        r.cpu.append(_cpu_mark[1])
        if read >= 0:
            r.read.append(read)
        if stored >= 0:
            r.stored.append(stored)
        print(f"  {scn:>8} {tool:<22} {t:7.3f} s  cpu {r.cpu[-1]:6.3f} s  "
              f"read {human(read):>10}  stored {human(stored):>10}", flush=True)

    # read limit
    for _ in range(args.repeat):
        os.sync()
        mark()
        t0 = time.perf_counter()
        subprocess.run(f"cat '{image}' > /dev/null", shell=True, check=True)
        dt = time.perf_counter() - t0
        stop()
        rec("read", "cat image > /dev/null", dt, size, 0)

    # initial copies, in each page-cache regime asked for: the same copy costs 2-6x the
    # CPU when the image is not in the page cache (faulting it in page by page through
    # mmap, or for borg reading it through the cache); each line says which regime it ran in
    borg_repo, restic_repo, rsync_copy = work / "borg", work / "restic", work / "rsync-copy.img"
    regimes = [r for r in args.regimes.split(",") if r]
    keep: list[VmrepPeer] = []
    for regime in regimes:
        scn = f"initial {regime}"
        for k in range(3):
            p = VmrepPeer(work / f"vmrep-{regime}-{k}", bs, cbt=False)
            print(f"  {set_regime(image, regime)}", flush=True)
            t, rd, st = p.cycle(image, None)
            rec(scn, "vmrep", t, rd, st, note=f"{regime}; chunks {p.reads}")
            if len(keep) < 2:
                keep.append(p)  # the journals the incremental cycles go on with
            else:
                p.j.close()
                drop_tree(p.root)
        if "borg" in peers:
            drop_tree(borg_repo)
            run(["borg", "init", "--encryption=none", str(borg_repo)], env, on_start=mark, on_end=stop)
            b0 = du(borg_repo)
            print(f"  {set_regime(image, regime)}", flush=True)
            t, _ = run(["borg", "create", "--chunker-params", "fixed,1048576", f"{borg_repo}::c0", str(image)],
                       env, on_start=mark, on_end=stop)
            rec(scn, "borg", t, size, du(borg_repo) - b0, note=regime)
    scan, cbt = keep
    cbt.cbt = True
    set_regime(image, "hot")  # the rest as before: everything in the page cache
    if "restic" in peers:
        run(["restic", "init", "--repo", str(restic_repo)], env, on_start=mark, on_end=stop)
        r0 = du(restic_repo)
        t, _ = run(["restic", "backup", "--repo", str(restic_repo), str(image)], env, on_start=mark, on_end=stop)
        rec("initial hot", "restic", t, size, du(restic_repo) - r0)
    if "rsync" in peers:
        t, _ = run(["rsync", "--inplace", str(image), str(rsync_copy)], env, on_start=mark, on_end=stop)
        rec("initial hot", "rsync", t, size, size)

    # incremental cycles
    rng = random.Random(42)
    n = 0
    for pct in (1, 10):
        scn = f"+{pct} %"
        for _rep in range(args.repeat):
            n += 1
            ranges = change_image(image, size, pct, rng)
            t, rd, st = scan.cycle(image, None)
            rec(scn, "vmrep hash scan", t, rd, st)
            t, rd, st = cbt.cycle(image, ranges)
            rec(scn, "vmrep changed list", t, rd, st)
            if "borg" in peers:
                b0 = du(borg_repo)
                t, _ = run(["borg", "create", "--chunker-params", "fixed,1048576",
                            f"{borg_repo}::c{n}", str(image)], env, on_start=mark, on_end=stop)
                rec(scn, "borg", t, size, du(borg_repo) - b0)
            if "restic" in peers:
                r0 = du(restic_repo)
                t, _ = run(["restic", "backup", "--repo", str(restic_repo), str(image)], env,
                           on_start=mark, on_end=stop)
                rec(scn, "restic", t, size, du(restic_repo) - r0)
            if "rsync" in peers:
                t, o = run(["rsync", "--no-whole-file", "--inplace", "--ignore-times", "--stats",
                            str(image), str(rsync_copy)], env, on_start=mark, on_end=stop)
                lit = next((int(x.split(":")[1].split()[0].replace(",", ""))
                            for x in o.splitlines() if x.startswith("Literal data")), -1)
                rec(scn, "rsync", t, 2 * size, lit, note="reads source and basis")

    # restore
    for _ in range(args.repeat):
        dst = work / "restored.img"
        os.sync()
        mark()
        t0 = time.perf_counter()
        written = scan.j.restore_disk(VPG, "latest", VM, DISK, dst, fsync=False)
        dt = time.perf_counter() - t0
        stop()
        rec("restore", "vmrep restore_disk", dt, written, written)
        ok = dst.read_bytes() == image.read_bytes()
        if not ok:
            print("ERROR: restored image differs", file=sys.stderr)
            return 1
        dst.unlink()
        os.sync()
        mark()
        t0 = time.perf_counter()
        subprocess.run(["cp", str(image), str(dst)], check=True)
        dt = time.perf_counter() - t0
        stop()
        rec("restore", "cp", dt, size, size)
        dst.unlink()
    scan.j.close()
    cbt.j.close()

    # table
    ref = {**{f"initial {r}": "vmrep" for r in regimes}, "initial hot": "vmrep", "+1 %": "vmrep hash scan",
           "+10 %": "vmrep hash scan", "restore": "vmrep restore_disk", "read": "cat image > /dev/null"}
    lines = [
        f"image {human(size)} (half random, half zeros), block size {human(bs)}, {os.cpu_count()} CPUs, "
        f"medians of {args.repeat}",
        "",
        "| scenario | tool | time s | CPU s | bytes read | bytes stored | time / vmrep | CPU / vmrep |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (scn, tool), r in rows.items():
        base = rows.get((scn, ref[scn]))
        ratio = f"{r.t / base.t:.1f}×" if base and scn != "read" else ""
        cratio = f"{r.c / base.c:.1f}×" if base and scn != "read" and base.c > 0 else ""
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {scn} | {tool} | {r.t:.3f} | {r.c:.2f} | {human(r.r)}{note} | {human(r.s)} | "
                     f"{ratio} | {cratio} |")
    text = "\n".join(lines)
    print()
    print(text)
    (out / "bench_replication.md").write_text(text + "\n")
    (out / "bench_replication.json").write_text(json.dumps(
        [{"scenario": r.scenario, "tool": r.tool, "seconds": r.seconds, "cpu": r.cpu, "read": r.read,
          "stored": r.stored}
         for r in rows.values()], indent=1))
    drop_tree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
