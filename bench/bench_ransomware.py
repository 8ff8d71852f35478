"""Ransomware detection: its cost next to the cycle's, detection latency, false alarms.

    .venv/bin/python bench/bench_ransomware.py [--cycles 200] [--mib 8] [--block-size 1M]

Runs on the journal writer directly, without the lab (the detector lives in the writer:
what the lab adds, snapshots and reads over /folder, only makes a cycle longer, so the
cost share measured here is an upper bound). Per cycle, `--mib` MiB of new blocks of one
workload go through `CheckpointWriter.put_block` (blake3, zstd attempt, pack, commit
with fsync), exactly as a transfer hands them over:

- text: log-like lines (lab.guest.text_pool, zstd ratio 2-4);
- database-like: text pages with 15 % random (compressed or encrypted) blocks among them;
- encrypted volume: random bytes from the start (BitLocker, LUKS).

Measured per workload over `--cycles` cycles: the cycle's wall time with detection,
the classification time inside it (`ChangeStats.seconds`), and the per-cycle judgement
(`service.assess_vpg` over the kept checkpoints, what `refresh_alerts` does after each
commit, given the checkpoint list the cycle reads anyway). The same workload with the
detector replaced by a no-op, side by side, gives the ratio. False alarms: incidents
opened over the run. Latency: after 20 text cycles the guest "encrypts" `--attack-mib`
MiB per cycle; cycles (and seconds) until the incident opens. Not part of pytest.
Medians; ratios printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.guest import text_pool  # noqa: E402
from vmrep.journal import Journal  # noqa: E402
from vmrep.journal import writer as writer_mod  # noqa: E402
from vmrep.ransomware import service  # noqa: E402
from vmrep.ransomware.detect import ChangeStats  # noqa: E402

MiB = 1 << 20
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class NoStats(ChangeStats):
    """The detector switched off: the side-by-side baseline."""

    def block(self, key, data, compressed):  # type: ignore[no-untyped-def]
        pass

    def zero(self, key, n):  # type: ignore[no-untyped-def]
        pass


def blocks(kind: str, rng: random.Random, pool: bytes, n: int, bs: int) -> list[bytes]:
    out = []
    for _ in range(n):
        if kind == "encrypted" or (kind == "database" and rng.random() < 0.15):
            out.append(rng.randbytes(bs))
        else:
            o = rng.randrange(len(pool) - bs)
            out.append(pool[o:o + bs])
    return out


def run(kind: str, cycles: int, mib: int, bs: int, detect: bool, attack_mib: int = 0) -> dict:
    writer_mod.ChangeStats = ChangeStats if detect else NoStats  # type: ignore[misc]
    rng = random.Random(1)
    pool = text_pool(rng, 16 * MiB)
    per = mib * MiB // bs
    disk_blocks = 4096
    cyc, det, judge = [], [], []
    incidents_at: int | None = None
    with tempfile.TemporaryDirectory(prefix="bench-rw-") as tmp:
        j = Journal.open(Path(tmp) / "j", block_size=bs)
        total = cycles + (8 if attack_mib else 0)
        for n in range(total + 1):
            attacking = attack_mib and n > cycles
            count = attack_mib * MiB // bs if attacking else per
            data = blocks("encrypted" if attacking else kind, rng, pool, count, bs)
            start = rng.randrange(disk_blocks - len(data))
            t0 = time.perf_counter()
            with j.begin("g") as w:
                w.set_disk_size("vm", "d0", disk_blocks * bs)
                for i, b in enumerate(data):
                    w.put_block("vm", "d0", start + i, b)
                w.commit(time=T0 + timedelta(seconds=10 * n))
                seconds = w.stats.seconds
            t1 = time.perf_counter()
            infos = j.checkpoints("g")  # read by every cycle anyway (retention, the next map)
            t1 = time.perf_counter()
            a = service.assess_vpg(j, "g", infos) if detect else None  # the rule + the records
            t2 = time.perf_counter()
            if n == 0:
                continue  # the initial copy
            cyc.append(t1 - t0)
            det.append(seconds)
            judge.append(t2 - t1)
            if a is not None and a.incidents and incidents_at is None:
                incidents_at = n
        false_alarms = 0
        if detect:
            a = service.assess_vpg(j, "g")
            false_alarms = len([i for i in a.incidents if not attack_mib or i.began_seq <= cycles + 1])
    return {"kind": kind, "cycle": statistics.median(cyc), "classify": statistics.median(det),
            "judge": statistics.median(judge), "incident_at": incidents_at, "false_alarms": false_alarms,
            "cycle_times": cyc}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--mib", type=int, default=8, help="MiB changed per cycle")
    ap.add_argument("--attack-mib", type=int, default=32, help="MiB encrypted per cycle during the attack")
    ap.add_argument("--block-size", default="1M")
    args = ap.parse_args()
    bs = int(args.block_size.rstrip("KMkm")) * (MiB if args.block_size[-1] in "Mm" else 1024)
    print(f"{args.cycles} cycles of {args.mib} MiB per workload, {bs // 1024} KiB blocks")
    print(f"{'workload':<10} {'cycle s':>8} {'classify s':>10} {'judge s':>8} {'cost %':>7} "
          f"{'no-detector s':>13} {'ratio':>6} {'false alarms':>12}")
    for kind in ("text", "database", "encrypted"):
        on = run(kind, args.cycles, args.mib, bs, True)
        off = run(kind, args.cycles, args.mib, bs, False)
        cost = 100 * (on["classify"] + on["judge"]) / on["cycle"]
        print(f"{kind:<10} {on['cycle']:>8.4f} {on['classify']:>10.5f} {on['judge']:>8.4f} {cost:>6.2f}% "
              f"{off['cycle']:>13.4f} {on['cycle'] / off['cycle']:>6.3f} {on['false_alarms']:>12}")
    lat = run("text", 20, args.mib, bs, True, attack_mib=args.attack_mib)
    if lat["incident_at"] is None:
        print("attack: not detected within 8 cycles")
    else:
        k = lat["incident_at"] - 20
        secs = sum(lat["cycle_times"][20:lat["incident_at"]]) + lat["judge"]
        print(f"attack ({args.attack_mib} MiB/cycle after 20 text cycles): incident at attack cycle {k}, "
              f"{secs:.3f} s of cycle work after the attack began (+ the interval between cycles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
