"""The block engine: change detection and transfer of one disk into a checkpoint writer.

Independent of vSphere: a disk is anything with `size` and `read(offset, length)`.
Reads go in large sequential chunks (several blocks) from a few threads; zero blocks are
found by a memcmp (no hashing); other blocks are hashed with blake3 (GIL released) and
compared with the previous checkpoint's map, and only the changed ones go to the writer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import blake3
import numpy as np

from vmrep.errors import VmrepError
from vmrep.journal import BlockMap, CheckpointWriter

CHUNK_BYTES = 8 << 20  # bytes read per call


class TransferCancelled(VmrepError):
    """A transfer stopped because the process was asked to stop (Ctrl-C, SIGTERM)."""

    exit_code = 130


# The cooperative stop of every transfer in this process. Transfers run in worker
# threads (ours, and Prefect's task runner threads), which a KeyboardInterrupt in the
# main thread does not reach: they check this between chunks instead. Set by the CLI's
# signal handler; nothing clears it but `reset_stop` (a stopping process stays stopping).
_stop = threading.Event()


def request_stop() -> None:
    """Make every running and later `sync_disk` of this process raise TransferCancelled."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def reset_stop() -> None:
    """Allow transfers again (for a process that goes on after a stop, e.g. a test)."""
    _stop.clear()


def _check_stop(vm: str, disk: str) -> None:
    if _stop.is_set():
        raise TransferCancelled(f"VM {vm} disk {disk}: transfer cancelled (stop requested)")


@runtime_checkable
class DiskSource(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes:  # may be called from several threads
        ...


_PAGE = mmap.PAGESIZE


def _libc() -> Any:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return lib


_LIBC: list[Any] = []


def resident_fraction(fd: int, offset: int, length: int) -> float | None:
    """The share of [offset, offset+length) of a file that is in the page cache
    (mincore(2) on a throw-away mapping: no page is touched). None where it cannot be
    told (not Linux, offset unaligned, past the end)."""
    if length <= 0 or offset % mmap.ALLOCATIONGRANULARITY:
        return None
    try:
        if not _LIBC:
            _LIBC.append(_libc())
        lib = _LIBC[0]
        addr = lib.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-length // _PAGE)
            vec = ctypes.create_string_buffer(pages)
            if lib.mincore(addr, length, vec) != 0:
                return None
            return 1.0 - vec.raw[:pages].count(0) / pages
        finally:
            lib.munmap(addr, length)
    except (OSError, AttributeError, ValueError):
        return None


class LocalFileSource:
    """A disk image on a local (or NFS-mounted) file system.

    `size` defaults to the file's length; a file shorter than `size` reads as zeros past
    its end (a freshly created flat file is often empty whatever the disk's capacity).

    Two ways to read, chosen per chunk by what the page cache holds (`resident_fraction`):
    a chunk mostly in the page cache is hashed straight from it through `mmap` (no copy);
    a chunk mostly not cached is read with O_DIRECT into an aligned buffer. Faulting a
    cold file in through a mapping costs 2-6x the CPU of the scan itself (the initial
    copy of a 2 GiB image measured 0.7 s of CPU hot and 1.3-4.4 s cold, bench/README.md),
    and a one-pass copy gains nothing from filling the cache; O_DIRECT reads it for
    ~0.85 s, at disk speed. `reads` counts the chunks each way (the benchmark prints it)."""

    def __init__(self, path: Path | str, size: int | None = None, *, use_mmap: bool = True,
                 direct: bool = True) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size if size is None else size
        self.use_mmap = use_mmap
        self.reads = {"mapped": 0, "direct": 0, "buffered": 0}
        self._direct_fd = -1
        self._scratch = threading.local()
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some FUSE file systems refuse O_DIRECT
                self._direct_fd = -1
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass

    def _cold(self, offset: int, length: int) -> bool:
        if self._direct_fd < 0 or offset % _PAGE:
            return False
        frac = resident_fraction(self.fd, offset, min(length, max(0, os.fstat(self.fd).st_size - offset)))
        return frac is not None and frac < 0.5

    def _read_direct(self, offset: int, buf: memoryview) -> int:
        """O_DIRECT needs an aligned buffer and length: read into this thread's scratch
        mapping (page aligned) and copy, which costs less than the page cache's fill."""
        want = len(buf)
        span = -(-want // _PAGE) * _PAGE
        scratch = getattr(self._scratch, "m", None)
        if scratch is None or len(scratch) < span:
            scratch = self._scratch.m = mmap.mmap(-1, max(span, CHUNK_BYTES))
        view = memoryview(scratch)
        try:
            got = 0
            while got < want:
                n = os.preadv(self._direct_fd, [view[got:span]], offset + got)
                if n <= 0:
                    break
                got += n
            got = min(got, want)
            buf[:got] = view[:got]
        finally:
            view.release()
        return got

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset`; zero-fills past the end of the file. Returns len(buf)."""
        want = len(buf)
        got = 0
        if self._cold(offset, want):
            try:
                got = self._read_direct(offset, buf)
                self.reads["direct"] += 1
            except OSError:  # e.g. EINVAL from a file system with other alignment rules
                got = 0
        else:
            self.reads["buffered"] += 1
        while got < want:
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n == 0:
                buf[got:] = bytes(want - got)
                break
            got += n
        return want

    def map(self, offset: int, length: int) -> mmap.mmap | None:
        """A read-only mapping of [offset, offset+length): hashing straight from the page
        cache saves the copy that pread makes. None where a mapping can't be used (past the
        end of the file, unaligned): the caller falls back to readinto."""
        if not self.use_mmap or offset % mmap.ALLOCATIONGRANULARITY or length <= 0:
            return None
        if offset + length > os.fstat(self.fd).st_size:
            return None
        if self._cold(offset, length):
            return None  # read with O_DIRECT by readinto instead
        flags = mmap.MAP_SHARED
        try:
            m = mmap.mmap(self.fd, length, flags=flags, prot=mmap.PROT_READ, offset=offset)
        except (OSError, ValueError):
            return None
        self.reads["mapped"] += 1
        return m

    def is_hole(self, offset: int, length: int) -> bool:
        """True if [offset, offset+length) is a hole of a sparse file (or past its end):
        zeros that need not be read. Thin disks on NFS datastores are sparse files."""
        try:
            nxt = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:  # ENXIO: no data at or after offset (holes to the end)
            return exc.errno == errno.ENXIO
        return nxt >= offset + length

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1

    def __enter__(self) -> "LocalFileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class DiskSyncStats:
    bytes_read: int = 0  # bytes actually read from the source (holes of sparse files are not)
    blocks_read: int = 0  # blocks examined
    blocks_changed: int = 0  # blocks whose content differs from `previous` (put into the writer)
    blocks_zero: int = 0  # of the blocks read, all-zero ones
    blocks_deduplicated: int = 0  # changed blocks already in the store (nothing stored)
    bytes_stored: int = 0  # newly stored (compressed) bytes
    seconds: float = 0.0
    # How the changed blocks were found (the checkpoint's per-disk record, see
    # docs/journal-format.md "Checkpoint meta"): cbt (QueryChangedDiskAreas), scan (every
    # block hashed against the previous checkpoint) or full (no previous map: every block).
    method: str = "scan"
    bytes_changed: int = 0  # cbt: the changed areas' length; scan/full: the changed blocks' bytes
    change_id: str | None = None  # the disk's change id at this checkpoint's snapshot
    fallback: str | None = None  # why CBT was not used on this disk, when it was not
    bytes_sent: int | None = None  # crossed the WAN to a journal service (None: written directly)

    @property
    def read_rate(self) -> float:
        return self.bytes_read / self.seconds if self.seconds else 0.0


def ranges_to_blocks(ranges: Iterable[tuple[int, int]], block_size: int) -> list[int]:
    """Sorted, distinct block numbers touched by (offset, length) ranges."""
    out: set[int] = set()
    for off, length in ranges:
        if length <= 0:
            continue
        if off < 0:
            raise ValueError(f"negative offset {off}")
        out.update(range(off // block_size, (off + length - 1) // block_size + 1))
    return sorted(out)


def _chunks(blocks: list[int] | range, per_chunk: int) -> list[tuple[int, int]]:
    """Runs of consecutive block numbers, each at most per_chunk long: (first, count)."""
    out: list[tuple[int, int]] = []
    if isinstance(blocks, range):
        for first in range(blocks.start, blocks.stop, per_chunk):
            out.append((first, min(per_chunk, blocks.stop - first)))
        return out
    # prev is read only once start is set, and both are set together
    start: int | None = None
    prev = 0
    for b in blocks:
        if start is not None and b == prev + 1 and b - start < per_chunk:
            prev = b
            continue
        if start is not None:
            out.append((start, prev - start + 1))
        start = prev = b
    if start is not None:
        out.append((start, prev - start + 1))
    return out


_HEAD = bytes(64)


def _view_is_zero(view: memoryview) -> bool:
    if bytes(view[:64]) != _HEAD[: min(64, len(view))]:
        return False
    n = len(view)
    if n % 8 == 0:
        return not np.count_nonzero(np.frombuffer(view, dtype=np.uint64))
    return not np.count_nonzero(np.frombuffer(view, dtype=np.uint8))


def sync_disk(
    writer: CheckpointWriter,
    vm: str,
    disk: str,
    source: DiskSource,
    *,
    previous: BlockMap | None,
    changed_ranges: list[tuple[int, int]] | None = None,
    threads: int = 2,
    progress: Callable[[int], None] | None = None,
) -> DiskSyncStats:
    """Bring (vm, disk) in the writer's checkpoint to the content of `source`.

    With `changed_ranges` (CBT), only the blocks they touch are read. Without, every block
    is read. A block is put when it differs from `previous` (its id at that index); with
    previous=None every non-zero block is put, and the store's deduplication makes a
    re-run after an interruption store only what is still missing (see
    `blocks_deduplicated` and `bytes_stored`). `progress(n)` gets the bytes read per chunk.
    After `request_stop()` it raises TransferCancelled within one chunk per thread.
    """
    _check_stop(vm, disk)
    t0 = time.perf_counter()
    bs = writer.block_size
    size = int(source.size)
    writer.set_disk_size(vm, disk, size)
    nblocks = -(-size // bs)
    if changed_ranges is None:
        blocks: list[int] | range = range(nblocks)
    else:
        blocks = [b for b in ranges_to_blocks(changed_ranges, bs) if b < nblocks]
    per_chunk = max(1, CHUNK_BYTES // bs)
    chunks = _chunks(blocks, per_chunk)
    stats = DiskSyncStats()
    lock = threading.Lock()
    it = iter(chunks)
    failure: list[BaseException] = []
    readinto = getattr(source, "readinto", None)
    zero_block = bytes(bs)

    mapper = getattr(source, "map", None)
    is_hole = getattr(source, "is_hole", None)

    def worker() -> None:
        buf = bytearray(per_chunk * bs) if readinto else None
        local = DiskSyncStats()
        try:
            while not failure:
                _check_stop(vm, disk)
                with lock:
                    nxt = next(it, None)
                if nxt is None:
                    break
                first, count = nxt
                off = first * bs
                length = min(count * bs, size - off)
                if is_hole is not None and is_hole(off, length):
                    local.blocks_read += count
                    local.blocks_zero += count
                    for i in range(first, first + count):
                        if previous is not None and previous.get(i) is None:
                            continue
                        if writer.put_zero(vm, disk, i) is not False:
                            local.blocks_changed += 1
                    if progress:
                        progress(length)
                    continue
                mapped = mapper(off, length) if mapper else None
                data: bytes | bytearray | None
                if mapped is not None:
                    data = None
                    mv = memoryview(mapped)
                elif buf is not None and readinto is not None:  # buf exists only when readinto does
                    data = buf
                    readinto(off, memoryview(buf)[:length])
                    mv = memoryview(buf)
                else:
                    data = source.read(off, length)
                    if len(data) < length:
                        data = bytes(data) + bytes(length - len(data))
                    mv = memoryview(data)
                local.bytes_read += length
                block: memoryview | None = None  # dropped in finally so that mv can be released
                try:
                    for k in range(count):
                        i = first + k
                        a = k * bs
                        ln = min(bs, length - a)
                        local.blocks_read += 1
                        block = mv[a : a + ln]
                        if data is not None:
                            zero = data.startswith(zero_block if ln == bs else bytes(ln), a, a + ln)
                        else:
                            zero = _view_is_zero(block)
                        if zero:
                            local.blocks_zero += 1
                            if previous is not None and previous.get(i) is None:
                                continue
                            if writer.put_zero(vm, disk, i) is not False:
                                local.blocks_changed += 1
                            continue
                        bid = blake3.blake3(block).digest()
                        if previous is not None and previous.get(i) == bid:
                            continue
                        local.blocks_changed += 1
                        stored = writer.put_hashed(vm, disk, i, bid, block)
                        if stored:
                            local.bytes_stored += stored
                        else:
                            local.blocks_deduplicated += 1
                finally:
                    block = None
                    mv.release()
                    if mapped is not None:
                        try:
                            mapped.close()
                        except BufferError:  # a view escaped; the mapping goes with it
                            pass
                if progress:
                    progress(length)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            failure.append(exc)
        finally:
            with lock:
                for f in ("bytes_read", "blocks_read", "blocks_changed", "blocks_zero",
                          "blocks_deduplicated", "bytes_stored"):
                    setattr(stats, f, getattr(stats, f) + getattr(local, f))

    n = max(1, min(threads, len(chunks)))
    if n == 1:
        worker()
    else:
        ts = [threading.Thread(target=worker, name=f"sync-{vm}-{disk}-{k}", daemon=True) for k in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    stats.seconds = time.perf_counter() - t0
    if failure:
        raise failure[0]
    return stats


@dataclass
class SourceCheck:
    bytes_read: int = 0
    blocks: int = 0
    differing: list[int] = field(default_factory=list)  # blocks whose source content is not the journal's


def verify_disk(source: DiskSource, ids: BlockMap, block_size: int) -> SourceCheck:
    """Compare a disk block by block with a checkpoint's map: each source block is hashed
    where it is read (blake3 as in `sync_disk`; an all-zero block must be a zero entry),
    so only the 32-byte ids are compared, never data carried back."""
    size = int(source.size)
    nblocks = -(-size // block_size)
    per_chunk = max(1, CHUNK_BYTES // block_size)
    out = SourceCheck()
    for first in range(0, nblocks, per_chunk):
        _check_stop("verify", "source")
        off = first * block_size
        length = min(per_chunk * block_size, size - off)
        data = source.read(off, length)
        if len(data) < length:
            data = bytes(data) + bytes(length - len(data))
        out.bytes_read += length
        mv = memoryview(data)
        for k in range(-(-length // block_size)):
            i = first + k
            block = mv[k * block_size:min((k + 1) * block_size, length)]
            want = ids.get(i)
            got = None if _view_is_zero(block) else blake3.blake3(block).digest()
            out.blocks += 1
            if got != want:
                out.differing.append(i)
    return out
