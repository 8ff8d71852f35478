"""The checkpoint writer: collects the blocks of one checkpoint of one VPG, packs and
indexes them, and publishes the checkpoint file (the commit point).

It sees the journal only through a `WriteTarget` (the block store, the directories it
publishes into, block size and compression level): the VPG lock and session are taken by
`Journal.begin`, which hands them over; the writer releases them when it closes.

Lock discipline: `self._lock` is a plain Lock guarding the open pack and the maps;
hashing and compression run outside it. `_record` takes it itself, so it is never called
with the lock held (a duplicate of a block in flight is recorded after the lock is let go).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from vmrep.errors import JournalError
from vmrep.journal import format as fmt
from vmrep.journal import store as _store
from vmrep.journal._fs import FileLock, fsync_dir, publish, rand_hex
from vmrep.journal._sessions import Session
from vmrep.journal.codec import encode_blob
from vmrep.journal.results import CheckpointInfo, info_from_header, is_zero, utc
from vmrep.journal.store import BlockStore, PackWriter
from vmrep.ransomware.detect import ChangeStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteTarget:
    """What a checkpoint writer needs of its journal, and nothing more."""

    store: BlockStore  # dedup lookups, pack directory, index publication
    block_size: int
    compression_level: int
    tmp_dir: Path  # where temp files are written before their rename
    checkpoint_dir: Path  # vpgs/<vpg>/checkpoints: where the checkpoint file is published


class CheckpointWriter:
    """Collects one checkpoint of one VPG. Use as a context manager; abort on exception.

    put_block/put_zero are thread-safe: hashing and compression run outside the lock."""

    def __init__(
        self,
        target: WriteTarget,
        vpg: str,
        seq: int,
        prev_disks: dict[tuple[str, str], int],
        prev_time: datetime | None,
        prev_id: str | None,
        vlock: FileLock,
        session: Session,
    ) -> None:
        self.target = target
        self.vpg = vpg
        self.seq = seq
        self.block_size = target.block_size
        self._store = target.store
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
        self._packs: list[fmt.IndexPack] = []
        self._entries: dict[tuple[str, str], dict[int, bytes]] = {}
        self._sizes: dict[tuple[str, str], int] = {}
        self._removed: set[tuple[str, str]] = set()
        self._reset: set[tuple[str, str]] = set()
        self.added_bytes = 0
        # Per-disk counts of changed and encrypted-looking bytes (docs/ransomware.md),
        # kept with the checkpoint as its `encryption` entry.
        self.stats = ChangeStats()
        self._broken: BaseException | None = None
        self._closed = False

    # ---- context manager -----------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc: object) -> None:
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

    def put_hashed(self, vm: str, disk: str, index: int, bid: bytes,
                   data: bytes | bytearray | memoryview) -> int:
        """put_block for a caller that already has the block's blake3 digest (and knows the
        block is not all zero). The digest is trusted here; verify() re-checks it."""
        self._check()
        key = (vm, disk)
        store = self._store
        if bid in self._pending or store.has(bid):
            self.stats.block(key, data, None)  # a dedup hit: not compressed this cycle
            self._record(key, index, bid)
            return 0
        with self._lock:
            duplicate = bid in self._pending or bid in self._inflight
            if not duplicate:
                self._inflight.add(bid)
        # Recorded outside the lock: _record takes it itself (a plain Lock: never nest it).
        if duplicate:
            self.stats.block(key, data, None)
            self._record(key, index, bid)
            return 0
        stored = 0
        try:
            blob, codec = encode_blob(memoryview(data) if isinstance(data, bytearray) else data,
                                      self.target.compression_level)
            # The codec's attempt is the detector's first signal (raw = incompressible)
            self.stats.block(key, data, (codec != fmt.CODEC_RAW) if self.target.compression_level > 0 else None)
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

    def has(self, bid: bytes) -> bool:
        """Whether the block is stored, or pending in this checkpoint (the journal service
        accepts a reference instead of the content for such a block)."""
        return bid in self._pending or self._store.has(bid)

    def record(self, vm: str, disk: str, index: int, bid: bytes) -> None:
        """Map a block to an id `has` confirmed (a reference sent instead of the content)."""
        self._check()
        if not self.has(bid):
            raise JournalError(f"{vm}/{disk}: block {index}: id {bid.hex()[:16]}… is not stored")
        self._record((vm, disk), index, bid)

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
        self.stats.zero(key, self.block_size)
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
        self.stats.forget(key)

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
        self, *, time: datetime | None = None, tag: str | None = None, meta: dict[str, Any] | None = None
    ) -> CheckpointInfo:
        self._check()
        try:
            if self._broken is not None:
                raise JournalError(f"VPG {self.vpg}: a block failed to store ({self._broken}); not committing")
            t = utc(time) if time is not None else datetime.now(timezone.utc)
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
            for key in disks:
                if not self._disk_known(key):
                    self.stats.mark_full(key)  # a full copy says nothing about the write stream
            cp_id = fmt.checkpoint_id(self.seq, rand_hex(3))
            info = {
                "id": cp_id,
                "seq": self.seq,
                "time": t.isoformat(),
                "tags": [tag] if tag else [],
                # The detector's counts ride in the meta (free-form: readers of this format
                # version accept it); CheckpointInfo hands them out as `.encryption`.
                "meta": {**(meta or {}), "encryption": self.stats.to_meta()},
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
            publish(self.target.tmp_dir, self.target.checkpoint_dir / f"{cp_id}.ckpt", body, owner=self.sid)
            return info_from_header(header, [])
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
