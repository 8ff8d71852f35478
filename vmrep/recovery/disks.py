"""Disks as of a checkpoint on a datastore, and the block-by-block check of what is there.

A recovered disk is two files: the flat extent (the disk's bytes, exactly as long as the
disk) and a small VMDK text descriptor naming it, so that CreateVM can attach the disk
without copying it. Where the datastore is mounted on this host the flat file is written
with positioned writes from several threads and zero blocks stay holes; elsewhere it is
one streaming PUT through `/folder`, blocks read from the journal ahead of the stream.

The descriptor is written last and names the checkpoint: a retried step that finds a
descriptor of the same checkpoint next to a flat file of the right size has nothing to do.

A block the journal cannot deliver intact (its hash does not match) is not a reason to
stop writing the other blocks: it is written as zeros and reported, and the verification
that follows compares every block with the checkpoint and fails on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import blake3
import numpy as np

from vmrep.errors import JournalError, NotFound
from vmrep.parallel import each_part
from vmrep.vsphere.datastore import DatastoreAccess

CHUNK_BLOCKS = 8  # blocks per read or write unit
MARKER = "# vmrep checkpoint "


@dataclass
class WriteResult:
    disk: str
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: bool = False
    bad_blocks: list[int] = field(default_factory=list)  # indexes the journal could not deliver

    def as_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
                "skipped": self.skipped, "bad_blocks": self.bad_blocks[:20], "bad_block_count": len(self.bad_blocks)}


@dataclass
class CompareResult:
    disk: str
    path: str
    blocks: int = 0
    mismatches: list[int] = field(default_factory=list)  # block indexes that differ
    size_ok: bool = True
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return self.size_ok and not self.mismatches

    def as_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "path": self.path, "blocks": self.blocks, "ok": self.ok,
                "size_ok": self.size_ok, "mismatch_count": len(self.mismatches),
                "mismatches": self.mismatches[:20], "seconds": round(self.seconds, 3)}


def descriptor_text(flat_name: str, size: int, checkpoint_id: str, adapter: str = "lsilogic") -> str:
    sectors = -(-size // 512)
    cylinders = max(1, min(65535, sectors // (255 * 63)))
    return (
        "# Disk DescriptorFile\n"
        f"{MARKER}{checkpoint_id}\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{flat_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.thinProvisioned = "1"\n'
        'ddb.virtualHWVersion = "13"\n'
    )


def _flat_of(descriptor: str) -> str:
    return descriptor[:-5] + "-flat.vmdk"


def already_written(ds: DatastoreAccess, descriptor: str, size: int, checkpoint_id: str) -> bool:
    """A previous try wrote this disk completely (descriptor of this checkpoint, flat of this size)."""
    try:
        head = ds.read(descriptor, 0, 256).rstrip(b"\0").decode("utf-8", "replace")
        if f"{MARKER}{checkpoint_id}\n" not in head:
            return False
        return ds.size(_flat_of(descriptor)) == size
    except (NotFound, OSError):
        return False


def _write_local(journal: Any, bmap: Any, out: Path, size: int, threads: int) -> tuple[int, list[int]]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".vmrep-tmp")
    bs = bmap.block_size
    bad: list[int] = []
    written = 0
    lock = threading.Lock()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        nz = bmap.nonzero_indexes()
        ids = bmap.array

        def work(chunk: np.ndarray) -> None:
            nonlocal written
            n = 0
            mine: list[int] = []
            for i in chunk.tolist():
                try:
                    data = journal.read_block(ids[i].tobytes())
                except JournalError:
                    mine.append(i)  # left as a hole (zeros): verification reports it
                    continue
                view = memoryview(data)
                off = i * bs
                while view:
                    k = os.pwrite(fd, view, off)
                    view, off = view[k:], off + k
                n += len(data)
            with lock:
                written += n
                bad.extend(mine)

        each_part(work, nz, min(len(nz) // 4, 32 * max(1, threads)), threads)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, out)
    return written, sorted(bad)


def _stream(journal: Any, bmap: Any, size: int, threads: int, bad: list[int]) -> Iterator[bytes]:
    """The disk's bytes in order, CHUNK_BLOCKS blocks at a time, read ahead by `threads`."""
    bs = bmap.block_size
    n = len(bmap)
    zero = bytes(bs * CHUNK_BLOCKS)

    def chunk(first: int) -> bytes:
        parts = []
        for i in range(first, min(n, first + CHUNK_BLOCKS)):
            bid = bmap.get(i)
            ln = min(bs, size - i * bs)
            if bid is None:
                parts.append(zero[:ln])
                continue
            try:
                data = journal.read_block(bid)
            except JournalError:
                bad.append(i)
                data = zero[:ln]
            parts.append(data[:ln] if len(data) >= ln else data + bytes(ln - len(data)))
        return b"".join(parts)

    with ThreadPoolExecutor(max(1, threads)) as ex:
        pending: deque = deque()
        starts = iter(range(0, n, CHUNK_BLOCKS))
        for first in starts:
            pending.append(ex.submit(chunk, first))
            if len(pending) >= 2 * max(1, threads):
                break
        while pending:
            data = pending.popleft().result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(ex.submit(chunk, nxt))
            yield data


def write_disk(journal: Any, ds: DatastoreAccess, vpg: str, checkpoint_id: str, vm: str, disk: str,
               descriptor: str, *, threads: int = 2, adapter: str = "lsilogic") -> WriteResult:
    """Write (vm, disk) as of the checkpoint to `descriptor` and its flat extent."""
    t0 = time.perf_counter()
    bmap = journal.block_map(vpg, checkpoint_id, vm, disk)
    size = int(bmap.size)
    res = WriteResult(disk)
    if already_written(ds, descriptor, size, checkpoint_id):
        res.skipped = True
        res.seconds = time.perf_counter() - t0
        return res
    flat = _flat_of(descriptor)
    if ds.is_local(flat):
        res.bytes_written, res.bad_blocks = _write_local(journal, bmap, ds.localds.local(flat), size, threads)
    else:
        bad: list[int] = []
        ds.write(flat, _stream(journal, bmap, size, threads, bad), size)
        res.bytes_written, res.bad_blocks = size, sorted(bad)
    text = descriptor_text(flat.rsplit("/", 1)[-1], size, checkpoint_id, adapter).encode()
    ds.write(descriptor, [text], len(text))
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------
# Verification of the data


def _zero_view(view: memoryview) -> bool:
    n = len(view)
    if n % 8 == 0:
        return not np.count_nonzero(np.frombuffer(view, dtype=np.uint64))
    return not np.count_nonzero(np.frombuffer(view, dtype=np.uint8))


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Where a local file holds data (SEEK_DATA/SEEK_HOLE); everything if unsupported."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                break
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            off = end
    except (AttributeError, OSError):
        return [(0, size)]
    return out


def compare_disk(journal: Any, ds: DatastoreAccess, vpg: str, checkpoint_id: str, vm: str, disk: str,
                 flat: str, *, threads: int = 2) -> CompareResult:
    """Compare every block of the flat file `flat` with the checkpoint's block map."""
    t0 = time.perf_counter()
    bmap = journal.block_map(vpg, checkpoint_id, vm, disk)
    size, bs = int(bmap.size), bmap.block_size
    n = len(bmap)
    res = CompareResult(disk, flat, blocks=n)
    try:
        actual = ds.size(flat)
    except NotFound:
        res.size_ok = False
        res.mismatches = list(range(n))
        return res
    res.size_ok = actual == size
    ids = bmap.array
    nzmask = bmap.nonzero_mask
    lock = threading.Lock()
    bad: list[int] = []
    read_total = 0

    local_fd = -1
    if ds.is_local(flat):
        local_fd = os.open(ds.localds.local(flat), os.O_RDONLY)
    try:
        # Blocks that must be looked at: all, or on a local file only those with data or
        # expected data (a hole is zeros; it is wrong only where data is expected).
        if local_fd >= 0:
            has_data = np.zeros(n, dtype=bool)
            for a, b in _data_ranges(local_fd, min(actual, size)):
                has_data[a // bs: -(-b // bs)] = True
            todo = np.flatnonzero(has_data | nzmask)
        else:
            todo = np.arange(n)

        def check(indexes: np.ndarray) -> None:
            nonlocal read_total
            mine: list[int] = []
            got = 0
            buf = bytearray(bs * CHUNK_BLOCKS)
            idx = indexes.tolist()
            k = 0
            while k < len(idx):
                # a run of consecutive blocks, at most CHUNK_BLOCKS
                first = idx[k]
                run = 1
                while k + run < len(idx) and idx[k + run] == first + run and run < CHUNK_BLOCKS:
                    run += 1
                off = first * bs
                length = min(run * bs, size - off)
                if local_fd >= 0:
                    mv = memoryview(buf)[:length]
                    done = 0
                    while done < length:
                        r = os.preadv(local_fd, [mv[done:]], off + done)
                        if r == 0:
                            mv[done:] = bytes(length - done)
                            break
                        done += r
                else:
                    mv = memoryview(ds.read(flat, off, length))
                got += length
                for j in range(run):
                    i = first + j
                    a = j * bs
                    block = mv[a: a + min(bs, length - a)]
                    if nzmask[i]:
                        if blake3.blake3(block).digest() != ids[i].tobytes():
                            mine.append(i)
                    elif not _zero_view(block):
                        mine.append(i)
                k += run
            with lock:
                bad.extend(mine)
                read_total += got

        each_part(check, todo, min(len(todo) // CHUNK_BLOCKS, 16 * max(1, threads)), threads)
    finally:
        if local_fd >= 0:
            os.close(local_fd)
    res.mismatches = sorted(bad)
    res.bytes_read = read_total
    res.seconds = time.perf_counter() - t0
    return res


