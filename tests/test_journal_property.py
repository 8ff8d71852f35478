"""Property: whatever the writes, resizes, checkpoints and retention runs, every kept
checkpoint of every disk rebuilds byte for byte as it was when it was taken."""

from __future__ import annotations

import random
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmrep.journal import Journal
from vmrep.replication.blocks import LocalFileSource, sync_disk

BS = 4096
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
DISKS = [("vm1", "a"), ("vm1", "b"), ("vm2", "a"), ("vm3", "c")]
START_SIZES = [40 * BS, 24 * BS + 123, 40 * BS, 8 * BS]

write = st.tuples(
    st.just("write"),
    st.integers(0, len(DISKS) - 1),
    st.integers(0, 47),  # block
    st.integers(0, 7),  # sub-block offset in 512-byte steps
    st.integers(1, 3 * BS),  # length
    st.sampled_from(["random", "zero", "shared"]),
)
resize = st.tuples(st.just("resize"), st.integers(0, len(DISKS) - 1), st.integers(0, 48 * BS))
checkpoint = st.tuples(st.just("checkpoint"), st.sampled_from(["scan", "cbt", "full"]))
retention = st.tuples(st.just("retention"), st.integers(0, 12), st.sampled_from([None, 1.0, 0.9, 0.5]))
# rounds: some writes/resizes, a checkpoint, maybe a retention run
rounds = st.lists(
    st.tuples(st.lists(st.one_of(write, write, write, resize), max_size=6), checkpoint,
              st.one_of(st.none(), retention)),
    min_size=2,
    max_size=10,
)


def rebuild(j: Journal, vpg: str, cp: str, vm: str, disk: str) -> bytes:
    size = j.disks(vpg, cp)[(vm, disk)]
    out = bytearray(size)
    for off, data in j.iter_disk(vpg, cp, vm, disk):
        if data is not None:
            out[off : off + len(data)] = data
    return bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=rounds, seed=st.integers(0, 2**32 - 1))
def test_every_kept_checkpoint_rebuilds_exactly(rounds, seed):
    ops = [op for changes, cp, ret in rounds for op in [*changes, cp, *([ret] if ret else [])]]
    rng = random.Random(seed)
    shared = [rng.randbytes(BS) for _ in range(3)]  # content that recurs across VMs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        j = Journal.open(tmp / "journal", block_size=BS)
        j.compact_min_bytes = 0 if seed % 2 else 1 << 30  # exercise both retention paths
        images = [bytearray(s) for s in START_SIZES]
        dirty: list[list[tuple[int, int]]] = [[] for _ in DISKS]
        resized = [True] * len(DISKS)
        saved: dict[str, list[bytes]] = {}  # checkpoint id -> disk images at that time
        kept: list[str] = []
        clock = 0
        for op in ops + [("checkpoint", "scan")]:
            kind = op[0]
            if kind == "write":
                _, d, block, sub, length, what = op
                img = images[d]
                off = block * BS + sub * 512
                end = min(off + length, len(img))
                if off >= end:
                    continue
                if what == "random":
                    data = rng.randbytes(end - off)
                elif what == "zero":
                    data = bytes(end - off)
                else:
                    data = (shared[block % 3] * 4)[: end - off]
                img[off:end] = data
                dirty[d].append((off, end - off))
            elif kind == "resize":
                _, d, size = op
                img = images[d]
                if size < len(img):
                    del img[size:]
                else:
                    img.extend(bytes(size - len(img)))
                resized[d] = True
            elif kind == "checkpoint":
                mode = op[1]
                clock += 60
                prev = kept[-1] if kept else None
                with j.begin("g") as w:
                    for d, (vm, disk) in enumerate(DISKS):
                        path = tmp / f"{vm}-{disk}.img"
                        path.write_bytes(images[d])
                        previous = None
                        if prev is not None and mode != "full":
                            previous = j.block_map("g", prev, vm, disk)
                        ranges = dirty[d] if (mode == "cbt" and not resized[d] and previous is not None) else None
                        with LocalFileSource(path) as src:
                            sync_disk(w, vm, disk, src, previous=previous, changed_ranges=ranges,
                                      threads=1 + d % 3)
                        dirty[d], resized[d] = [], False
                    info = w.commit(time=T0 + timedelta(seconds=clock), tag=mode if clock % 300 == 0 else None)
                saved[info.id] = [bytes(i) for i in images]
                kept.append(info.id)
            elif kind == "retention" and kept:
                _, k, limit = op
                infos = j.checkpoints("g")
                assert [i.id for i in infos] == kept
                target = infos[min(k, len(infos) - 1)]
                usage = j.usage("g").total_bytes
                limit = None if limit is None else max(1, int(usage * limit) - 1)
                res = j.apply_retention("g", target.time, limit)
                assert res.promoted == [i.id for i in infos if i.time < target.time]
                event(f"retention: promoted={bool(res.promoted)} limit_hit={res.hard_limit_hit} "
                      f"compacted={res.compacted}")
                kept = [i.id for i in infos if i.id not in res.dropped]
                assert kept[0] == res.base and kept[-1] == infos[-1].id
                if limit is not None:
                    after = j.usage("g").total_bytes
                    assert after == res.bytes_after
                    assert (after <= limit) != res.over_limit
                    if res.hard_limit_hit:
                        assert res.dropped_by_limit
        assert [i.id for i in j.checkpoints("g")] == kept
        fresh = Journal.open(tmp / "journal", block_size=BS)
        for cp in kept:
            for d, (vm, disk) in enumerate(DISKS):
                assert rebuild(fresh, "g", cp, vm, disk) == saved[cp][d], (cp, vm, disk)
        assert fresh.verify("g") == []
        out = tmp / "restored.img"
        fresh.restore_disk("g", kept[0], *DISKS[1], out)
        assert out.read_bytes() == saved[kept[0]][1]
