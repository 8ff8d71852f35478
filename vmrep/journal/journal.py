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

The class `Journal` is the facade; each concern lives in its own module:

    results.py      result types, BlockMap, checkpoint descriptions
    chain.py        a VPG's chain of files, its reading (maps, refs) and caches
    writer.py       CheckpointWriter: one checkpoint of one VPG
    retention.py    retention, promotion and compaction
    maintenance.py  garbage collection, VPG removal, recover, verify, index repair
    store.py        the block store (packs, index, reads); codec.py the blob codecs
    format.py       byte layouts; _fs.py, _sessions.py file primitives, locks, sessions
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import blake3
import numpy as np

from vmrep.errors import JournalError, JournalLocked
from vmrep.journal import format as fmt
from vmrep.journal import maintenance, retention
from vmrep.journal._fs import ensure_dir, publish, rand_hex
from vmrep.journal._sessions import Session, live_writer_of, open_session, vpg_lock
from vmrep.journal.chain import Chains
from vmrep.journal.results import (
    BlockMap,
    CheckpointInfo,
    Mismatch,
    RecoverResult,
    RepairResult,
    RetentionResult,
    Usage,
    parse_time,
)
from vmrep.journal.results import is_zero  # noqa: F401  (was defined here; old imports keep working)
from vmrep.journal.store import BlockStore, GCStats, now_iso
from vmrep.journal.writer import CheckpointWriter, WriteTarget
from vmrep.parallel import each_part

# How long a cycle's new checkpoint waits for the VPG's retention (a process of its own at
# the recovery site: flows/retention.py) to release the VPG, instead of failing the cycle.
RETENTION_WAIT_SECONDS = 30.0

log = logging.getLogger(__name__)

_SUBDIRS = ("packs", "index", "tmp", "vpgs", "locks", "gc")


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
        self.chains = Chains(root, block_size, self.store, self.cache_bytes)

    # ---- open ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls, root: Path, *, block_size: int = 1 << 20, compression_level: int = 1, create: bool = True,
        recover: bool = True,
    ) -> "Journal":
        """Open (or create) the journal at `root`. recover=False skips the clean-up of what
        a crash left (as before repair_index(): recover() deletes the unindexed packs that
        no kept checkpoint needs, which a lost index file may have listed)."""
        root = Path(root)
        cfg_path = root / "journal.json"
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text())
            except ValueError as exc:
                raise JournalError(f"{cfg_path}: not JSON ({exc})") from None
            fmt.check_repo_config(cfg, str(cfg_path))
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
            for sub in _SUBDIRS:
                ensure_dir(root / sub)
            cfg = {
                "format": fmt.FORMAT_VERSION,
                "kind": "vmrep-journal",
                "id": rand_hex(16),
                "created": now_iso(),
                "block_size": block_size,
                "hash": fmt.HASH,
                "compression": fmt.COMPRESSION,
            }
            publish(root / "tmp", cfg_path, json.dumps(cfg, indent=1).encode())
        for sub in _SUBDIRS:
            ensure_dir(root / sub)
        j = cls(root, block_size, compression_level)
        if recover:
            j.recover(wait=0.0)
        j.store.refresh()
        return j

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------
    def vpgs(self) -> list[str]:
        return self.chains.vpgs()

    def checkpoints(self, vpg: str) -> list[CheckpointInfo]:
        return self.chains.infos(self.chains.chain(vpg))

    def checkpoint(self, vpg: str, ref: str) -> CheckpointInfo:
        """`ref`: an id, a unique id prefix, 'latest', 'latest-tagged', 'latest-clean'
        (the newest before suspected encryption, vmrep.ransomware) or an ISO time (the
        newest kept checkpoint at or before it)."""
        return self.chains.resolve(vpg, ref)[1]

    def disks(self, vpg: str, checkpoint_id: str) -> dict[tuple[str, str], int]:
        chain, info = self.chains.resolve(vpg, checkpoint_id)
        return self.chains.disks_at(chain, info.seq)

    def block_map(self, vpg: str, checkpoint_id: str, vm: str, disk: str) -> BlockMap:
        chain, info = self.chains.resolve(vpg, checkpoint_id)
        r = self.chains.map_array(chain, info.seq, vm, disk)
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
        lk = open_session(self.root, self.store, "restore", vpg)
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

                each_part(work, nz, min(len(nz) // 16, 64 * threads), threads)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return written
        finally:
            lk.close()

    def usage(self, vpg: str) -> Usage:
        chain = self.chains.chain(vpg)
        infos = self.chains.infos(chain)
        if not infos:
            return Usage(vpg, 0, 0, 0, None, None, 0)
        total, base = self.chains.usage(chain, infos)
        return Usage(vpg, total, base, total - base, infos[0].time, infos[-1].time, len(infos))

    # ---- writing -------------------------------------------------------------------------
    def begin(self, vpg: str, *, wait: float = 0.0) -> CheckpointWriter:
        """Start the VPG's next checkpoint (JournalError if another writer holds the VPG).

        `wait`: while the VPG lock is held by something else than a writer (retention,
        which runs in a process of its own at the recovery site, or a VPG removal), wait up
        to this many seconds for it; another writer is still refused at once (the
        one-writer backstop)."""
        d = self.chains.vpg_dir(vpg)
        deadline = time.monotonic() + wait
        while True:
            try:
                vlock = vpg_lock(d, vpg, 0.0, "begin")
                break
            except JournalLocked:
                if time.monotonic() >= deadline or live_writer_of(self.root, vpg):
                    raise
                time.sleep(0.1)
        try:
            session = open_session(self.root, self.store, "writer", vpg)
        except BaseException:
            vlock.release()
            raise
        try:
            for sub in ("checkpoints", "base", "start", "tags"):
                ensure_dir(d / sub)
            chain = self.chains.chain(vpg)
            prev: dict[tuple[str, str], int] = {}
            prev_time = None
            prev_id = None
            if chain.start_seq is not None:
                h = self.chains.header_at(chain, chain.visible_seqs()[-1])
                prev = {(x["vm"], x["disk"]): x["size"] for x in h["disks"]}
                prev_time = parse_time(h["checkpoint"]["time"])
                prev_id = h["checkpoint"]["id"]
            target = WriteTarget(self.store, self.block_size, self.compression_level,
                                 self.root / "tmp", d / "checkpoints")
            return CheckpointWriter(target, vpg, chain.max_seq + 1, prev, prev_time, prev_id, vlock, session)
        except BaseException:
            session.close()
            vlock.release()
            raise

    def add_tag(self, vpg: str, checkpoint_id: str, tag: str) -> None:
        if not tag:
            raise JournalError("empty tag")
        chain, info = self.chains.resolve(vpg, checkpoint_id)
        if info.id != checkpoint_id:
            raise JournalError(f"VPG {vpg}: add_tag needs a checkpoint id, got {checkpoint_id!r}")
        if tag in info.tags:
            return
        with Session(self.root, "tag", vpg) as s:
            ensure_dir(chain.dir / "tags")
            name = f"{info.id}.{blake3.blake3(tag.encode()).hexdigest()[:16]}.tag"
            body = {"format": fmt.FORMAT_VERSION, "checkpoint": info.id, "tag": tag, "time": now_iso()}
            publish(self.root / "tmp", chain.dir / "tags" / name, json.dumps(body).encode(), owner=s.sid)

    # ---- retention and maintenance (see retention.py, maintenance.py) ----------------------
    def apply_retention(
        self, vpg: str, keep_since: datetime, hard_limit_bytes: int | None = None,
        lock_since: datetime | None = None,
    ) -> RetentionResult:
        return retention.apply_retention(self, vpg, keep_since, hard_limit_bytes, lock_since)

    def gc(self) -> GCStats | None:
        """Remove blocks no kept checkpoint of any VPG references (see
        maintenance.collect_garbage). None if another garbage collection is running."""
        return maintenance.collect_garbage(self)[0]

    def remove_vpg(self, vpg: str) -> None:
        maintenance.remove_vpg(self, vpg)

    def verify(self, vpg: str, checkpoint_id: str | None = None, *, threads: int = 2) -> list[Mismatch]:
        """Re-read and re-hash every block the kept checkpoints (or the one given) use."""
        return maintenance.verify(self, vpg, checkpoint_id, threads)

    def recover(self, *, wait: float = 5.0) -> RecoverResult:
        """Remove what a crash left behind (see maintenance.recover)."""
        return maintenance.recover(self, wait)

    def repair_index(self) -> RepairResult:
        """Rebuild the index from the pack trailers (see maintenance.repair_index)."""
        return maintenance.repair_index(self)
