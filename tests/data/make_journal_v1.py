"""Writes the fixture journal tests/data/journal-v1/journal/ and its expected.json.

Run once (`.venv/bin/python tests/data/make_journal_v1.py`); the output is checked in as
test vectors for a second reader (docs/journal-format.md, "Test vectors"). Running it again
makes a different journal (random ids and pack names) with the same disks.

Block recipes in expected.json, each block `len` bytes long (block_size, or less for a
disk's last block):
  {"zero": true}                    all zero bytes
  {"text": "<s>"}                   the UTF-8 of <s> repeated and cut to len
  {"random": "<s>"}                 the first len bytes of the BLAKE3 XOF of the UTF-8 of <s>
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmrep.journal import Journal  # noqa: E402

BS = 4096
HERE = Path(__file__).resolve().parent / "journal-v1"
VPG = "erp/fixture"  # a '/' to show the directory name's percent-encoding


def block(recipe: dict, n: int) -> bytes:
    if recipe.get("zero"):
        return bytes(n)
    if "text" in recipe:
        t = recipe["text"].encode()
        return (t * (n // len(t) + 1))[:n]
    return blake3.blake3(recipe["random"].encode()).digest(length=n)


def disk_bytes(size: int, recipes: list[dict]) -> bytes:
    return b"".join(block(r, min(BS, size - i * BS)) for i, r in enumerate(recipes))


A = {"text": "vmrep journal fixture, block A. "}
B = {"text": "block B of checkpoint 2 / "}
C = {"text": "short last block C. "}
R = {"random": "fixture raw block R1"}
Z = {"zero": True}

# what each checkpoint holds: (vm, disk) -> (size, block recipes)
CP1 = {("vm-1", "scsi0:0"): (3 * BS, [A, Z, R]),
       ("vm-2", "scsi0:0"): (BS, [A])}  # the same block as vm-1's first: stored once
CP2 = {("vm-1", "scsi0:0"): (4 * BS + 100, [Z, Z, R, B, C])}  # block 0 zeroed, grown, vm-2 removed


def main() -> None:
    out = HERE / "journal"
    if out.exists():
        shutil.rmtree(out)
    j = Journal.open(out, block_size=BS, compression_level=3)
    cps = []
    with j.begin(VPG) as w:
        for (vm, d), (size, recipes) in CP1.items():
            w.set_disk_size(vm, d, size)
            for i, r in enumerate(recipes):
                w.put_block(vm, d, i, block(r, min(BS, size - i * BS)))
        cps.append((w.commit(time=datetime(2026, 1, 1, tzinfo=timezone.utc),
                             meta={"note": "fixture checkpoint 1"}), CP1))
    with j.begin(VPG) as w:
        w.remove_disk("vm-2", "scsi0:0")
        (vm, d), (size, recipes) = next(iter(CP2.items()))
        w.set_disk_size(vm, d, size)
        for i in (0, 3, 4):  # only what changed
            w.put_block(vm, d, i, block(recipes[i], min(BS, size - i * BS)))
        cps.append((w.commit(time=datetime(2026, 1, 1, 0, 5, tzinfo=timezone.utc), tag="at-commit"), CP2))
    j.add_tag(VPG, cps[0][0].id, "added-later")
    j.close()
    for sub in ("tmp", "locks", "gc"):  # empty: git keeps no empty directory, open() remakes them
        shutil.rmtree(out / sub)
    (out / "gc.lock").unlink(missing_ok=True)
    for lk in out.glob("vpgs/*/writer.lock"):
        lk.unlink()
    expected = {
        "block_size": BS,
        "vpg": VPG,
        "recipes": "see tests/data/make_journal_v1.py",
        "checkpoints": [
            {
                "id": info.id,
                "seq": info.seq,
                "time": info.time.isoformat(),
                "tags": {0: ["added-later"], 1: ["at-commit"]}[k],
                "disks": [
                    {"vm": vm, "disk": d, "size": size, "blocks": recipes,
                     "blake3": blake3.blake3(disk_bytes(size, recipes)).hexdigest()}
                    for (vm, d), (size, recipes) in sorted(disks.items())
                ],
            }
            for k, (info, disks) in enumerate(cps)
        ],
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
