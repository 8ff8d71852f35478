"""Per-disk, per-cycle counts of changed bytes that look encrypted.

A changed block counts as encrypted when it is incompressible *and* its bytes look
uniformly distributed:

- incompressible: the journal's own compression attempt (`codec.encode_blob`) stored it
  raw. That attempt is made anyway for every new block, so the signal costs nothing;
  when compression is off (level 0), or the block was a dedup hit (never compressed in
  this cycle), only the second test decides;
- high entropy: a Shannon estimate over a 12 KiB sample (three 4 KiB slices at the
  start, middle and end, the places the codec probes) is at least `ENTROPY_BITS`
  bits per byte. Random data gives ~7.98 on such a sample, text 4-5, a database
  page 3-6, zstd/gzip/JPEG output ~7.9+ (compressed data cannot be told apart from
  encrypted data by its bytes: the per-disk baseline takes care of volumes that always
  write compressed data).

The estimate runs only on blocks the codec could not compress (or that it did not try),
so text-like cycles pay nothing but a counter update. Measured in bench/bench_ransomware.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

SAMPLE = 4 << 10  # bytes per slice of the entropy sample
ENTROPY_BITS = 7.5  # bits per byte at or above which a sample looks random


def entropy_bits(data: bytes | bytearray | memoryview) -> float:
    """Shannon entropy (bits per byte) of a 3 x 4 KiB sample of `data` (all of it if short)."""
    n = len(data)
    view = memoryview(data)
    if n <= 3 * SAMPLE:
        parts = [view]
    else:
        parts = [view[off: off + SAMPLE] for off in (0, (n - SAMPLE) // 2, n - SAMPLE)]
    counts = np.zeros(256, dtype=np.int64)
    total = 0
    for p in parts:
        counts += np.bincount(np.frombuffer(p, dtype=np.uint8), minlength=256)
        total += len(p)
    if total == 0:
        return 0.0
    probs = counts[counts > 0] / total
    return float(-(probs * np.log2(probs)).sum())


def looks_encrypted(data: bytes | bytearray | memoryview, compressed: bool | None) -> bool:
    """`compressed`: what the codec did with the block (True: stored compressed, False:
    stored raw, None: not attempted). A block the codec compressed is never counted."""
    if compressed:
        return False
    return entropy_bits(data) >= ENTROPY_BITS


@dataclass
class DiskCounts:
    changed_blocks: int = 0
    changed_bytes: int = 0
    encrypted_blocks: int = 0
    encrypted_bytes: int = 0
    full: bool = False  # the disk was new in this checkpoint (a full copy, not a write stream)


class ChangeStats:
    """What one checkpoint writer saw, per disk. Thread-safe (transfers run in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._disks: dict[tuple[str, str], DiskCounts] = {}
        self.seconds = 0.0  # time spent classifying (the detection's own cost)

    def _counts(self, key: tuple[str, str]) -> DiskCounts:
        c = self._disks.get(key)
        if c is None:
            c = self._disks[key] = DiskCounts()
        return c

    def zero(self, key: tuple[str, str], n: int) -> None:
        with self._lock:
            c = self._counts(key)
            c.changed_blocks += 1
            c.changed_bytes += n

    def block(self, key: tuple[str, str], data: bytes | bytearray | memoryview,
              compressed: bool | None) -> None:
        t0 = time.perf_counter()
        enc = looks_encrypted(data, compressed)
        dt = time.perf_counter() - t0
        n = len(data)
        with self._lock:
            self.seconds += dt
            c = self._counts(key)
            c.changed_blocks += 1
            c.changed_bytes += n
            if enc:
                c.encrypted_blocks += 1
                c.encrypted_bytes += n

    def mark_full(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._counts(key).full = True

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._disks.pop(key, None)

    def to_meta(self) -> dict[str, Any]:
        """The `encryption` entry of the checkpoint's meta (docs/ransomware.md)."""
        with self._lock:
            disks = [
                {"vm": vm, "disk": disk, "changed_blocks": c.changed_blocks, "changed_bytes": c.changed_bytes,
                 "encrypted_blocks": c.encrypted_blocks, "encrypted_bytes": c.encrypted_bytes,
                 **({"full": True} if c.full else {})}
                for (vm, disk), c in sorted(self._disks.items())
            ]
            return {"version": 1, "seconds": round(self.seconds, 6), "disks": disks}
