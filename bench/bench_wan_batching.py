"""Round trips and bytes per cycle through the journal service: blocks one request pair
each (ask `missing`, send) against batches (one `missing` for many ids, one batch),
side by side on the same service.

    .venv/bin/python bench/bench_wan_batching.py [--blocks 64] [--changed 32] [--repeat 3] [--rtt-ms 0,20]

A real `vmrep journal serve` (HTTPS, the lab's way of making its certificate and tokens)
on loopback, no vSphere: a disk of `--blocks` 1 MiB blocks is committed once, then each
cycle changes `--changed` of its blocks by a 64 KiB text write each (CBT's extents handed
to the writer as the engine does) and commits. "per block" is the writer with
BATCH_BLOCKS = 1, which sends exactly what the client sent before batching (one
`missing` and one batch per changed block); "batched" is the default. Round trips are
counted on the wire (an adapter of the client's session); `--rtt-ms` adds that delay to
every request in the same adapter, to show what the round trips cost over a WAN (the
delay is emulated, the requests are real). Prints the medians and the ratios."""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB, KiB = 1 << 20, 1 << 10


class Wire(requests.adapters.HTTPAdapter):
    """Counts requests and bodies as they leave; optionally waits `rtt` seconds first."""

    def __init__(self, rtt: float) -> None:
        super().__init__()
        self.rtt, self.requests, self.body = rtt, 0, 0

    def send(self, request: Any, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        self.requests += 1
        self.body += len(request.body or b"")
        if self.rtt:
            time.sleep(self.rtt)
        return super().send(request, *args, **kw)


def start_service(work: Path) -> tuple[subprocess.Popen[bytes], Path, dict[str, Any]]:
    from lab.manage import journal_service_files

    svc = journal_service_files(work)
    client = yaml.safe_load((work / "journal-service" / "client.yaml").read_text())["journal_service"]
    cfg = {"database_url": f"sqlite:///{work / 'state.db'}",
           "sites": {s: {"host": f"vc-{s}.invalid", "password": "env:VMREP_BENCH_UNUSED"} for s in ("siteA", "siteB")},
           "journal": {"path": str(work / "journal"), "service": svc},
           "vpgs": [{"name": "bench", "protected_site": "siteA", "recovery_site": "siteB",
                     "vms": [{"name": "bench-01"}]}]}
    path = work / "siteB.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = open(work / "service.log", "ab")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("vmrep")), "journal", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    token = (work / "journal-service" / "siteA-writer.token").read_text().strip()
    while True:
        try:
            requests.get(client["url"] + "/v1/whoami", verify=client["tls"]["ca_file"], timeout=2,
                         headers={"Authorization": f"Bearer {token}"}).raise_for_status()
            return proc, path, client
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"journal service did not start:\n{(work / 'service.log').read_text()}") from None
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=64, help="1 MiB blocks of the disk")
    ap.add_argument("--changed", type=int, default=32, help="blocks changed per cycle (a 64 KiB write each)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rtt-ms", default="0,20", help="emulated round-trip delays to measure at, comma-separated")
    a = ap.parse_args()

    import vmrep.journal.remote as remote
    from lab.guest import ContentSource
    from vmrep.config import JournalServiceClient
    from vmrep.journal.remote import RemoteJournal

    work = Path(tempfile.mkdtemp(prefix="vmrep-bench-wan-"))
    proc, _, client = start_service(work)
    try:
        rj = RemoteJournal(JournalServiceClient.model_validate(client))
        rng = random.Random(5)
        disk = [bytearray(rng.randbytes(MiB)) for _ in range(a.blocks)]
        w = rj.begin("bench")
        w.set_disk_size("bench-01", "d0", a.blocks * MiB)
        for i, b in enumerate(disk):
            w.put_block("bench-01", "d0", i, bytes(b))
        w.commit()
        text = ContentSource("text", rng)
        rows: dict[tuple[str, float], list[tuple[int, int, float]]] = {}
        default_blocks = remote.BATCH_BLOCKS
        for rtt in [float(x) / 1000 for x in a.rtt_ms.split(",")]:
            for _ in range(a.repeat):
                for mode, per_batch in (("per block", 1), ("batched", default_blocks)):
                    remote.BATCH_BLOCKS = per_batch
                    last = rj.checkpoints("bench")[-1].id
                    prev = rj.block_map("bench", last, "bench-01", "d0")
                    areas = []
                    for i in rng.sample(range(a.blocks), a.changed):
                        off = rng.randrange(0, MiB - 64 * KiB, 4 * KiB)
                        disk[i][off:off + 64 * KiB] = text.take(64 * KiB)
                        areas.append((i * MiB + off, 64 * KiB))
                    wire = Wire(rtt)
                    rj._http.mount("https://", wire)  # noqa: SLF001 - the bench watches the wire
                    t0 = time.perf_counter()
                    w = rj.begin("bench")
                    w.set_disk_size("bench-01", "d0", a.blocks * MiB)
                    w.hint_extents("bench-01", "d0", areas, prev)
                    for o, _n in sorted(areas):
                        i = o // MiB
                        w.put_block("bench-01", "d0", i, bytes(disk[i]))
                    w.commit()
                    rows.setdefault((mode, rtt), []).append((wire.requests, w.bytes_sent, time.perf_counter() - t0))
        remote.BATCH_BLOCKS = default_blocks
        print(f"\n{a.changed} of {a.blocks} 1 MiB blocks changed per cycle by a 64 KiB text write each; "
              f"medians of {a.repeat} cycles")
        print(f"{'rtt':>6} {'mode':<10} {'requests':>9} {'bytes sent':>11} {'seconds':>8}")
        for rtt in sorted({r for _, r in rows}):
            med = {m: [statistics.median(x[k] for x in rows[(m, rtt)]) for k in range(3)]
                   for m in ("per block", "batched")}
            for m, (req, sent, secs) in med.items():
                print(f"{rtt * 1000:>4.0f}ms {m:<10} {req:>9.0f} {sent:>11.0f} {secs:>8.3f}")
            pb, bt = med["per block"], med["batched"]
            print(f"{'':>6} ratio per block / batched: requests {pb[0] / bt[0]:.1f}x, bytes sent "
                  f"{pb[1] / bt[1]:.3f}x, time {pb[2] / bt[2]:.2f}x")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
