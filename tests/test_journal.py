"""The journal: dedup, refs, tags, retention, hard limit, verify, crash safety, recover."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vmrep.errors import JournalError
from vmrep.journal import Journal
from vmrep.journal import format as fmt

BS = 4096
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parent.parent


def rnd(n: int = BS) -> bytes:
    return os.urandom(n)


def pack_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "packs").iterdir())


def disk_bytes(j: Journal, vpg: str, cp: str, vm: str, disk: str) -> bytes:
    size = j.disks(vpg, cp)[(vm, disk)]
    out = bytearray(size)
    for off, data in j.iter_disk(vpg, cp, vm, disk):
        if data is not None:
            out[off : off + len(data)] = data
    return bytes(out)


def commit_disk(j: Journal, vpg: str, vm: str, disk: str, blocks: dict[int, bytes], size: int, **kw):
    with j.begin(vpg) as w:
        w.set_disk_size(vm, disk, size)
        for i, b in blocks.items():
            w.put_block(vm, disk, i, b)
        return w.commit(**kw)


def test_open_create_and_settings(tmp_path):
    with pytest.raises(JournalError):
        Journal.open(tmp_path / "none", create=False)
    j = Journal.open(tmp_path / "j", block_size=BS)
    assert j.block_size == BS
    j2 = Journal.open(tmp_path / "j", block_size=1 << 20)  # the stored block size wins
    assert j2.block_size == BS
    with pytest.raises(JournalError):
        Journal.open(tmp_path / "k", block_size=5000)


def test_dedup_across_disks_vms_and_vpgs(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    data = {i: rnd() for i in range(16)}
    cp1 = commit_disk(j, "g1", "vm1", "d1", data, 16 * BS)
    assert cp1.added_bytes == 16 * BS
    before = pack_bytes(tmp_path / "j")
    with j.begin("g1") as w:  # same blocks on another disk of another VM, shuffled
        w.set_disk_size("vm2", "d9", 16 * BS)
        assert sum(w.put_block("vm2", "d9", 15 - i, b) for i, b in data.items()) == 0
        cp2 = w.commit()
    assert cp2.added_bytes == 0 and cp2.changed_blocks == 16
    cp3 = commit_disk(j, "g2", "vmX", "a", {0: data[3], 1: data[3]}, 2 * BS)
    assert cp3.added_bytes == 0
    assert pack_bytes(tmp_path / "j") == before
    assert disk_bytes(j, "g2", cp3.id, "vmX", "a") == data[3] * 2
    assert j.disks("g1", cp2.id) == {("vm1", "d1"): 16 * BS, ("vm2", "d9"): 16 * BS}


def test_compressible_blocks_are_compressed_random_stored_raw(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS, compression_level=3)
    cp = commit_disk(j, "g", "vm", "d", {0: b"a" * BS, 1: rnd()}, 2 * BS)
    assert BS < cp.added_bytes < BS + 200
    assert disk_bytes(j, "g", cp.id, "vm", "d")[:BS] == b"a" * BS


def test_refs_and_tags(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    cps = [commit_disk(j, "g", "vm", "d", {0: rnd()}, BS, time=T0 + timedelta(minutes=i),
                       tag="first" if i == 0 else None, meta={"cbt": {"d": f"52 {i}"}})
           for i in range(4)]
    assert [c.id for c in j.checkpoints("g")] == [c.id for c in cps]
    assert [c.seq for c in cps] == [1, 2, 3, 4]
    assert all(fmt.CP_ID_RE.match(c.id) for c in cps)
    assert j.checkpoint("g", "latest").id == cps[-1].id
    assert j.checkpoint("g", "latest-tagged").id == cps[0].id
    assert j.checkpoint("g", cps[2].id).meta == {"cbt": {"d": "52 2"}}
    assert j.checkpoint("g", (T0 + timedelta(minutes=2, seconds=30)).isoformat()).id == cps[2].id
    assert j.checkpoint("g", "2026-01-01T00:03:00Z").id == cps[3].id
    assert j.checkpoint("g", "2026-01-01T00:01:00").id == cps[1].id  # naive = UTC
    assert j.checkpoint("g", cps[1].id[:11]).id == cps[1].id  # unique prefix
    with pytest.raises(JournalError, match="1999"):
        j.checkpoint("g", "1999-01-01T00:00:00Z")
    with pytest.raises(JournalError, match="cp-00000099-abcdef"):
        j.checkpoint("g", "cp-00000099-abcdef")
    with pytest.raises(JournalError, match="bogus"):
        j.checkpoint("g", "bogus")
    j.add_tag("g", cps[2].id, "Tested at 2026-01-02 10:00")
    j.add_tag("g", cps[2].id, "Tested at 2026-01-02 10:00")  # idempotent
    j.add_tag("g", cps[2].id, "before upgrade")
    assert j.checkpoint("g", cps[2].id).tags == ["Tested at 2026-01-02 10:00", "before upgrade"]
    assert j.checkpoint("g", "latest-tagged").id == cps[2].id
    with pytest.raises(JournalError):
        j.add_tag("g", "cp-00000077-000000", "x")
    # tags are separate files: checkpoint files are never rewritten
    assert len(list((tmp_path / "j" / "vpgs" / "g" / "tags").iterdir())) == 2
    back = commit_disk(j, "g", "vm", "d", {}, BS, time=T0)  # a clock stepped back
    assert back.time == cps[-1].time  # checkpoint times stay ordered


def test_one_writer_per_vpg(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    w = j.begin("g")
    with pytest.raises(JournalError, match="locked"):
        j.begin("g")
    other = Journal.open(tmp_path / "j", block_size=BS)
    with pytest.raises(JournalError):
        other.begin("g")
    with other.begin("h") as w2:  # another VPG is independent
        w2.abort()
    w.abort()
    j.begin("g").abort()


def test_disk_resize_remove_and_carry_over(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    a, b = rnd(), rnd()
    cp1 = commit_disk(j, "g", "vm", "d", {0: a, 3: b}, 4 * BS)
    with j.begin("g") as w:  # other disk only: d carried over unchanged
        w.set_disk_size("vm", "e", BS)
        w.put_block("vm", "e", 0, a)
        cp2 = w.commit()
    assert disk_bytes(j, "g", cp2.id, "vm", "d") == a + bytes(2 * BS) + b
    cp3 = commit_disk(j, "g", "vm", "d", {}, 2 * BS)  # shrink: block 3 gone
    cp4 = commit_disk(j, "g", "vm", "d", {}, 4 * BS)  # grow back: zeros, not the old block
    assert disk_bytes(j, "g", cp3.id, "vm", "d") == a + bytes(BS)
    assert disk_bytes(j, "g", cp4.id, "vm", "d") == a + bytes(3 * BS)
    with j.begin("g") as w:
        w.remove_disk("vm", "d")
        cp5 = w.commit()
    assert ("vm", "d") not in j.disks("g", cp5.id)
    with pytest.raises(JournalError, match="no disk"):
        j.block_map("g", cp5.id, "vm", "d")
    cp6 = commit_disk(j, "g", "vm", "d", {1: b}, 2 * BS)  # re-added: starts empty
    assert disk_bytes(j, "g", cp6.id, "vm", "d") == bytes(BS) + b
    assert disk_bytes(j, "g", cp1.id, "vm", "d") == a + bytes(2 * BS) + b


def test_verify_names_vm_disk_offset_of_corrupted_block(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    blocks = {i: rnd() for i in range(8)}
    commit_disk(j, "g", "vm1", "d1", blocks, 8 * BS)
    cp2 = commit_disk(j, "g", "vm2", "d2", {5: blocks[6]}, 8 * BS)
    assert j.verify("g") == []
    bid = j.block_map("g", cp2.id, "vm1", "d1")[6]
    pack, off, slen, _, _ = j.store.locate(bid)
    with open(tmp_path / "j" / "packs" / f"{pack}.pack", "r+b") as f:
        f.seek(off + slen // 2)
        c = f.read(1)
        f.seek(off + slen // 2)
        f.write(bytes([c[0] ^ 0xFF]))
    fresh = Journal.open(tmp_path / "j", block_size=BS)
    bad = fresh.verify("g")
    where = sorted((m.vm, m.disk, m.offset) for m in bad)
    assert where == [("vm1", "d1", 6 * BS), ("vm2", "d2", 5 * BS)]
    assert all(m.block_id == bid.hex() and "mismatch" in m.reason for m in bad)
    assert len(fresh.verify("g", cp2.id)) == 2
    with pytest.raises(JournalError, match="mismatch"):
        fresh.read_block(bid)


def _cycle_history(j: Journal, n: int, nblocks: int = 16) -> tuple[list, list[bytes]]:
    """n checkpoints, each rewriting the whole disk with new data (so each has its own pack)."""
    cps, images = [], []
    for k in range(n):
        blocks = {i: rnd() for i in range(nblocks)}
        cps.append(commit_disk(j, "g", "vm", "d", blocks, nblocks * BS, time=T0 + timedelta(hours=k)))
        images.append(b"".join(blocks[i] for i in range(nblocks)))
    return cps, images


def test_retention_promotes_drops_and_frees_space(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    j.compact_min_bytes = 1 << 30  # first: no base rewrite, only the start marker
    cps, images = _cycle_history(j, 8)
    partial = commit_disk(j, "g", "vm", "d", {0: rnd()}, 16 * BS, time=T0 + timedelta(hours=8))
    images.append(bytes(images[-1][:0]) + disk_bytes(j, "g", partial.id, "vm", "d"))
    cps.append(partial)
    used = pack_bytes(tmp_path / "j")
    u0 = j.usage("g")
    assert u0.history_start == T0 and u0.checkpoints == 9
    res = j.apply_retention("g", T0 + timedelta(hours=5))
    assert res.promoted == [c.id for c in cps[:5]] and res.dropped_by_limit == []
    assert res.base == cps[5].id and not res.hard_limit_hit and not res.gc_deferred
    assert [c.id for c in j.checkpoints("g")] == [c.id for c in cps[5:]]
    for c, img in zip(cps[5:], images[5:], strict=True):
        assert disk_bytes(j, "g", c.id, "vm", "d") == img
    assert res.gc.packs_deleted == 5
    assert pack_bytes(tmp_path / "j") < used * 0.6
    assert res.bytes_after < res.bytes_before
    with pytest.raises(JournalError):
        j.checkpoint("g", cps[0].id)
    assert j.verify("g") == []
    # now with the base rewritten
    j.compact_min_bytes = 0
    res = j.apply_retention("g", T0 + timedelta(hours=7))
    assert res.compacted and res.promoted == [cps[5].id, cps[6].id]
    vdir = tmp_path / "j" / "vpgs" / "g"
    assert [p.name for p in (vdir / "base").iterdir()] == [f"{cps[7].id}.base"]
    assert sorted(p.name for p in (vdir / "checkpoints").iterdir()) == [f"{cps[8].id}.ckpt"]
    for c, img in zip(cps[7:], images[7:], strict=True):
        assert disk_bytes(j, "g", c.id, "vm", "d") == img
    fresh = Journal.open(tmp_path / "j", block_size=BS)
    assert [c.id for c in fresh.checkpoints("g")] == [c.id for c in cps[7:]]
    assert fresh.checkpoint("g", cps[7].id).time == cps[7].time
    assert fresh.verify("g") == []
    # the newest checkpoint is always kept, and writing continues after it
    res = fresh.apply_retention("g", T0 + timedelta(days=30))
    assert [c.id for c in fresh.checkpoints("g")] == [cps[8].id]
    nxt = commit_disk(fresh, "g", "vm", "d", {1: rnd()}, 16 * BS, time=T0 + timedelta(hours=9))
    assert nxt.seq == cps[8].seq + 1
    assert disk_bytes(fresh, "g", cps[8].id, "vm", "d") == images[8]


def test_retention_repacks_partially_used_packs(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    keep = {i: rnd() for i in range(4)}
    first = {**keep, **{i: rnd() for i in range(4, 16)}}
    commit_disk(j, "g", "vm", "d", first, 16 * BS, time=T0)  # one pack: 4 of 16 survive
    cp2 = commit_disk(j, "g", "vm", "d", {i: rnd() for i in range(4, 16)}, 16 * BS, time=T0 + timedelta(hours=1))
    img = disk_bytes(j, "g", cp2.id, "vm", "d")
    before = pack_bytes(tmp_path / "j")
    res = j.apply_retention("g", T0 + timedelta(hours=1))
    assert res.gc.packs_repacked == 1
    assert pack_bytes(tmp_path / "j") < before - 10 * BS
    assert disk_bytes(j, "g", cp2.id, "vm", "d") == img
    assert Journal.open(tmp_path / "j", block_size=BS).verify("g") == []


def test_blocks_shared_with_another_vpg_survive_its_retention(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    shared = {i: rnd() for i in range(8)}
    commit_disk(j, "g", "vm", "d", shared, 8 * BS, time=T0)
    other = commit_disk(j, "h", "vm", "d", shared, 8 * BS, time=T0)
    commit_disk(j, "g", "vm", "d", {i: rnd() for i in range(8)}, 8 * BS, time=T0 + timedelta(hours=1))
    j.apply_retention("g", T0 + timedelta(hours=1))
    assert disk_bytes(j, "h", other.id, "vm", "d") == b"".join(shared[i] for i in range(8))
    assert j.verify("h") == []
    j.remove_vpg("h")
    assert j.gc().packs_deleted == 0 or True
    assert pack_bytes(tmp_path / "j") < 12 * BS
    assert j.checkpoints("h") == []
    with pytest.raises(JournalError):
        j.remove_vpg("h")


def test_hard_limit_drops_oldest_until_under(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    cps, images = _cycle_history(j, 6)
    per_cp = 16 * BS
    assert j.usage("g").total_bytes == 6 * per_cp
    res = j.apply_retention("g", T0 - timedelta(days=1), hard_limit_bytes=int(2.5 * per_cp))
    assert res.hard_limit_hit and not res.over_limit
    assert res.promoted == [] and res.dropped_by_limit == [c.id for c in cps[:4]]
    assert [c.id for c in j.checkpoints("g")] == [c.id for c in cps[4:]]
    assert j.usage("g").total_bytes <= 2.5 * per_cp
    for c, img in zip(cps[4:], images[4:], strict=True):
        assert disk_bytes(j, "g", c.id, "vm", "d") == img
    res = j.apply_retention("g", T0 - timedelta(days=1), hard_limit_bytes=per_cp // 2)
    assert res.hard_limit_hit and res.over_limit  # the newest is kept even over the limit
    assert [c.id for c in j.checkpoints("g")] == [cps[5].id]
    res = j.apply_retention("g", T0 - timedelta(days=1), hard_limit_bytes=10 * per_cp)
    assert not res.hard_limit_hit and res.dropped == []


def test_restore_disk_progress_and_sparse(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    blocks = {0: rnd(), 9: rnd(), 63: rnd()}
    cp = commit_disk(j, "g", "vm", "d", blocks, 64 * BS)
    seen = []
    out = tmp_path / "out.img"
    out.write_bytes(b"old content" * 100000)
    n = j.restore_disk("g", "latest", "vm", "d", out, progress=seen.append)
    assert n == 3 * BS and sum(seen) == 64 * BS
    assert out.read_bytes() == disk_bytes(j, "g", cp.id, "vm", "d")
    assert out.stat().st_blocks * 512 < 16 * BS


# ---- crash safety -----------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import vmrep.journal.store as sm
    import vmrep.journal.writer as wm
    from vmrep.journal import Journal
    point = sys.argv[2]
    sm.PACK_TARGET = 8 * 4096
    if point == "pack-renamed":
        real = sm.PackWriter.finish
        def finish(self):
            r = real(self)
            os._exit(9)  # the pack is in packs/, its index never written
        sm.PackWriter.finish = finish
    elif point == "before-publish":
        real_pub = wm.publish
        def pub(tmp, dest, data, **kw):
            if dest.suffix == ".ckpt":
                os._exit(9)  # data and index durable, checkpoint not published
            return real_pub(tmp, dest, data, **kw)
        wm.publish = pub
    elif point == "mid-publish":
        real_rename = os.rename
        def rename(a, b):
            if str(b).endswith(".ckpt"):
                os._exit(9)  # temp file fsynced, rename never happened
            return real_rename(a, b)
        os.rename = rename  # _fs.publish looks it up in os
    j = Journal.open(Path(sys.argv[1]), block_size=4096)
    with j.begin("g") as w:
        w.set_disk_size("vm", "d", 64 * 4096)
        for i in range(20):
            w.put_block("vm", "d", i, os.urandom(4096))
        w.commit()
    print("committed")
    """
)


@pytest.mark.parametrize("point", ["pack-renamed", "before-publish", "mid-publish"])
def test_crash_leaves_previous_checkpoint_and_recover_cleans(tmp_path, point):
    root = tmp_path / "j"
    j = Journal.open(root, block_size=BS)
    blocks = {i: rnd() for i in range(10)}
    cp1 = commit_disk(j, "g", "vm", "d", blocks, 64 * BS)
    image = disk_bytes(j, "g", cp1.id, "vm", "d")
    packs_before = set((root / "packs").iterdir())
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(repo=str(REPO)))
    p = subprocess.run([sys.executable, str(script), str(root), point], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    leftovers = list((root / "tmp").iterdir())
    new_packs = set((root / "packs").iterdir()) - packs_before
    if point == "pack-renamed":
        assert new_packs  # a pack in packs/ that no index lists
    if point == "mid-publish":
        assert any(p.suffix == ".tmp" for p in leftovers)
    # readable at its last checkpoint even before any cleanup
    j2 = Journal(root, BS, 1)
    j2.store.refresh()
    assert [c.id for c in j2.checkpoints("g")] == [cp1.id]
    assert disk_bytes(j2, "g", cp1.id, "vm", "d") == image
    res = j2.recover()
    assert not res.busy
    assert list((root / "tmp").iterdir()) == []
    indexed = set(j2.store.packs)
    assert {p.stem for p in (root / "packs").iterdir()} == indexed
    if point == "pack-renamed":
        assert res.packs_removed >= 1
    else:  # blocks already durable and indexed are kept for the retry (dedup)
        assert len(indexed) > len(packs_before)
    assert j2.verify("g") == []
    cp2 = commit_disk(j2, "g", "vm", "d", {11: rnd()}, 64 * BS)
    assert cp2.seq == 2
    assert disk_bytes(j2, "g", cp1.id, "vm", "d") == image


def test_recover_leaves_a_live_writers_files_alone(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    with j.begin("g") as w:
        w.set_disk_size("vm", "d", BS)
        w.put_block("vm", "d", 0, rnd())
        res = Journal.open(tmp_path / "j", block_size=BS).recover(wait=0)  # another process, say
        assert not res.busy and res.temp_files_removed == 0
        assert any((tmp_path / "j" / "tmp").iterdir())  # the open pack survived
        cp = w.commit()
    assert j.verify("g") == [] and j.checkpoint("g", "latest").id == cp.id
    assert list((tmp_path / "j" / "locks").iterdir()) == []  # sessions gone with the writer


def test_damaged_checkpoint_file_is_detected(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    cp = commit_disk(j, "g", "vm", "d", {0: rnd()}, BS)
    f = tmp_path / "j" / "vpgs" / "g" / "checkpoints" / f"{cp.id}.ckpt"
    data = bytearray(f.read_bytes())
    data[-40] ^= 1
    f.chmod(0o644)
    f.write_bytes(bytes(data))
    j2 = Journal.open(tmp_path / "j", block_size=BS)  # still opens
    with pytest.raises(JournalError, match="checksum"):
        j2.checkpoints("g")
    bad = j2.verify("g")
    assert len(bad) == 1 and "checksum" in bad[0].reason


def test_damaged_index_file_keeps_packs(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    commit_disk(j, "g", "vm", "d", {0: rnd()}, BS)
    (idx,) = (tmp_path / "j" / "index").iterdir()
    data = bytearray(idx.read_bytes())
    data[20] ^= 1
    idx.write_bytes(bytes(data))
    j2 = Journal.open(tmp_path / "j", block_size=BS)
    res = j2.recover()
    assert res.packs_removed == 0 and res.problems and len(list((tmp_path / "j" / "packs").iterdir())) == 1
    bad = j2.verify("g")
    assert [(m.vm, m.disk, m.offset) for m in bad] == [("vm", "d", 0)]
    assert "not in the journal's index" in bad[0].reason


def test_sorted_index_path(tmp_path, monkeypatch):
    """Past RECENT_MAX blocks the index lives in sorted arrays: dedup, reads, GC still work."""
    monkeypatch.setattr("vmrep.journal.store.BlockStore.RECENT_MAX", 2)
    j = Journal.open(tmp_path / "j", block_size=BS)
    blocks = {i: rnd() for i in range(12)}
    cp1 = commit_disk(j, "g", "vm", "d", blocks, 12 * BS, time=T0)
    assert commit_disk(j, "h", "vm", "d", blocks, 12 * BS, time=T0).added_bytes == 0
    fresh = Journal.open(tmp_path / "j", block_size=BS)
    assert fresh.store.lookup(j.block_map("g", cp1.id, "vm", "d")[5]) is not None
    assert disk_bytes(fresh, "h", "latest", "vm", "d") == b"".join(blocks[i] for i in range(12))
    commit_disk(fresh, "g", "vm", "d", {i: rnd() for i in range(12)}, 12 * BS, time=T0 + timedelta(hours=1))
    fresh.remove_vpg("h")
    res = fresh.apply_retention("g", T0 + timedelta(hours=1))
    assert res.gc.packs_deleted == 1
    assert fresh.verify("g") == []
    assert fresh.store.lookup(os.urandom(32)) is None


def test_gc_never_waits_for_writers_and_deletes_once_older_sessions_end(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    cps, _ = _cycle_history(j, 3)
    used = pack_bytes(tmp_path / "j")
    other = Journal.open(tmp_path / "j", block_size=BS)  # another process, say
    old = other.begin("h")  # began before the garbage was condemned
    res = j.apply_retention("g", T0 + timedelta(hours=2))
    assert res.promoted == [cps[0].id, cps[1].id]
    assert res.gc_deferred and res.gc.packs_deleted == 0  # condemned, not deleted yet
    assert pack_bytes(tmp_path / "j") == used
    new = other.begin("k")  # began after: it will not deduplicate against condemned blocks
    old.abort()
    st = j.gc()  # only `new` is alive, and it has seen the condemnation
    assert st.packs_deleted == 2
    assert pack_bytes(tmp_path / "j") < used / 2
    new.abort()
    assert j.verify("g") == []


def test_block_reused_by_an_older_writer_is_not_deleted(tmp_path):
    """The hazard a lock-free GC must handle: a writer that began before a block became
    garbage deduplicates against it; GC must keep the block."""
    j = Journal.open(tmp_path / "j", block_size=BS)
    old_block = rnd()
    commit_disk(j, "g", "vm", "d", {0: old_block}, BS, time=T0)
    commit_disk(j, "g", "vm", "d", {0: rnd()}, BS, time=T0 + timedelta(hours=1))
    other = Journal.open(tmp_path / "j", block_size=BS)  # another process
    w = other.begin("h")  # another VPG's writer, begun while old_block is still referenced
    res = j.apply_retention("g", T0 + timedelta(hours=1))  # old_block now unreferenced
    assert res.gc_deferred
    w.set_disk_size("vm", "d", BS)
    assert w.put_block("vm", "d", 0, old_block) == 0  # deduplicated against the condemned block
    cp = w.commit()
    j.gc()
    j.gc()
    assert disk_bytes(j, "h", cp.id, "vm", "d") == old_block
    assert Journal.open(tmp_path / "j", block_size=BS).verify("h") == []
    # a writer that begins after the condemnation stores such a block again instead
    w2_block = j.read_block(j.block_map("g", "latest", "vm", "d")[0])  # garbage after the next retention
    commit_disk(j, "g", "vm", "d", {0: rnd()}, BS, time=T0 + timedelta(hours=2))
    old = j.begin("x")  # keeps the next condemnation from being deleted at once
    j.apply_retention("g", T0 + timedelta(hours=3))
    with j.begin("y") as w2:
        w2.set_disk_size("vm", "d", BS)
        assert w2.put_block("vm", "d", 0, w2_block) == BS  # stored anew
        cp2 = w2.commit()
    old.abort()
    j.gc()
    assert disk_bytes(j, "y", cp2.id, "vm", "d") == w2_block
    assert j.verify("y") == [] and j.verify("h") == []


def test_two_processes_write_concurrently(tmp_path):
    root = tmp_path / "j"
    Journal.open(root, block_size=BS)
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {repo!r})
        from vmrep.journal import Journal
        j = Journal.open(Path(sys.argv[1]), block_size=4096)
        shared = [bytes([k]) * 4096 for k in range(1, 9)]
        for c in range(6):
            with j.begin(sys.argv[2]) as w:
                w.set_disk_size("vm", "d", 32 * 4096)
                for i in range(16):
                    w.put_block("vm", "d", (c * 5 + i) % 32, shared[i % 8] if i % 2 else os.urandom(4096))
                w.commit()
        """).format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), str(root), vpg]) for vpg in ("p0", "p1")]
    assert [p.wait() for p in procs] == [0, 0]
    j = Journal.open(root, block_size=BS)
    for vpg in ("p0", "p1"):
        assert len(j.checkpoints(vpg)) == 6
        assert j.verify(vpg) == []
    assert not j.recover().busy
    assert j.verify("p0") == [] and j.verify("p1") == []


def test_vpg_removed_and_created_again_is_a_new_history(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    a, b = rnd(), rnd()
    cp = commit_disk(j, "g", "vm", "d", {0: a}, BS)
    assert disk_bytes(j, "g", cp.id, "vm", "d") == a
    other = Journal.open(tmp_path / "j", block_size=BS)
    other.remove_vpg("g")
    cp2 = commit_disk(other, "g", "vm", "d", {0: b}, BS)
    assert cp2.seq == 1 and cp2.id != cp.id
    assert disk_bytes(j, "g", "latest", "vm", "d") == b  # j's cached map is not reused


def test_put_block_from_many_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    j = Journal.open(tmp_path / "j", block_size=BS)
    pool = [rnd() for _ in range(40)]
    plan = [(vm, i, pool[(i * 7 + len(vm)) % 40]) for vm in ("a", "bb", "ccc") for i in range(200)]
    with j.begin("g") as w:
        for vm in ("a", "bb", "ccc"):
            w.set_disk_size(vm, "d", 200 * BS)
        with ThreadPoolExecutor(8) as ex:
            stored = sum(ex.map(lambda p: w.put_block(p[0], "d", p[1], p[2]), plan))
        cp = w.commit()
    assert stored == cp.added_bytes == 40 * BS  # each distinct block stored once
    for vm in ("a", "bb", "ccc"):
        img = disk_bytes(j, "g", cp.id, vm, "d")
        assert img == b"".join(pool[(i * 7 + len(vm)) % 40] for i in range(200))


def test_retention_and_gc_while_other_processes_write(tmp_path):
    """Writers in two processes keep re-using a small pool of blocks while this process
    drops history and collects garbage as fast as it can: nothing a kept checkpoint uses
    may go missing."""
    root = tmp_path / "j"
    Journal.open(root, block_size=BS)
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent(
        """
        import os, sys, random, time
        from pathlib import Path
        sys.path.insert(0, {repo!r})
        from vmrep.errors import JournalError
        from vmrep.journal import Journal
        j = Journal.open(Path(sys.argv[1]), block_size=4096)
        pool = [bytes([k]) * 4096 for k in range(1, 13)]
        rng = random.Random(sys.argv[2])

        def begin():
            while True:  # retention holds the VPG lock for a moment: retry, as the flows do
                try:
                    return j.begin(sys.argv[2])
                except JournalError:
                    time.sleep(0.01)

        for c in range(25):
            with begin() as w:
                w.set_disk_size("vm", "d", 16 * 4096)
                for i in range(16):
                    w.put_block("vm", "d", i, rng.choice(pool) if rng.random() < 0.7 else os.urandom(4096))
                w.commit()
        """).format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), str(root), vpg]) for vpg in ("p0", "p1")]
    j = Journal.open(root, block_size=BS)
    j.lock_timeout = 30
    deleted = 0
    while any(p.poll() is None for p in procs):
        for vpg in ("p0", "p1"):
            if j.checkpoints(vpg):
                res = j.apply_retention(vpg, datetime.now(timezone.utc) + timedelta(days=1))
                deleted += res.gc.blocks_removed if res.gc else 0
                assert j.verify(vpg, "latest") == []
    assert [p.wait() for p in procs] == [0, 0]
    for vpg in ("p0", "p1"):
        j.apply_retention(vpg, datetime.now(timezone.utc) + timedelta(days=1))
    j.gc()
    fresh = Journal.open(root, block_size=BS)
    for vpg in ("p0", "p1"):
        assert len(fresh.checkpoints(vpg)) == 1 and fresh.verify(vpg) == []
    assert deleted > 0
    assert fresh.store.condemned == {}  # nothing left waiting once everyone is gone


def test_compression_probe_does_not_miss_partly_compressible_blocks(tmp_path):
    bs = 256 << 10
    j = Journal.open(tmp_path / "j", block_size=bs)
    head_random = os.urandom(bs // 2) + b"x" * (bs // 2)  # random start, compressible rest
    text = (b"the quick brown fox " * (bs // 20 + 1))[:bs]
    random_block = os.urandom(bs)
    cp = commit_disk(j, "g", "vm", "d", {0: random_block, 1: head_random, 2: text}, 3 * bs)
    assert bs + bs // 2 < cp.added_bytes < bs + bs // 2 + 8192  # random raw, the rest compressed
    assert disk_bytes(j, "g", cp.id, "vm", "d") == random_block + head_random + text
    assert j.verify("g") == []


def test_duplicate_of_a_block_in_flight_into_a_new_disk_does_not_deadlock(tmp_path, monkeypatch):
    """Thread A is compressing block X for disk a/d; thread B stores the same X as the first
    block of disk b/d. B finds X in flight and records it: it must not take the writer's
    lock twice (the writer of wave 1 did, and the sync hung for good)."""
    import threading

    from vmrep.journal import writer as wmod

    j = Journal.open(tmp_path / "j", block_size=BS)
    x = rnd()
    in_flight, release = threading.Event(), threading.Event()
    real_encode = wmod.encode_blob

    def slow_encode(data, level):
        in_flight.set()
        assert release.wait(10), "test: never released"
        return real_encode(data, level)

    monkeypatch.setattr(wmod, "encode_blob", slow_encode)
    w = j.begin("g")
    for vm in ("a", "b"):
        w.set_disk_size(vm, "d", 4 * BS)
    results: dict[str, int] = {}
    a = threading.Thread(target=lambda: results.__setitem__("a", w.put_block("a", "d", 0, x)), daemon=True)
    b = threading.Thread(target=lambda: results.__setitem__("b", w.put_block("b", "d", 2, x)), daemon=True)
    a.start()
    assert in_flight.wait(5)
    b.start()
    b.join(5)
    release.set()
    a.join(5)
    assert not b.is_alive(), "a duplicate of an in-flight block deadlocked the writer"
    assert not a.is_alive()
    assert results == {"a": len(real_encode(x, j.compression_level)[0]), "b": 0}
    cp = w.commit()
    assert disk_bytes(j, "g", cp.id, "a", "d") == x + bytes(3 * BS)
    assert disk_bytes(j, "g", cp.id, "b", "d") == bytes(2 * BS) + x + bytes(BS)


def test_many_threads_store_identical_blocks_into_many_new_disks(tmp_path):
    """Stress: 16 threads, 12 disks new in this checkpoint, every block one of 3 values,
    so most puts meet their block pending or in flight on another thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    j = Journal.open(tmp_path / "j", block_size=BS)
    for round_ in range(5):
        pool = [rnd() for _ in range(3)]
        disks = [(f"vm{k}", f"d{round_}") for k in range(12)]
        plan = [(vm, d, i, pool[(i + k) % 3]) for k, (vm, d) in enumerate(disks) for i in range(64)]
        start = threading.Barrier(16)
        seen = threading.local()  # one per round: each worker thread waits once on this round's barrier

        def put(p, _seen=seen, _start=start):
            if not getattr(_seen, "waited", False):
                _seen.waited = True
                _start.wait(10)
            return w.put_block(p[0], p[1], p[2], p[3])

        with j.begin("g") as w:
            for vm, d in disks:
                w.set_disk_size(vm, d, 64 * BS)
            with ThreadPoolExecutor(16) as ex:
                futs = [ex.submit(put, p) for p in plan]
                stored = sum(f.result(timeout=30) for f in futs)
            cp = w.commit()
        assert stored == cp.added_bytes == 3 * BS  # random blocks are stored raw, each once
        for k, (vm, d) in enumerate(disks):
            assert disk_bytes(j, "g", cp.id, vm, d) == b"".join(pool[(i + k) % 3] for i in range(64))


def test_second_writer_is_refused_as_journal_locked(tmp_path):
    """The one JournalError worth waiting for has its own type (a move's final checkpoint
    waits it out), so no caller reads the message to tell it apart."""
    from vmrep.errors import JournalLocked

    j = Journal.open(tmp_path / "j", block_size=BS)
    with j.begin("vpg1"):
        with pytest.raises(JournalLocked, match="VPG vpg1: journal is locked by another writer"):
            j.begin("vpg1")
    with j.begin("vpg1") as w:  # released with the first writer
        w.abort()
