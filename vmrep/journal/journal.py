"""The journal: a content-addressed block store plus a per-VPG index of checkpoints.

Layout and protocols are in docs/journal-format.md. In short:

    <root>/journal.json                      repository settings (block size, format)
    <root>/gc.lock                           flock: one garbage collection / recover at a time
    <root>/locks/<sid>.lock                  flock: one per live session (writer, reader, ...)
    <root>/packs/<32 hex>.pack               compressed blocks, immutable
    <root>/index/<32 hex>.idx                which blocks are in which pack, immutable
    <root>/gc/condemned-<n>.ids              unreferenced blobs awaiting deletion
    <root>/tmp/                              temp files (removed by recover())
    <root>/vpgs/<vpg>/writer.lock            flock: one checkpoint writer / retention per VPG
    <root>/vpgs/<vpg>/checkpoints/<id>.ckpt  one per checkpoint: the blocks changed in it
    <root>/vpgs/<vpg>/base/<id>.base         full block maps as of checkpoint <id>
    <root>/vpgs/<vpg>/start/<id>.start       history starts at checkpoint <id> (retention)
    <root>/vpgs/<vpg>/tags/<id>.<hex>.tag    a tag added after the fact
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from vmrep.errors import JournalError
from vmrep.journal import format as fmt
from vmrep.journal._fs import FileLock, ensure_dir, fsync_dir, publish, rand_hex, unlink_quiet
from vmrep.journal._sessions import SID_LEN, Session, live_sessions, live_sessions_of
from vmrep.journal import store as _store
from vmrep.journal.store import (
    BlockStore,
    GCStats,
    PackWriter,
    encode_blob,
    id_prefixes,
    now_iso,
)

log = logging.getLogger(__name__)

_ZERO_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is 0 (memcmp speed, no copy of the block)."""
    n = len(data)
    if isinstance(data, (bytes, bytearray)):
        return data.startswith(_zeros(n))
    head = bytes(data[:64])
    if head != _zeros(len(head)):
        return False
    return not np.count_nonzero(np.frombuffer(data, dtype=np.uint8))


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _parse_time(s: str) -> datetime:
    return _utc(datetime.fromisoformat(s))


# ---- public result types ------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    id: str
    seq: int
    time: datetime
    tags: list[str] = field(default_factory=list)
    added_bytes: int = 0
    changed_blocks: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Mismatch:
    vm: str
    disk: str
    offset: int
    block_id: str  # hex; "" when the problem is not one block (e.g. a damaged checkpoint file)
    reason: str

    def __str__(self) -> str:
        return f"{self.vm}/{self.disk} @ {self.offset}: block {self.block_id[:16]}…: {self.reason}"


@dataclass
class RetentionResult:
    vpg: str
    base: str | None  # id of the oldest kept checkpoint (history start) after retention
    promoted: list[str] = field(default_factory=list)  # left the time window, merged into base
    dropped_by_limit: list[str] = field(default_factory=list)  # dropped to honour the hard limit
    hard_limit_hit: bool = False  # the hard limit removed history (raise an alert)
    over_limit: bool = False  # still over the hard limit with only the newest checkpoint left
    bytes_before: int = 0  # VPG usage before
    bytes_after: int = 0  # VPG usage after
    gc: GCStats | None = None
    gc_deferred: bool = False  # some garbage is condemned but not deleted yet (sessions older
    # than its condemnation are still running): a later run reclaims the space
    compacted: bool = False  # a new base file was written

    @property
    def dropped(self) -> list[str]:
        return self.promoted + self.dropped_by_limit


@dataclass
class Usage:
    vpg: str
    total_bytes: int  # stored (compressed) bytes referenced by the VPG's kept checkpoints
    base_bytes: int  # of which: the disks as of the oldest kept checkpoint
    history_bytes: int  # of which: blocks changed after it
    history_start: datetime | None  # time of the oldest kept checkpoint
    newest: datetime | None
    checkpoints: int


@dataclass
class RecoverResult:
    busy: bool = False  # a writer was active: nothing was removed
    temp_files_removed: int = 0
    packs_removed: int = 0
    files_removed: int = 0  # superseded checkpoint/base/start/tag/index files
    bytes_freed: int = 0
    missing_packs: list[str] = field(default_factory=list)  # indexed but absent (damage)
    problems: list[str] = field(default_factory=list)  # damage found on the way (see verify)


class BlockMap(Sequence):
    """Block ids of one disk at one checkpoint: map[i] is the id (32 bytes) or None (zero)."""

    def __init__(self, ids: np.ndarray, block_size: int, size: int) -> None:
        self._ids = ids  # (n, 32) uint8, read-only
        self.block_size = block_size
        self.size = size
        self._nz: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self._ids):
            raise IndexError(i)
        if not self.nonzero_mask[i]:
            return None
        return self._ids[i].tobytes()

    def get(self, i: int) -> bytes | None:
        """Like map[i] but None beyond the end (a disk that grew)."""
        if 0 <= i < len(self._ids) and self.nonzero_mask[i]:
            return self._ids[i].tobytes()
        return None

    @property
    def nonzero_mask(self) -> np.ndarray:
        if self._nz is None:
            self._nz = self._ids.any(axis=1) if len(self._ids) else np.zeros(0, bool)
        return self._nz

    def nonzero_indexes(self) -> np.ndarray:
        return np.flatnonzero(self.nonzero_mask)

    @property
    def array(self) -> np.ndarray:
        return self._ids

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockMap):
            return np.array_equal(self._ids, other._ids)
        return list(self) == other


# ---- the chain of files of one VPG -------------------------------------------------------

@dataclass
class _Chain:
    vpg: str
    dir: Path
    base: Path | None
    base_seq: int
    start_seq: int | None  # seq of the oldest kept checkpoint (None: no checkpoint yet)
    deltas: dict[int, Path]  # every delta file by seq (including hidden ones)
    starts: dict[int, Path]
    max_seq: int

    def visible_seqs(self) -> list[int]:
        if self.start_seq is None:
            return []
        out = [s for s in sorted(self.deltas) if s > self.start_seq]
        return [self.start_seq] + out

    def build_files(self, seq: int) -> list[tuple[int, Path]]:
        """The files whose maps, applied in order, give checkpoint `seq`."""
        files = [(self.base_seq, self.base)] if self.base is not None else []
        files += [(s, p) for s, p in sorted(self.deltas.items()) if self.base_seq < s <= seq]
        return files

    def file_of(self, seq: int) -> Path:
        if self.base is not None and seq == self.base_seq:
            return self.base
        return self.deltas[seq]


def _seq_from_name(name: str) -> int | None:
    stem = name.split(".", 1)[0]
    m = fmt.CP_ID_RE.match(stem)
    return int(m.group(1)) if m else None


class Journal:
    """See the module docstring. Thread-safe; several processes may open one journal."""

    lock_timeout = 300.0  # retention waits this long for the VPG's writer to finish
    gc_lock_timeout = 2.0  # a garbage collection waits this long for another one to end
    compact_ratio = 0.25  # rewrite the base when hidden deltas exceed this share of it ...
    compact_min_bytes = 1 << 20  # ... and this many bytes
    compact_max_files = 512  # or when this many hidden deltas pile up
    repack_below = 0.5  # repack a pack when less than this share of it is still referenced
    cache_bytes = 512 << 20

    def __init__(self, root: Path, block_size: int, compression_level: int) -> None:
        self.root = root
        self.block_size = block_size
        self.compression_level = compression_level
        self.store = BlockStore(root, block_size, compression_level)
        self._files: OrderedDict[str, fmt.CkptFile] = OrderedDict()
        self._files_bytes = 0
        self._maps: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._maps_bytes = 0
        self._cache_lock = threading.RLock()
        self._usage_cache: dict[str, tuple] = {}

    # ---- open ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls, root: Path, *, block_size: int = 1 << 20, compression_level: int = 1, create: bool = True
    ) -> "Journal":
        root = Path(root)
        cfg_path = root / "journal.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("format") != fmt.FORMAT_VERSION or cfg.get("kind") != "vmrep-journal":
                raise JournalError(f"{root}: not a vmrep journal of format {fmt.FORMAT_VERSION}")
            if cfg["block_size"] != block_size:
                log.warning(
                    "journal %s has block size %d; the configured %d applies to new journals only",
                    root, cfg["block_size"], block_size,
                )
            block_size = cfg["block_size"]
        else:
            if not create:
                raise JournalError(f"no journal at {root}")
            if block_size < 4096 or block_size & (block_size - 1):
                raise JournalError(f"block size {block_size} is not a power of two >= 4096")
            for sub in ("packs", "index", "tmp", "vpgs", "locks", "gc"):
                ensure_dir(root / sub)
            cfg = {
                "format": fmt.FORMAT_VERSION,
                "kind": "vmrep-journal",
                "id": rand_hex(16),
                "created": now_iso(),
                "block_size": block_size,
                "hash": "blake3-256",
                "compression": "zstd",
            }
            publish(root / "tmp", cfg_path, json.dumps(cfg, indent=1).encode())
        for sub in ("packs", "index", "tmp", "vpgs", "locks", "gc"):
            ensure_dir(root / sub)
        j = cls(root, block_size, compression_level)
        j.recover(wait=0.0)
        j.store.refresh()
        return j

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- locks ---------------------------------------------------------------------------
    def _session(self, kind: str, vpg: str | None = None) -> Session:
        """Register as a user of the journal, then load the index: garbage collection will
        not delete a blob this session might still deduplicate against or read."""
        s = Session(self.root, kind, vpg)
        try:
            self.store.refresh()  # condemned blobs first, then the index
            s.set_epoch(max(self.store.condemned, default=0))
        except BaseException:
            s.close()
            raise
        return s

    def _gc_lock(self, timeout: float) -> FileLock | None:
        lk = FileLock(self.root / "gc.lock", shared=False)
        return lk if lk.acquire(timeout) else None

    def _vpg_lock(self, vpg: str, timeout: float, what: str) -> FileLock:
        d = self._vpg_dir(vpg)
        ensure_dir(d)
        lk = FileLock(d / "writer.lock", shared=False)
        if not lk.acquire(timeout):
            raise JournalError(f"VPG {vpg}: journal is locked by another writer ({what} refused)")
        return lk

    # ---- file cache ----------------------------------------------------------------------
    def _vpg_dir(self, vpg: str) -> Path:
        return self.root / "vpgs" / fmt.vpg_dirname(vpg)

    def _read_ckpt(self, path: Path) -> fmt.CkptFile:
        key = str(path)
        with self._cache_lock:
            f = self._files.get(key)
            if f is not None:
                self._files.move_to_end(key)
                return f
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise JournalError(f"{path.name}: checkpoint file vanished (retention ran meanwhile?)") from None
        f = fmt.decode_ckpt(data, str(path.relative_to(self.root)))
        with self._cache_lock:
            self._files[key] = f
            self._files_bytes += f.nbytes
            while self._files_bytes > self.cache_bytes and len(self._files) > 1:
                _, old = self._files.popitem(last=False)
                self._files_bytes -= old.nbytes
        return f

    def _chain(self, vpg: str) -> _Chain:
        d = self._vpg_dir(vpg)

        def scan(sub: str, suffix: str) -> dict[int, Path]:
            out: dict[int, Path] = {}
            try:
                for e in os.scandir(d / sub):
                    if e.name.endswith(suffix):
                        s = _seq_from_name(e.name)
                        if s is not None:
                            out[s] = Path(e.path)
            except FileNotFoundError:
                pass
            return out

        deltas = scan("checkpoints", ".ckpt")
        bases = scan("base", ".base")
        starts = scan("start", ".start")
        base_seq = max(bases) if bases else 0
        base = bases[base_seq] if bases else None
        cand = [base_seq] if base else []
        cand += [s for s in starts if s in deltas or (base and s == base_seq)]
        if cand:
            start = max(cand)
        else:
            start = min(deltas) if deltas else None
        max_seq = max([base_seq, *deltas, *starts]) if (deltas or starts or bases) else 0
        return _Chain(vpg, d, base, base_seq, start, deltas, starts, max_seq)

    def _info_from_header(self, h: dict[str, Any], tags: list[str]) -> CheckpointInfo:
        c = h["checkpoint"]
        return CheckpointInfo(
            id=c["id"],
            seq=c["seq"],
            time=_parse_time(c["time"]),
            tags=list(c.get("tags", [])) + [t for t in tags if t not in c.get("tags", [])],
            added_bytes=c.get("added_bytes", 0),
            changed_blocks=c.get("changed_blocks", 0),
            meta=c.get("meta", {}),
        )

    def _tags(self, chain: _Chain) -> dict[str, list[str]]:
        out: dict[str, list[tuple[str, str]]] = {}
        try:
            entries = list(os.scandir(chain.dir / "tags"))
        except FileNotFoundError:
            return {}
        for e in entries:
            if not e.name.endswith(".tag"):
                continue
            try:
                t = json.loads(Path(e.path).read_text())
            except (FileNotFoundError, ValueError):
                continue
            out.setdefault(t["checkpoint"], []).append((t.get("time", ""), t["tag"]))
        return {k: [tag for _, tag in sorted(v)] for k, v in out.items()}

    def _infos(self, chain: _Chain) -> list[CheckpointInfo]:
        tags = self._tags(chain)
        out = []
        for s in chain.visible_seqs():
            h = self._read_ckpt(chain.file_of(s)).header
            out.append(self._info_from_header(h, tags.get(h["checkpoint"]["id"], [])))
        return out

    # ---- maps ----------------------------------------------------------------------------
    def _map_array(self, chain: _Chain, seq: int, vm: str, disk: str) -> tuple[np.ndarray, int] | None:
        """(ids array, size) of a disk at checkpoint `seq`, or None if the disk is absent."""
        bs = self.block_size
        base_key = str(chain.base) if chain.base else ""
        ckey = (chain.vpg, base_key, vm, disk)
        best: tuple[int, np.ndarray, int] | None = None
        with self._cache_lock:
            # a cached map is usable if the file it was built up to is still in this chain
            # (a VPG removed and created again reuses sequence numbers, never file names)
            for (v, b, m, dk, s), val in self._maps.items():
                if (v, b, m, dk) == ckey and s <= seq and (best is None or s > best[0]):
                    if val[2] == self._file_at(chain, s):
                        best = (s, val[0], val[1])
            if best is not None and best[0] == seq:
                self._maps.move_to_end((*ckey, seq))
                return best[1], best[2]
        arr: np.ndarray | None = None
        size = 0
        owned = False
        files = chain.build_files(seq)
        if best is not None and best[0] >= chain.base_seq:
            arr, size = best[1], best[2]
            files = [(s, p) for s, p in files if s > best[0]]
        for _s, path in files:
            f = self._read_ckpt(path)
            d = next((d for d in f.header["disks"] if d["vm"] == vm and d["disk"] == disk), None)
            if d is None:
                arr, owned, size = None, False, 0
                continue
            size = d["size"]
            n = -(-size // bs)
            if arr is None or d.get("reset"):
                arr = np.zeros((n, fmt.ID_LEN), dtype=np.uint8)
                owned = True
            elif len(arr) != n:
                new = np.zeros((n, fmt.ID_LEN), dtype=np.uint8)
                k = min(n, len(arr))
                new[:k] = arr[:k]
                arr, owned = new, True
            ents = f.maps[(vm, disk)]
            if len(ents):
                if not owned:
                    arr = arr.copy()
                    owned = True
                idx = ents["index"]
                ok = idx < n
                if not ok.all():
                    arr[idx[ok].astype(np.intp)] = ents["id"][ok]
                else:
                    arr[idx.astype(np.intp)] = ents["id"]
        if arr is None:
            return None
        arr.flags.writeable = False
        with self._cache_lock:
            self._maps[(*ckey, seq)] = (arr, size, self._file_at(chain, seq))
            self._maps_bytes += arr.nbytes
            while self._maps_bytes > self.cache_bytes and len(self._maps) > 1:
                _, old = self._maps.popitem(last=False)
                self._maps_bytes -= old[0].nbytes
        return arr, size

    @staticmethod
    def _file_at(chain: _Chain, seq: int) -> Path | None:
        if chain.base is not None and seq == chain.base_seq:
            return chain.base
        return chain.deltas.get(seq)

    def _disks_at(self, chain: _Chain, seq: int) -> dict[tuple[str, str], int]:
        h = self._read_ckpt(chain.file_of(seq)).header
        return {(d["vm"], d["disk"]): d["size"] for d in h["disks"]}

    def _resolve(self, vpg: str, ref: str) -> tuple[_Chain, CheckpointInfo]:
        chain = self._chain(vpg)
        infos = self._infos(chain)
        if not infos:
            raise JournalError(f"VPG {vpg}: no checkpoint in the journal (ref {ref!r})")
        if ref == "latest":
            return chain, infos[-1]
        if ref == "latest-tagged":
            tagged = [i for i in infos if i.tags]
            if not tagged:
                raise JournalError(f"VPG {vpg}: no tagged checkpoint (ref {ref!r})")
            return chain, tagged[-1]
        for i in infos:
            if i.id == ref:
                return chain, i
        if ref.startswith("cp-"):
            hits = [i for i in infos if i.id.startswith(ref)]
            if len(hits) == 1:
                return chain, hits[0]
            raise JournalError(f"VPG {vpg}: no kept checkpoint {ref!r}")
        try:
            t = _parse_time(ref)
        except ValueError:
            raise JournalError(f"VPG {vpg}: checkpoint ref {ref!r} is not an id, 'latest', "
                               "'latest-tagged' or an ISO time") from None
        before = [i for i in infos if i.time <= t]
        if not before:
            raise JournalError(f"VPG {vpg}: no kept checkpoint at or before {ref!r} "
                               f"(history starts {infos[0].time.isoformat()})")
        return chain, before[-1]

    # ---- public read API -----------------------------------------------------------------
    def vpgs(self) -> list[str]:
        d = self.root / "vpgs"
        return sorted(fmt.vpg_from_dirname(e.name) for e in os.scandir(d) if e.is_dir())

    def checkpoints(self, vpg: str) -> list[CheckpointInfo]:
        return self._infos(self._chain(vpg))

    def checkpoint(self, vpg: str, ref: str) -> CheckpointInfo:
        return self._resolve(vpg, ref)[1]

    def disks(self, vpg: str, checkpoint_id: str) -> dict[tuple[str, str], int]:
        chain, info = self._resolve(vpg, checkpoint_id)
        return self._disks_at(chain, info.seq)

    def block_map(self, vpg: str, checkpoint_id: str, vm: str, disk: str) -> BlockMap:
        chain, info = self._resolve(vpg, checkpoint_id)
        r = self._map_array(chain, info.seq, vm, disk)
        if r is None:
            raise JournalError(f"VPG {vpg}: VM {vm} has no disk {disk!r} at checkpoint {info.id}")
        return BlockMap(r[0], self.block_size, r[1])

    def read_block(self, block_id: bytes) -> bytes:
        return self.store.read(block_id)

    def iter_disk(self, vpg: str, checkpoint_id: str, vm: str, disk: str) -> Iterator[tuple[int, bytes | None]]:
        m = self.block_map(vpg, checkpoint_id, vm, disk)
        bs = self.block_size
        for i in range(len(m)):
            bid = m.get(i)
            yield i * bs, (None if bid is None else self.store.read(bid))

    def restore_disk(
        self,
        vpg: str,
        checkpoint_id: str,
        vm: str,
        disk: str,
        out: Path,
        *,
        progress: Callable[[int], None] | None = None,
        threads: int = 2,
        fsync: bool = True,
    ) -> int:
        """Write the disk as of the checkpoint to `out` (a sparse file: zero blocks are
        holes). Returns the bytes written. `progress(n)` is called with each n bytes done."""
        lk = self._session("restore", vpg)
        try:
            m = self.block_map(vpg, checkpoint_id, vm, disk)
            bs = self.block_size
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, m.size)
                nz = m.nonzero_indexes()
                if progress and len(m) > len(nz):
                    progress(min(m.size, (len(m) - len(nz)) * bs))
                plock = threading.Lock()
                written = 0

                def work(chunk: np.ndarray) -> None:
                    nonlocal written
                    for i in chunk.tolist():
                        data = self.store.read(m.array[i].tobytes())
                        view = memoryview(data)
                        off = i * bs
                        while view:
                            n = os.pwrite(fd, view, off)
                            view, off = view[n:], off + n
                        with plock:
                            written += len(data)
                        if progress:
                            progress(len(data))

                chunks = np.array_split(nz, max(1, min(len(nz) // 16, 64 * threads))) if len(nz) else []
                if threads > 1 and len(chunks) > 1:
                    with ThreadPoolExecutor(threads) as ex:
                        list(ex.map(work, chunks))
                else:
                    for c in chunks:
                        work(c)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return written
        finally:
            lk.close()

    # ---- writing -------------------------------------------------------------------------
    def begin(self, vpg: str) -> "CheckpointWriter":
        vlock = self._vpg_lock(vpg, 0.0, "begin")
        try:
            session = self._session("writer", vpg)
        except BaseException:
            vlock.release()
            raise
        try:
            d = self._vpg_dir(vpg)
            for sub in ("checkpoints", "base", "start", "tags"):
                ensure_dir(d / sub)
            chain = self._chain(vpg)
            prev: dict[tuple[str, str], int] = {}
            prev_time = None
            if chain.start_seq is not None:
                last = chain.visible_seqs()[-1]
                h = self._read_ckpt(chain.file_of(last)).header
                prev = {(x["vm"], x["disk"]): x["size"] for x in h["disks"]}
                prev_time = _parse_time(h["checkpoint"]["time"])
                prev_id = h["checkpoint"]["id"]
            else:
                prev_id = None
            return CheckpointWriter(self, vpg, chain.max_seq + 1, prev, prev_time, prev_id, vlock, session)
        except BaseException:
            session.close()
            vlock.release()
            raise

    def add_tag(self, vpg: str, checkpoint_id: str, tag: str) -> None:
        if not tag:
            raise JournalError("empty tag")
        chain, info = self._resolve(vpg, checkpoint_id)
        if info.id != checkpoint_id:
            raise JournalError(f"VPG {vpg}: add_tag needs a checkpoint id, got {checkpoint_id!r}")
        if tag in info.tags:
            return
        with Session(self.root, "tag", vpg) as s:
            ensure_dir(chain.dir / "tags")
            name = f"{info.id}.{blake3.blake3(tag.encode()).hexdigest()[:16]}.tag"
            body = {"format": fmt.FORMAT_VERSION, "checkpoint": info.id, "tag": tag, "time": now_iso()}
            publish(self.root / "tmp", chain.dir / "tags" / name, json.dumps(body).encode(), owner=s.sid)

    # ---- accounting ----------------------------------------------------------------------
    def _referenced(self, chain: _Chain, start_seq: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(base id arrays, history id arrays) referenced if history started at start_seq."""
        base = []
        for (vm, disk) in self._disks_at(chain, start_seq):
            r = self._map_array(chain, start_seq, vm, disk)
            if r is not None:
                base.append(r[0])
        hist = []
        for s in chain.visible_seqs():
            if s > start_seq:
                f = self._read_ckpt(chain.deltas[s])
                hist += [m["id"] for m in f.maps.values() if len(m)]
        return base, hist

    def _usage_at(self, chain: _Chain, start_seq: int) -> tuple[int, int]:
        base, hist = self._referenced(chain, start_seq)
        empty = np.zeros((0, fmt.ID_LEN), np.uint8)
        b = self.store.bytes_of(np.concatenate(base) if base else empty)
        t = self.store.bytes_of(np.concatenate(base + hist) if base or hist else empty)
        return t, b

    def usage(self, vpg: str) -> Usage:
        chain = self._chain(vpg)
        infos = self._infos(chain)
        if not infos:
            return Usage(vpg, 0, 0, 0, None, None, 0)
        self.store.refresh()
        key = (vpg, chain.base, tuple(chain.file_of(s) for s in chain.visible_seqs()), self.store.generation)
        cached = self._usage_cache.get(vpg)
        if cached is not None and cached[0] == key:
            total, base = cached[1]
        else:
            total, base = self._usage_at(chain, infos[0].seq)
            self._usage_cache[vpg] = (key, (total, base))
        return Usage(vpg, total, base, total - base, infos[0].time, infos[-1].time, len(infos))

    # ---- retention -----------------------------------------------------------------------
    def apply_retention(
        self, vpg: str, keep_since: datetime, hard_limit_bytes: int | None = None
    ) -> RetentionResult:
        keep_since = _utc(keep_since)
        vlock = self._vpg_lock(vpg, self.lock_timeout, "retention")
        try:
            session = self._session("retention", vpg)
            try:
                chain = self._chain(vpg)
                infos = self._infos(chain)
                res = RetentionResult(vpg, infos[0].id if infos else None)
                if not infos:
                    return res
                j = next((k for k, i in enumerate(infos) if i.time >= keep_since), len(infos) - 1)
                res.bytes_before = self._usage_at(chain, infos[0].seq)[0]
                final = j
                if hard_limit_bytes is not None and hard_limit_bytes > 0:
                    if self._usage_at(chain, infos[j].seq)[0] > hard_limit_bytes:
                        lo, hi = j + 1, len(infos) - 1
                        final = hi
                        while lo <= hi:  # usage never grows as the start moves forward
                            mid = (lo + hi) // 2
                            if self._usage_at(chain, infos[mid].seq)[0] <= hard_limit_bytes:
                                final, hi = mid, mid - 1
                            else:
                                lo = mid + 1
                        res.hard_limit_hit = final > j
                        res.over_limit = self._usage_at(chain, infos[final].seq)[0] > hard_limit_bytes
                res.promoted = [i.id for i in infos[:j]]
                res.dropped_by_limit = [i.id for i in infos[j:final]]
                res.base = infos[final].id
                if final > 0:
                    self._move_start(chain, infos[final], [i.id for i in infos[:final]], session.sid)
                    chain = self._chain(vpg)
                    res.compacted = self._maybe_compact(chain, session.sid)
                    if res.compacted:
                        chain = self._chain(vpg)
                res.bytes_after = self._usage_at(chain, chain.start_seq)[0]
            finally:
                session.close()
            if final > 0:
                res.gc, res.gc_deferred = self._gc()
            return res
        finally:
            vlock.release()

    def _move_start(self, chain: _Chain, new_start: CheckpointInfo, dropped: list[str], owner: str) -> None:
        d = chain.dir
        ensure_dir(d / "start")
        body = {"format": fmt.FORMAT_VERSION, "checkpoint": new_start.id, "seq": new_start.seq,
                "written": now_iso(), "dropped": dropped}
        publish(self.root / "tmp", d / "start" / f"{new_start.id}.start", json.dumps(body).encode(), owner=owner)
        for s, p in chain.starts.items():
            if s < new_start.seq:
                unlink_quiet(p)
        self._drop_tags(d, {x for x in dropped})
        fsync_dir(d / "start")

    def _drop_tags(self, d: Path, ids: set[str]) -> int:
        n = 0
        try:
            for e in os.scandir(d / "tags"):
                if e.name.endswith(".tag") and e.name.split(".", 1)[0] in ids:
                    unlink_quiet(Path(e.path))
                    n += 1
        except FileNotFoundError:
            return 0
        if n:
            fsync_dir(d / "tags")
        return n

    def _maybe_compact(self, chain: _Chain, owner: str, force: bool = False) -> bool:
        """Fold the hidden deltas (before the history start) into a new base file."""
        start = chain.start_seq
        if start is None or start == chain.base_seq:
            return False
        hidden = [p for s, p in chain.deltas.items() if chain.base_seq < s <= start]
        hidden_bytes = sum(p.stat().st_size for p in hidden)
        base_bytes = chain.base.stat().st_size if chain.base else 0
        if not force and hidden_bytes < max(self.compact_min_bytes, self.compact_ratio * base_bytes) \
                and len(hidden) < self.compact_max_files:
            return False
        self._write_base(chain, start, owner)
        return True

    def _write_base(self, chain: _Chain, seq: int, owner: str) -> None:
        h = self._read_ckpt(chain.file_of(seq)).header
        disks, maps = [], []
        for d in h["disks"]:
            arr, size = self._map_array(chain, seq, d["vm"], d["disk"])  # type: ignore[misc]
            nz = np.flatnonzero(arr.any(axis=1))
            m = np.zeros(len(nz), dtype=fmt.MAP_DTYPE)
            m["index"] = nz
            m["id"] = arr[nz]
            disks.append({"vm": d["vm"], "disk": d["disk"], "size": size, "reset": True})
            maps.append(m)
        header = {
            "format": fmt.FORMAT_VERSION,
            "kind": "base",
            "vpg": chain.vpg,
            "block_size": self.block_size,
            "written": now_iso(),
            "checkpoint": h["checkpoint"],
            "disks": disks,
        }
        cp_id = h["checkpoint"]["id"]
        ensure_dir(chain.dir / "base")
        publish(self.root / "tmp", chain.dir / "base" / f"{cp_id}.base", fmt.encode_ckpt(header, maps),
                owner=owner)
        # The new base supersedes: older bases, deltas up to seq, start markers up to seq.
        if chain.base is not None:
            unlink_quiet(chain.base)
        for s, p in chain.deltas.items():
            if s <= seq:
                unlink_quiet(p)
        for s, p in chain.starts.items():
            if s <= seq:
                unlink_quiet(p)
        for sub in ("base", "checkpoints", "start"):
            fsync_dir(chain.dir / sub)

    # ---- garbage collection --------------------------------------------------------------
    def _live_prefixes(self) -> np.ndarray:
        parts = []
        for vpg in self.vpgs():
            chain = self._chain(vpg)
            if chain.start_seq is None:
                continue
            base, hist = self._referenced(chain, chain.start_seq)
            parts += [id_prefixes(a) for a in base + hist]
        if not parts:
            return np.zeros(0, np.uint64)
        return np.unique(np.concatenate(parts))

    def _gc(self) -> tuple[GCStats | None, bool]:
        """One garbage-collection run; returns (stats, whether garbage still awaits deletion).

        Deletes the condemned blobs whose condemnation every live session has seen and
        that are still unreferenced, then condemns what is newly unreferenced; with no
        other session alive, that is deleted at once too. Never waits for writers."""
        lk = self._gc_lock(self.gc_lock_timeout)
        if lk is None:
            return None, True  # another GC is running
        try:
            owner = rand_hex(SID_LEN // 2)  # names GC's temp files; gc.lock keeps recover() away
            total = GCStats()
            for attempt in (0, 1):
                sessions = live_sessions(self.root)
                self.store.refresh()
                floor = min(sessions.values(), default=None)
                ready = sorted(e for e in self.store.condemned if floor is None or e <= floor)
                live = self._live_prefixes()
                if ready:
                    pairs: set[tuple[str, bytes]] = set().union(*(self.store.condemned[e] for e in ready))
                    st = self.store.gc(pairs, live, self.repack_below, owner)
                    total.packs_deleted += st.packs_deleted
                    total.packs_repacked += st.packs_repacked
                    total.bytes_freed += st.bytes_freed
                    total.blocks_removed += st.blocks_removed
                    total.index_files_rewritten += st.index_files_rewritten
                    total.removed_packs += st.removed_packs
                    self.store.remove_condemned(ready)  # only after the index no longer lists them
                if attempt:
                    break
                known = {p for pairs_ in self.store.condemned.values() for p in pairs_}
                garbage = self.store.unreferenced(live) - known
                if not garbage:
                    break
                epoch = max([0, *self.store.condemned, *sessions.values()]) + 1
                self.store.publish_condemned(epoch, garbage, owner)
                # sessions are listed again (after publishing): those that began before it
                # have not seen it and hold its deletion back
            return total, bool(self.store.condemned)
        finally:
            lk.release()

    def gc(self) -> GCStats | None:
        """Remove blocks no kept checkpoint of any VPG references (see _gc). None if another
        garbage collection is running."""
        return self._gc()[0]

    def remove_vpg(self, vpg: str) -> None:
        d = self._vpg_dir(vpg)
        if not d.exists():
            raise JournalError(f"VPG {vpg}: not in the journal")
        vlock = self._vpg_lock(vpg, 0.0, "remove")
        try:
            with Session(self.root, "remove", vpg) as s:
                trash = self.root / "tmp" / f"{s.sid}trash-{rand_hex(8)}"
                os.rename(d, trash)
                fsync_dir(d.parent)
                fsync_dir(trash.parent)
                shutil.rmtree(trash, ignore_errors=True)
        finally:
            vlock.release()
        with self._cache_lock:
            for k in [k for k in self._maps if k[0] == vpg]:
                self._maps_bytes -= self._maps.pop(k)[0].nbytes
        self._usage_cache.pop(vpg, None)
        self._gc()

    # ---- verification --------------------------------------------------------------------
    def verify(self, vpg: str, checkpoint_id: str | None = None, *, threads: int = 2) -> list[Mismatch]:
        """Re-read and re-hash every block the kept checkpoints (or the one given) use."""
        with self._session("verify", vpg):  # what it reads is not deleted meanwhile
            return self._verify(vpg, checkpoint_id, threads)

    def _verify(self, vpg: str, checkpoint_id: str | None, threads: int) -> list[Mismatch]:
        chain = self._chain(vpg)
        out: list[Mismatch] = []
        try:
            infos = [self._resolve(vpg, checkpoint_id)[1]] if checkpoint_id else self._infos(chain)
        except JournalError as exc:
            if checkpoint_id:
                raise
            return [Mismatch("*", "*", -1, "", str(exc))]
        self.store.refresh()
        maps: list[tuple[str, str, np.ndarray]] = []
        for info in infos:
            try:
                for (vm, disk) in self._disks_at(chain, info.seq):
                    r = self._map_array(chain, info.seq, vm, disk)
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
                    self.store.read(bid)
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
                    out.append(Mismatch(vm, disk, i * self.block_size, bid.hex(), bad[bid]))
        return out

    # ---- recovery ------------------------------------------------------------------------
    def recover(self, *, wait: float = 5.0) -> RecoverResult:
        """Remove what a crash left behind: temp files and unindexed packs of sessions that
        are gone, files that a newer base or start marker supersedes, lock files of dead
        sessions. Live sessions' files are left alone, so it can run at any time; it
        returns busy=True (and does nothing) while a garbage collection is running."""
        lk = self._gc_lock(wait)
        if lk is None:
            return RecoverResult(busy=True)
        res = RecoverResult()
        alive: dict[str, bool] = dict.fromkeys(live_sessions(self.root), True)

        def owner_alive(name: str) -> bool:
            owner = name[:SID_LEN]
            if owner not in alive:  # began after the listing above? look again
                alive[owner] = owner in live_sessions_of(self.root, owner)
            return alive[owner]

        try:
            tmp = self.root / "tmp"
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
            self.store.refresh()
            indexed = set(self.store.packs)
            present = set()
            if self.store.damaged_index:
                res.problems += [f"index/{n}: unreadable; packs it may list are kept"
                                 for n in self.store.damaged_index]
            for e in os.scandir(self.root / "packs"):
                if e.name.endswith(".pack"):
                    name = e.name[: -len(".pack")]
                    present.add(name)
                    if name not in indexed and not self.store.damaged_index and not owner_alive(name):
                        res.bytes_freed += unlink_quiet(Path(e.path))
                        res.packs_removed += 1
            if res.packs_removed:
                fsync_dir(self.root / "packs")
            res.missing_packs = sorted(indexed - present)
            for vpg in self.vpgs():
                try:
                    res.files_removed += self._recover_vpg(vpg, res)
                except (OSError, JournalError) as exc:
                    res.problems.append(f"VPG {vpg}: {exc}")
            return res
        finally:
            lk.release()

    def _recover_vpg(self, vpg: str, res: RecoverResult) -> int:
        chain = self._chain(vpg)
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
            removed += self._drop_tags(chain.dir, orphans)
        for sub in ("base", "checkpoints", "start"):
            if (chain.dir / sub).exists() and removed:
                fsync_dir(chain.dir / sub)
        return removed


class CheckpointWriter:
    """Collects one checkpoint of one VPG. Use as a context manager; abort on exception.

    put_block/put_zero are thread-safe: hashing and compression run outside the lock."""

    def __init__(
        self,
        journal: Journal,
        vpg: str,
        seq: int,
        prev_disks: dict[tuple[str, str], int],
        prev_time: datetime | None,
        prev_id: str | None,
        vlock: FileLock,
        session: Session,
    ) -> None:
        self.journal = journal
        self.vpg = vpg
        self.seq = seq
        self.block_size = journal.block_size
        self._store = journal.store
        self._prev_disks = prev_disks
        self._prev_time = prev_time
        self._prev_id = prev_id
        self._vlock, self._session = vlock, session
        self.sid = session.sid
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pack: PackWriter | None = None
        self._finishing = 0
        self._finisher: ThreadPoolExecutor | None = None
        self._pending: set[bytes] = set()
        self._inflight: set[bytes] = set()
        self._index_files: list[str] = []
        self._packs: list[Any] = []
        self._entries: dict[tuple[str, str], dict[int, bytes]] = {}
        self._sizes: dict[tuple[str, str], int] = {}
        self._removed: set[tuple[str, str]] = set()
        self._reset: set[tuple[str, str]] = set()
        self.added_bytes = 0
        self._broken: BaseException | None = None
        self._closed = False

    # ---- context manager -----------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._closed:
            self.abort()

    def _check(self) -> None:
        if self._closed:
            raise JournalError(f"VPG {self.vpg}: checkpoint writer already closed")

    def _disk_known(self, key: tuple[str, str]) -> bool:
        return key in self._prev_disks and key not in self._reset

    # ---- data ----------------------------------------------------------------------------
    def put_block(self, vm: str, disk: str, index: int, data: bytes | bytearray | memoryview) -> int:
        """Store block `index` of a disk; returns the bytes newly stored (0: dedup or zero)."""
        self._check()
        n = len(data)
        if index < 0 or n == 0 or n > self.block_size:
            raise JournalError(f"{vm}/{disk}: bad block {index} of {n} bytes (block size {self.block_size})")
        if is_zero(data):
            self.put_zero(vm, disk, index)
            return 0
        bid = blake3.blake3(data).digest()
        return self.put_hashed(vm, disk, index, bid, data)

    def put_hashed(self, vm: str, disk: str, index: int, bid: bytes, data) -> int:
        """put_block for a caller that already has the block's blake3 digest (and knows the
        block is not all zero). The digest is trusted here; verify() re-checks it."""
        self._check()
        key = (vm, disk)
        store = self._store
        if bid in self._pending or store.has(bid):
            self._record(key, index, bid)
            return 0
        with self._lock:
            duplicate = bid in self._pending or bid in self._inflight
            if not duplicate:
                self._inflight.add(bid)
        # Recorded outside the lock: _record takes it itself (a plain Lock: never nest it).
        if duplicate:
            self._record(key, index, bid)
            return 0
        stored = 0
        try:
            blob, codec = encode_blob(data, self.journal.compression_level)
            full = None
            with self._lock:
                if self._pack is None:
                    self._pack = PackWriter(store, self.sid)
                self._pack.add(bid, blob, len(data), codec)
                self._pending.add(bid)
                stored = len(blob)
                self.added_bytes += stored
                if self._pack.offset >= _store.PACK_TARGET:
                    full, self._pack = self._pack, None
                    self._finishing += 1
            if full is not None:
                # fsync and index it in the background: the scan goes on meanwhile
                with self._lock:
                    if self._finisher is None:
                        self._finisher = ThreadPoolExecutor(1, thread_name_prefix=f"pack-{self.vpg}")
                    self._finisher.submit(self._finish_pack, full)
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            with self._lock:
                self._inflight.discard(bid)
        self._record(key, index, bid)
        return stored

    def _finish_pack(self, pw: PackWriter) -> None:
        """Make a full pack durable and indexed, so a killed sync keeps it (dedup on rerun)."""
        try:
            ip = pw.finish()
            fsync_dir(self._store.pack_dir)
            name = self._store.publish_index([ip], self.sid)
            with self._lock:
                self._packs.append(ip)
                self._index_files.append(name)
        except BaseException as exc:
            pw.discard()
            self._broken = exc
            raise
        finally:
            with self._cond:
                self._finishing -= 1
                self._cond.notify_all()

    def _record(self, key: tuple[str, str], index: int, bid: bytes) -> None:
        """Map block `index` of a disk to `bid`. Takes self._lock: never call it holding it."""
        with self._lock:
            self._entries.setdefault(key, {})[index] = bid

    def put_zero(self, vm: str, disk: str, index: int) -> bool:
        """Block `index` is all zeros. Returns whether a map entry was needed (False for a
        disk new in this checkpoint, whose blocks are zero unless written)."""
        self._check()
        key = (vm, disk)
        if not self._disk_known(key):
            with self._lock:
                d = self._entries.get(key)
                if d is not None:
                    d.pop(index, None)
            return False
        self._record(key, index, fmt.ZERO_ID)
        return True

    def set_disk_size(self, vm: str, disk: str, size: int) -> None:
        self._check()
        if size < 0:
            raise JournalError(f"{vm}/{disk}: negative size")
        self._sizes[(vm, disk)] = size
        if (vm, disk) in self._removed:
            self._removed.discard((vm, disk))
            self._reset.add((vm, disk))

    def remove_disk(self, vm: str, disk: str) -> None:
        self._check()
        key = (vm, disk)
        self._removed.add(key)
        self._sizes.pop(key, None)
        self._entries.pop(key, None)
        self._reset.discard(key)

    def _drain(self) -> None:
        with self._cond:
            while self._finishing:
                self._cond.wait()

    def _flush(self) -> None:
        self._drain()
        with self._lock:
            pw, self._pack = self._pack, None
            if pw is not None:
                self._finishing += 1
        if pw is not None:
            if pw.rows:
                self._finish_pack(pw)
            else:
                pw.discard()
                with self._cond:
                    self._finishing -= 1
        if len(self._index_files) > 1:
            # one index file for the whole checkpoint instead of one per pack
            self._store.publish_index(self._packs, self.sid)
            self._store.remove_index_files(self._index_files)
            self._index_files = []

    def commit(
        self, *, time: datetime | None = None, tag: str | None = None, meta: dict | None = None
    ) -> CheckpointInfo:
        self._check()
        try:
            if self._broken is not None:
                raise JournalError(f"VPG {self.vpg}: a block failed to store ({self._broken}); not committing")
            t = _utc(time) if time is not None else datetime.now(timezone.utc)
            given = None
            if self._prev_time is not None and t < self._prev_time:
                # A clock stepped back (vCenter's or ours): keep checkpoint times ordered,
                # so that "newest at or before <time>" stays meaningful, and say so.
                log.warning("VPG %s: checkpoint time %s is before the previous checkpoint's %s; "
                            "using the latter", self.vpg, t.isoformat(), self._prev_time.isoformat())
                given, t = t, self._prev_time
            disks: dict[tuple[str, str], int] = {
                k: v for k, v in self._prev_disks.items() if k not in self._removed
            }
            for key in self._entries:
                if key not in self._sizes and key not in disks:
                    raise JournalError(f"VPG {self.vpg}: blocks given for {key[0]}/{key[1]} "
                                       "without set_disk_size")
            disks.update(self._sizes)
            self._flush()
            if self._broken is not None:
                raise JournalError(f"VPG {self.vpg}: a block failed to store ({self._broken}); not committing")
            hdisks, maps = [], []
            changed = 0
            bs = self.block_size
            for (vm, disk) in sorted(disks):
                size = disks[(vm, disk)]
                ents = self._entries.get((vm, disk), {})
                nblocks = -(-size // bs)
                idx = np.fromiter((i for i in ents if i < nblocks), dtype=np.uint64)
                idx.sort()
                m = np.zeros(len(idx), dtype=fmt.MAP_DTYPE)
                if len(idx):
                    m["index"] = idx
                    m["id"] = np.frombuffer(
                        b"".join(ents[i] for i in idx.tolist()), dtype=np.uint8
                    ).reshape(-1, fmt.ID_LEN)
                changed += len(m)
                reset = (vm, disk) not in self._prev_disks or (vm, disk) in self._reset
                hdisks.append({"vm": vm, "disk": disk, "size": size, "reset": reset})
                maps.append(m)
            cp_id = fmt.checkpoint_id(self.seq, rand_hex(3))
            info = {
                "id": cp_id,
                "seq": self.seq,
                "time": t.isoformat(),
                "tags": [tag] if tag else [],
                "meta": meta or {},
                "added_bytes": self.added_bytes,
                "changed_blocks": changed,
                "parent": self._prev_id,
            }
            if given is not None:
                info["time_given"] = given.isoformat()
            header = {
                "format": fmt.FORMAT_VERSION,
                "kind": "delta",
                "vpg": self.vpg,
                "block_size": bs,
                "checkpoint": info,
                "disks": hdisks,
            }
            try:
                body = fmt.encode_ckpt(header, maps)
            except TypeError as exc:
                raise JournalError(f"VPG {self.vpg}: checkpoint meta is not JSON-serialisable ({exc})") from None
            d = self.journal._vpg_dir(self.vpg) / "checkpoints"
            publish(self.journal.root / "tmp", d / f"{cp_id}.ckpt", body, owner=self.sid)
            return self.journal._info_from_header(header, [])
        except BaseException:
            self.abort()
            raise
        finally:
            self._close()

    def abort(self) -> None:
        """Publish no checkpoint. Blocks already stored stay indexed (a retry does not send
        them again) until a garbage collection finds them unreferenced."""
        if self._closed:
            return
        try:
            self._flush()
        except BaseException:  # noqa: BLE001 - aborting anyway
            log.exception("VPG %s: flushing blocks on abort failed", self.vpg)
            with self._lock:
                if self._pack is not None:
                    self._pack.discard()
                    self._pack = None
        finally:
            self._close()

    def _close(self) -> None:
        if self._finisher is not None:
            self._finisher.shutdown(wait=True)
            self._finisher = None
        if not self._closed:
            self._closed = True
            self._session.close()
            self._vlock.release()
