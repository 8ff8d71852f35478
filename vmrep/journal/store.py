"""The content-addressed block store: pack files, index files, reads, garbage collection.

About 500 lines, kept in one module on purpose: the in-memory index (sorted arrays plus a
dict of recent packs), the reads through it and the garbage collection that rewrites it
share one lock and one set of structures; split, each half would reach into the other's.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import blake3
import numpy as np
import zstandard

from vmrep.errors import JournalError
from vmrep.journal import format as fmt
from vmrep.journal._fs import ensure_dir, fsync_dir, publish, rand_hex, unlink_quiet
from vmrep.journal.codec import decode_blob

log = logging.getLogger(__name__)

PACK_TARGET = 64 << 20  # a pack is closed once it holds this many bytes


def id_prefixes(ids: np.ndarray) -> np.ndarray:
    """First 8 bytes of each id (an (n, 32) uint8 array) as uint64.

    Used for set membership in GC and accounting: a prefix collision can only make an
    unreferenced block look referenced (kept), never the reverse."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.ascontiguousarray(ids[:, :8]).view("<u8").ravel()


def _member(sorted_unique: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values ∈ sorted_unique, elementwise (binary search; no re-sorting of the set)."""
    if not len(sorted_unique):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[pos] == values


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class PackWriter:
    """A pack under construction in tmp/. Callers serialise add() themselves."""

    def __init__(self, store: "BlockStore", owner: str) -> None:
        self.store = store
        self.name = owner + rand_hex(8)  # 32 hex: the owning session's id, then random
        self.tmp = store.tmp_dir / f"{self.name}.pack.tmp"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(self.fd, fmt.PACK_MAGIC)
        self.offset = len(fmt.PACK_MAGIC)
        self.rows: list[tuple[bytes, int, int, int, int]] = []

    def add(self, block_id: bytes, blob: bytes | memoryview, rlen: int, codec: int) -> int:
        off = self.offset
        view = memoryview(blob)
        total = len(view)
        while view:
            n = os.pwrite(self.fd, view, off + (total - len(view)))
            view = view[n:]
        self.offset += total
        self.rows.append((block_id, off, total, rlen, codec))
        return off

    def entries(self) -> np.ndarray:
        arr = np.zeros(len(self.rows), dtype=fmt.ENTRY_DTYPE)
        if self.rows:
            arr["id"] = np.frombuffer(b"".join(r[0] for r in self.rows), dtype=np.uint8).reshape(-1, fmt.ID_LEN)
            arr["offset"] = [r[1] for r in self.rows]
            arr["slen"] = [r[2] for r in self.rows]
            arr["rlen"] = [r[3] for r in self.rows]
            arr["codec"] = [r[4] for r in self.rows]
        return arr

    def finish(self) -> fmt.IndexPack:
        """Trailer, fsync, rename into packs/ (the caller fsyncs packs/ once for a batch)."""
        ents = self.entries()
        trailer = fmt.pack_trailer(ents)
        os.pwrite(self.fd, trailer, self.offset)
        size = self.offset + len(trailer)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.store.pack_path(self.name))
        return fmt.IndexPack(self.name, size, ents)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


Loc = tuple  # (pack name, offset, stored length, raw length, codec)


@dataclass
class GCStats:
    packs_deleted: int = 0
    packs_repacked: int = 0
    bytes_freed: int = 0
    blocks_removed: int = 0
    index_files_rewritten: int = 0
    removed_packs: list[str] = field(default_factory=list)


class BlockStore:
    def __init__(self, root: Path, block_size: int, compression_level: int) -> None:
        self.root = root
        self.block_size = block_size
        self.level = compression_level
        self.pack_dir = root / "packs"
        self.index_dir = root / "index"
        self.tmp_dir = root / "tmp"
        self.gc_dir = root / "gc"
        # condemned blobs (garbage awaiting deletion): epoch -> {(pack, id)}; file -> epoch
        self.condemned: dict[int, set[tuple[str, bytes]]] = {}
        self._condemned_files: dict[str, int] = {}
        self.condemned_ids: frozenset[bytes] = frozenset()
        self._lock = threading.RLock()
        # Block id -> location. Most entries live in sorted numpy arrays (16 bytes per
        # block besides the 49-byte entry tables); packs added since the last rebuild are
        # in a dict, folded into the arrays once it grows past RECENT_MAX.
        self._recent: dict[bytes, Loc] = {}
        # (sorted id prefixes, pack number, row in pack, pack names), replaced as a whole
        self._sorted: tuple = (np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int32), [])
        self.packs: dict[str, fmt.IndexPack] = {}
        self.index_files: dict[str, list[str]] = {}  # index file name -> pack names
        self.damaged_index: set[str] = set()  # index files that fail their checksum
        self._fds: dict[str, int] = {}
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # sorted prefixes, slen
        self.generation = 0  # bumped whenever the set of indexed blobs changes

    # ---- paths -------------------------------------------------------------------------
    def pack_path(self, name: str) -> Path:
        return self.pack_dir / f"{name}.pack"

    # ---- index -------------------------------------------------------------------------
    def refresh_condemned(self) -> None:
        with self._lock:
            try:
                names = {e.name for e in os.scandir(self.gc_dir) if fmt.COND_RE.match(e.name)}
            except FileNotFoundError:
                names = set()
            changed = False
            for n in set(self._condemned_files) - names:
                self.condemned.pop(self._condemned_files.pop(n), None)
                changed = True
            for n in sorted(names - set(self._condemned_files)):
                try:
                    epoch, pairs = fmt.decode_condemned((self.gc_dir / n).read_bytes(), f"gc/{n}")
                except FileNotFoundError:
                    continue
                self._condemned_files[n] = epoch
                self.condemned[epoch] = pairs
                changed = True
            if changed:
                self.condemned_ids = frozenset(i for pairs in self.condemned.values() for _, i in pairs)

    def reload(self) -> None:
        """Forget everything loaded and read gc/ and index/ afresh (after index files were
        replaced wholesale, as by repair_index)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self.index_files.clear()
            self.packs = {}
            self.damaged_index = set()
            self._rebuild()
            self._table = None
            self.generation += 1
        self.refresh()

    def refresh(self) -> None:
        """Bring the in-memory view in line with gc/ and index/ (changed by others).

        Condemned blobs are read first: a blob GC deletes leaves the index before its
        condemnation file goes, so this order never shows a deleted blob as usable."""
        self.refresh_condemned()
        with self._lock:
            names = {p.name for p in self.index_dir.iterdir() if p.suffix == ".idx"}
            self.damaged_index &= names
            gone = set(self.index_files) - names
            new = sorted(names - set(self.index_files) - self.damaged_index)
            loaded: dict[str, list[fmt.IndexPack]] = {}
            for n in new:
                try:
                    data = (self.index_dir / n).read_bytes()
                except FileNotFoundError:
                    continue
                try:
                    loaded[n] = fmt.decode_index(data, f"index/{n}")
                except (JournalError, ValueError, KeyError) as exc:
                    log.error("index/%s is unreadable (%s); its blocks are unavailable", n, exc)
                    self.damaged_index.add(n)
                    continue
                self.damaged_index.discard(n)
            if gone:
                for n in gone:
                    del self.index_files[n]
                keep = {p for packs in self.index_files.values() for p in packs}
                self.packs = {k: v for k, v in self.packs.items() if k in keep}
                for name in list(self._fds):
                    if name not in keep:
                        os.close(self._fds.pop(name))
                self._rebuild()
            fresh = []
            for n, packs in loaded.items():
                self.index_files[n] = [p.name for p in packs]
                for p in packs:
                    if p.name not in self.packs:
                        self.packs[p.name] = p
                        fresh.append(p)
            if fresh:
                self._add_packs(fresh)
            if gone or loaded:
                self._table = None
                self.generation += 1

    RECENT_MAX = 200_000

    def _rebuild(self) -> None:
        """Sorted arrays over every known pack (caller holds the lock)."""
        names = list(self.packs)
        if names:
            pre = np.concatenate([id_prefixes(self.packs[n].entries["id"]) for n in names])
            pno = np.concatenate([np.full(len(self.packs[n].entries), k, np.int32) for k, n in enumerate(names)])
            row = np.concatenate([np.arange(len(self.packs[n].entries), dtype=np.int32) for n in names])
            order = np.argsort(pre, kind="stable")
            self._sorted = (pre[order], pno[order], row[order], names)
        else:
            self._sorted = (np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int32), [])
        self._recent = {}

    def lookup(self, block_id: bytes) -> Loc | None:
        loc = self._recent.get(block_id)
        if loc is not None:
            return loc
        pre_arr, pno, rows, names = self._sorted
        if not len(pre_arr):
            return None
        pre = np.uint64(int.from_bytes(block_id[:8], "little"))
        k = int(np.searchsorted(pre_arr, pre))
        while k < len(pre_arr) and pre_arr[k] == pre:
            p = self.packs.get(names[pno[k]])
            if p is not None:
                e = p.entries[rows[k]]
                if e["id"].tobytes() == block_id:
                    return (p.name, int(e["offset"]), int(e["slen"]), int(e["rlen"]), int(e["codec"]))
            k += 1
        return None

    def _add_packs(self, packs: list[fmt.IndexPack]) -> None:
        """Make packs (already in self.packs) findable (caller holds the lock)."""
        if len(self._recent) + sum(len(p.entries) for p in packs) > self.RECENT_MAX:
            self._rebuild()
            return
        for p in packs:
            self._add_pack(p)

    def _add_pack(self, p: fmt.IndexPack) -> None:
        ids = p.entries["id"].tobytes()
        offs = p.entries["offset"].tolist()
        slens = p.entries["slen"].tolist()
        rlens = p.entries["rlen"].tolist()
        codecs = p.entries["codec"].tolist()
        lk = self._recent
        name = p.name
        for i in range(len(offs)):
            key = ids[i * 32 : i * 32 + 32]
            if key not in lk:
                lk[key] = (name, offs[i], slens[i], rlens[i], codecs[i])

    def publish_index(self, packs: list[fmt.IndexPack], owner: str) -> str:
        name = f"{owner}{rand_hex(8)}.idx"
        publish(self.tmp_dir, self.index_dir / name, fmt.encode_index(packs, now_iso()), owner=owner)
        with self._lock:
            self.index_files[name] = [p.name for p in packs]
            fresh = [p for p in packs if p.name not in self.packs]
            for p in fresh:
                self.packs[p.name] = p
            self._add_packs(fresh)
            self._table = None
            self.generation += 1
        return name

    def remove_index_files(self, names: list[str]) -> None:
        for n in names:
            unlink_quiet(self.index_dir / n)
        fsync_dir(self.index_dir)
        with self._lock:
            for n in names:
                self.index_files.pop(n, None)

    def has(self, block_id: bytes) -> bool:
        """Whether a writer may deduplicate against this block: indexed and not condemned."""
        return block_id not in self.condemned_ids and self.lookup(block_id) is not None

    def stored_size(self, block_id: bytes) -> int:
        loc = self.lookup(block_id)
        return loc[2] if loc else 0

    def size_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted id prefixes, stored length) over every indexed blob, for accounting."""
        with self._lock:
            if self._table is None:
                if self.packs:
                    ents = np.concatenate([p.entries for p in self.packs.values()])
                    pre = id_prefixes(ents["id"])
                    order = np.argsort(pre, kind="stable")
                    self._table = (pre[order], ents["slen"][order].astype(np.int64))
                else:
                    self._table = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
            return self._table

    def bytes_of(self, ids: np.ndarray) -> int:
        """Stored bytes of the distinct ids in an (n, 32) array (zero ids count 0)."""
        pre = np.unique(id_prefixes(ids))
        pre = pre[pre != 0] if len(pre) else pre
        table, slen = self.size_table()
        if not len(pre) or not len(table):
            return 0
        pos = np.searchsorted(table, pre)
        pos = np.minimum(pos, len(table) - 1)
        found = table[pos] == pre
        return int(slen[pos[found]].sum())

    def total_bytes(self) -> int:
        return sum(p.size for p in self.packs.values())

    # ---- reads -------------------------------------------------------------------------
    def _fd(self, pack: str) -> int:
        fd = self._fds.get(pack)
        if fd is None:
            with self._lock:
                fd = self._fds.get(pack)
                if fd is None:
                    fd = os.open(self.pack_path(pack), os.O_RDONLY)
                    self._fds[pack] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def locate(self, block_id: bytes) -> Loc:
        loc = self.lookup(block_id)
        if loc is None:
            self.refresh()
            loc = self.lookup(block_id)
            if loc is None:
                raise JournalError(f"block {block_id.hex()} is not in the journal's index")
        return loc

    def read_stored(self, loc: Loc) -> bytes:
        pack, off, slen, _rlen, _codec = loc
        try:
            blob = os.pread(self._fd(pack), slen, off)
        except FileNotFoundError:
            raise JournalError(f"pack {pack} is missing") from None
        if len(blob) != slen:
            raise JournalError(f"pack {pack} is truncated at offset {off}")
        return blob

    def read(self, block_id: bytes) -> bytes:
        for attempt in (0, 1):
            loc = self.locate(block_id)
            try:
                blob = self.read_stored(loc)
                break
            except JournalError:
                if attempt:
                    raise
                self.refresh()  # the pack may have been repacked by a GC elsewhere
        try:
            data = decode_blob(blob, loc[4], loc[3])
        except zstandard.ZstdError as exc:
            raise JournalError(f"block {block_id.hex()} in pack {loc[0]}: cannot decompress ({exc})") from None
        if len(data) != loc[3] or blake3.blake3(data).digest() != block_id:
            raise JournalError(f"block {block_id.hex()} in pack {loc[0]} at {loc[1]}: hash mismatch")
        return data

    # ---- garbage collection (caller holds gc.lock) ---------------------------------------
    def unreferenced(self, live: np.ndarray) -> set[tuple[str, bytes]]:
        """(pack, id) of every indexed blob whose id prefix is not in `live` (sorted)."""
        out: set[tuple[str, bytes]] = set()
        for name, p in self.packs.items():
            if not len(p.entries):
                continue
            dead = ~_member(live, id_prefixes(p.entries["id"]))
            if dead.any():
                ids = p.entries["id"][dead].tobytes()
                out.update((name, ids[k : k + 32]) for k in range(0, len(ids), 32))
        return out

    def publish_condemned(self, epoch: int, pairs: set[tuple[str, bytes]], owner: str) -> None:
        ensure_dir(self.gc_dir)
        publish(self.tmp_dir, self.gc_dir / fmt.condemned_name(epoch),
                fmt.encode_condemned(epoch, sorted(pairs), now_iso()), owner=owner)
        self.refresh_condemned()

    def remove_condemned(self, epochs: list[int]) -> None:
        for e in epochs:
            unlink_quiet(self.gc_dir / fmt.condemned_name(e))
        if epochs:
            fsync_dir(self.gc_dir)
        self.refresh_condemned()

    def gc(self, ready: set[tuple[str, bytes]], live: np.ndarray, repack_below: float, owner: str) -> GCStats:
        """Delete the blobs in `ready` ((pack, id) pairs whose condemnation every live
        session has seen) unless their id is live again. A pack left with no blob is
        deleted; one left with less than `repack_below` of its blob bytes is repacked."""
        st = GCStats()
        by_pack: dict[str, set[bytes]] = {}
        for pack, bid in ready:
            by_pack.setdefault(pack, set()).add(bid)
        drop: list[str] = []
        repack: list[tuple[str, np.ndarray]] = []
        for name, ids in by_pack.items():
            p = self.packs.get(name)
            if p is None:
                continue  # already gone (repacked or deleted by an earlier run)
            ents = p.entries
            raw = ents["id"].tobytes()
            dead = np.fromiter((raw[k * 32 : k * 32 + 32] in ids for k in range(len(ents))), bool, len(ents))
            dead &= ~_member(live, id_prefixes(ents["id"]))
            if not dead.any():
                continue
            st.blocks_removed += int(dead.sum())
            if dead.all():
                drop.append(name)
                continue
            keep_bytes = int(ents["slen"][~dead].sum())
            if keep_bytes < repack_below * int(ents["slen"].sum()):
                repack.append((name, ents[~dead]))
            else:
                st.blocks_removed -= int(dead.sum())  # stays until the pack is worth repacking
        if not drop and not repack:
            return st
        new_packs: list[fmt.IndexPack] = []
        writer: PackWriter | None = None
        try:
            for name, rows in repack:
                for row in rows:
                    if writer is None:
                        writer = PackWriter(self, owner)
                    bid = row["id"].tobytes()
                    blob = self.read_stored((name, int(row["offset"]), int(row["slen"]), 0, 0))
                    writer.add(bid, blob, int(row["rlen"]), int(row["codec"]))
                    if writer.offset >= PACK_TARGET:
                        new_packs.append(writer.finish())
                        writer = None
            if writer is not None:
                new_packs.append(writer.finish())
                writer = None
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        if new_packs:
            fsync_dir(self.pack_dir)
        gone = set(drop) | {n for n, _ in repack}
        affected = [n for n, packs in self.index_files.items() if gone.intersection(packs)]
        survivors = []
        seen = set()
        for n in affected:
            for pn in self.index_files[n]:
                if pn not in gone and pn not in seen and pn in self.packs:
                    seen.add(pn)
                    survivors.append(self.packs[pn])
        if survivors or new_packs:
            self.publish_index(survivors + new_packs, owner)
        self.remove_index_files(affected)
        st.index_files_rewritten = len(affected)
        with self._lock:
            for pn in gone:
                fd = self._fds.pop(pn, None)
                if fd is not None:
                    os.close(fd)
                self.packs.pop(pn, None)
        for pn in gone:
            st.bytes_freed += unlink_quiet(self.pack_path(pn))
        st.bytes_freed -= sum(p.size for p in new_packs)
        fsync_dir(self.pack_dir)
        st.packs_deleted = len(drop)
        st.packs_repacked = len(repack)
        st.removed_packs = sorted(gone)
        with self._lock:
            self._rebuild()
            self._table = None
            self.generation += 1
        return st
