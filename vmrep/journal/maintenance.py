"""Keeping the journal whole: garbage collection, VPG removal, recover() after a crash,
verify(), and rebuilding the index from the pack trailers (repair_index).

Protocols: "Garbage collection", "recover()", "verify" and "Repairing the index" in
docs/journal-format.md.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vmrep.errors import JournalError
from vmrep.journal import format as fmt
from vmrep.journal._fs import fsync_dir, rand_hex, unlink_quiet
from vmrep.journal._sessions import (
    SID_LEN,
    Session,
    gc_lock,
    live_sessions,
    live_sessions_of,
    open_session,
    vpg_lock,
)
from vmrep.journal.chain import drop_tags
from vmrep.journal.results import Mismatch, RecoverResult, RepairResult
from vmrep.journal.store import GCStats, id_prefixes

if TYPE_CHECKING:
    from vmrep.journal.journal import Journal


# ---- garbage collection ------------------------------------------------------------------

def live_prefixes(j: Journal) -> np.ndarray:
    """Sorted id prefixes of every block a kept checkpoint of any VPG references."""
    parts = []
    for vpg in j.chains.vpgs():
        chain = j.chains.chain(vpg)
        if chain.start_seq is None:
            continue
        base, hist = j.chains.referenced(chain, chain.start_seq)
        parts += [id_prefixes(a) for a in base + hist]
    if not parts:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate(parts))


def collect_garbage(j: Journal) -> tuple[GCStats | None, bool]:
    """One garbage-collection run; returns (stats, whether garbage still awaits deletion).

    Deletes the condemned blobs whose condemnation every live session has seen and
    that are still unreferenced, then condemns what is newly unreferenced; with no
    other session alive, that is deleted at once too. Never waits for writers."""
    lk = gc_lock(j.root, j.gc_lock_timeout)
    if lk is None:
        return None, True  # another GC is running
    store = j.store
    try:
        owner = rand_hex(SID_LEN // 2)  # names GC's temp files; gc.lock keeps recover() away
        total = GCStats()
        for attempt in (0, 1):
            sessions = live_sessions(j.root)
            store.refresh()
            floor = min(sessions.values(), default=None)
            ready = sorted(e for e in store.condemned if floor is None or e <= floor)
            live = live_prefixes(j)
            if ready:
                pairs: set[tuple[str, bytes]] = set().union(*(store.condemned[e] for e in ready))
                st = store.gc(pairs, live, j.repack_below, owner)
                total.packs_deleted += st.packs_deleted
                total.packs_repacked += st.packs_repacked
                total.bytes_freed += st.bytes_freed
                total.blocks_removed += st.blocks_removed
                total.index_files_rewritten += st.index_files_rewritten
                total.removed_packs += st.removed_packs
                store.remove_condemned(ready)  # only after the index no longer lists them
            if attempt:
                break
            known = {p for pairs_ in store.condemned.values() for p in pairs_}
            garbage = store.unreferenced(live) - known
            if not garbage:
                break
            epoch = max([0, *store.condemned, *sessions.values()]) + 1
            store.publish_condemned(epoch, garbage, owner)
            # sessions are listed again (after publishing): those that began before it
            # have not seen it and hold its deletion back
        return total, bool(store.condemned)
    finally:
        lk.release()


def remove_vpg(j: Journal, vpg: str) -> None:
    d = j.chains.vpg_dir(vpg)
    if not d.exists():
        raise JournalError(f"VPG {vpg}: not in the journal")
    vlock = vpg_lock(d, vpg, 0.0, "remove")
    try:
        with Session(j.root, "remove", vpg) as s:
            trash = j.root / "tmp" / f"{s.sid}trash-{rand_hex(8)}"
            os.rename(d, trash)
            fsync_dir(d.parent)
            fsync_dir(trash.parent)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        vlock.release()
    j.chains.forget(vpg)
    collect_garbage(j)


# ---- verification ------------------------------------------------------------------------

def verify(j: Journal, vpg: str, checkpoint_id: str | None, threads: int) -> list[Mismatch]:
    """Re-read and re-hash every block the kept checkpoints (or the one given) use."""
    with open_session(j.root, j.store, "verify", vpg):  # what it reads is not deleted meanwhile
        return _verify(j, vpg, checkpoint_id, threads)


def _verify(j: Journal, vpg: str, checkpoint_id: str | None, threads: int) -> list[Mismatch]:
    chains, store = j.chains, j.store
    chain = chains.chain(vpg)
    out: list[Mismatch] = []
    try:
        infos = [chains.resolve(vpg, checkpoint_id)[1]] if checkpoint_id else chains.infos(chain)
    except JournalError as exc:
        if checkpoint_id:
            raise
        return [Mismatch("*", "*", -1, "", str(exc))]
    store.refresh()
    maps: list[tuple[str, str, np.ndarray]] = []
    for info in infos:
        try:
            for (vm, disk) in chains.disks_at(chain, info.seq):
                r = chains.map_array(chain, info.seq, vm, disk)
                if r is not None:
                    maps.append((vm, disk, r[0]))
        except JournalError as exc:
            out.append(Mismatch("*", "*", -1, "", f"checkpoint {info.id}: {exc}"))
    if not maps:
        return out
    allids = np.concatenate([m for _, _, m in maps])
    uniq = np.unique(allids.view(f"V{fmt.ID_LEN}").ravel())
    ids = [u.tobytes() for u in uniq]
    ids = [i for i in ids if i != fmt.ZERO_ID]
    bad: dict[bytes, str] = {}
    block = threading.Lock()

    def check(chunk: list[bytes]) -> None:
        for bid in chunk:
            try:
                store.read(bid)
            except JournalError as exc:
                with block:
                    bad[bid] = str(exc)
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                with block:
                    bad[bid] = f"{type(exc).__name__}: {exc}"

    n = max(1, threads)
    chunks = [ids[k::n] for k in range(n)]
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(check, chunks))
    if bad:
        bad_arr = np.frombuffer(b"".join(bad), dtype=np.uint8).reshape(-1, fmt.ID_LEN)
        badv = bad_arr.view(f"V{fmt.ID_LEN}").ravel()
        seen = set()
        for vm, disk, arr in maps:
            hit = np.flatnonzero(np.isin(arr.view(f"V{fmt.ID_LEN}").ravel(), badv))
            for i in hit.tolist():
                bid = arr[i].tobytes()
                key = (vm, disk, i, bid)
                if key in seen:
                    continue
                seen.add(key)
                out.append(Mismatch(vm, disk, i * j.block_size, bid.hex(), bad[bid]))
    return out


# ---- recovery ----------------------------------------------------------------------------

def recover(j: Journal, wait: float) -> RecoverResult:
    """Remove what a crash left behind: temp files and unindexed packs of sessions that
    are gone, files that a newer base or start marker supersedes, lock files of dead
    sessions. Live sessions' files are left alone, so it can run at any time; it
    returns busy=True (and does nothing) while a garbage collection is running."""
    lk = gc_lock(j.root, wait)
    if lk is None:
        return RecoverResult(busy=True)
    res = RecoverResult()
    store = j.store
    alive: dict[str, bool] = dict.fromkeys(live_sessions(j.root), True)

    def owner_alive(name: str) -> bool:
        owner = name[:SID_LEN]
        if owner not in alive:  # began after the listing above? look again
            alive[owner] = owner in live_sessions_of(j.root, owner)
        return alive[owner]

    try:
        tmp = j.root / "tmp"
        for e in os.scandir(tmp):
            p = Path(e.path)
            if owner_alive(e.name):
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p, ignore_errors=True)
            else:
                res.bytes_freed += unlink_quiet(p)
            res.temp_files_removed += 1
        if res.temp_files_removed:
            fsync_dir(tmp)
        store.refresh()
        indexed = set(store.packs)
        present = set()
        if store.damaged_index:
            res.problems += [f"index/{n}: unreadable; packs it may list are kept"
                             for n in store.damaged_index]
        unindexed: list[Path] = []
        for e in os.scandir(j.root / "packs"):
            if e.name.endswith(".pack"):
                name = e.name[: -len(".pack")]
                present.add(name)
                if name not in indexed and not store.damaged_index and not owner_alive(name):
                    unindexed.append(Path(e.path))
        for p in _crash_leftovers(j, unindexed, res):
            res.bytes_freed += unlink_quiet(p)
            res.packs_removed += 1
        if res.packs_removed:
            fsync_dir(j.root / "packs")
        res.missing_packs = sorted(indexed - present)
        for vpg in j.chains.vpgs():
            try:
                res.files_removed += _recover_vpg(j, vpg, res)
            except (OSError, JournalError) as exc:
                res.problems.append(f"VPG {vpg}: {exc}")
        return res
    finally:
        lk.release()


def _crash_leftovers(j: Journal, packs: list[Path], res: RecoverResult) -> list[Path]:
    """Which of these unindexed packs (of dead sessions) a crash left: those holding no
    block that a kept checkpoint uses and the index has nowhere else. A checkpoint is
    published only after its blocks are indexed, so a pack that does hold such a block has
    lost its index file: it is kept, and reported, for `repair_index` to list again."""
    if not packs:
        return []
    try:
        live = live_prefixes(j)
    except (OSError, JournalError) as exc:
        res.problems.append(f"unindexed packs kept: cannot tell which blocks are in use ({exc})")
        return []
    out = []
    for p in packs:
        try:
            ents = read_pack_trailer(p, j.block_size).entries
        except (OSError, JournalError):
            out.append(p)  # no readable trailer: nothing could ever index it again
            continue
        used = ents["id"][np.isin(id_prefixes(ents["id"]), live)]
        if any(j.store.lookup(bid.tobytes()) is None for bid in used):
            res.problems.append(f"packs/{p.name}: holds blocks that kept checkpoints use but no "
                                "index file lists; kept (run `vmrep journal repair-index`)")
        else:
            out.append(p)
    return out


def _recover_vpg(j: Journal, vpg: str, res: RecoverResult) -> int:
    chain = j.chains.chain(vpg)
    removed = 0
    for sub, suffix in (("base", ".base"),):
        for e in os.scandir(chain.dir / sub) if (chain.dir / sub).exists() else []:
            if e.name.endswith(suffix) and Path(e.path) != chain.base:
                removed += 1
                res.bytes_freed += unlink_quiet(Path(e.path))
    for s, p in chain.deltas.items():
        if s <= chain.base_seq and chain.base is not None:
            removed += 1
            res.bytes_freed += unlink_quiet(p)
    for s, p in chain.starts.items():
        if s != chain.start_seq:
            removed += 1
            res.bytes_freed += unlink_quiet(p)
    if chain.start_seq is not None:
        kept = {chain.file_of(s).name.split(".", 1)[0] for s in chain.visible_seqs()}
        orphans = set()
        try:
            for e in os.scandir(chain.dir / "tags"):
                cid = e.name.split(".", 1)[0]
                if e.name.endswith(".tag") and cid not in kept:
                    orphans.add(cid)
        except FileNotFoundError:
            pass
        removed += drop_tags(chain.dir, orphans)
    for sub in ("base", "checkpoints", "start"):
        if (chain.dir / sub).exists() and removed:
            fsync_dir(chain.dir / sub)
    return removed


# ---- index repair ------------------------------------------------------------------------

def read_pack_trailer(path: Path, block_size: int) -> fmt.IndexPack:
    """The index entry of one pack file, from its own trailer, every entry checked against
    the file (magic, bounds, codec, raw length): what a lost index file would have said."""
    name = path.name[: -len(".pack")]
    what = f"packs/{path.name}"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(fmt.PACK_MAGIC))
        if head != fmt.PACK_MAGIC:
            raise JournalError(f"{what}: not a pack (bad magic)")
        if size < len(fmt.PACK_MAGIC) + fmt.PACK_FOOTER.size:
            raise JournalError(f"{what}: too short for a pack footer")
        f.seek(size - fmt.PACK_FOOTER.size)
        count = fmt.PACK_FOOTER.unpack(f.read(fmt.PACK_FOOTER.size))[0]
        tlen = count * fmt.ENTRY_DTYPE.itemsize + fmt.PACK_FOOTER.size
        table_start = size - tlen
        if table_start < len(fmt.PACK_MAGIC):
            raise JournalError(f"{what}: entry count {count} does not fit the file")
        f.seek(table_start)
        ents = fmt.parse_pack_trailer(f.read(tlen), what)
    ends = ents["offset"].astype(np.int64) + ents["slen"].astype(np.int64)
    if len(ents) and (int(ents["offset"].min()) < len(fmt.PACK_MAGIC) or int(ends.max()) > table_start):
        raise JournalError(f"{what}: an entry points outside the pack's blobs")
    if len(ents) and int(ents["rlen"].max()) > block_size:
        raise JournalError(f"{what}: an entry is longer than the block size {block_size}")
    return fmt.IndexPack(name, size, ents)


def repair_index(j: Journal) -> RepairResult:
    """Replace every index file by one built from the trailers of the packs in packs/.

    A pack whose trailer cannot be read keeps the entries a readable index file gave it
    (and is reported); one that no index lists either is left out (and reported). Runs
    under gc.lock, so no garbage collection or recover() moves packs meanwhile; writers
    may go on (a pack they renamed into packs/ has its trailer; listing it twice is
    allowed)."""
    lk = gc_lock(j.root, j.gc_lock_timeout)
    if lk is None:
        return RepairResult(busy=True)
    store = j.store
    res = RepairResult()
    try:
        store.refresh()
        old_files = sorted(e.name for e in os.scandir(store.index_dir) if e.name.endswith(".idx"))
        known = dict(store.packs)  # what readable index files said, for packs with a bad trailer
        packs: list[fmt.IndexPack] = []
        for e in sorted(os.scandir(store.pack_dir), key=lambda e: e.name):
            if not e.name.endswith(".pack"):
                continue
            try:
                packs.append(read_pack_trailer(Path(e.path), j.block_size))
            except (JournalError, OSError) as exc:
                name = e.name[: -len(".pack")]
                if name in known:
                    packs.append(known[name])
                    res.bad_packs.append(f"{exc}; kept the entries an index file lists")
                else:
                    res.bad_packs.append(f"{exc}; left out")
        owner = rand_hex(SID_LEN // 2)
        if packs:
            res.index_file = store.publish_index(packs, owner)
        store.remove_index_files(old_files)
        store.reload()
        res.packs_indexed = len(packs)
        res.blobs_indexed = sum(len(p.entries) for p in packs)
        res.index_files_replaced = len(old_files)
        return res
    finally:
        lk.release()
