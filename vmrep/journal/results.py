"""What the journal hands back: result types, block maps, checkpoint descriptions.

Nothing here touches the file system; every other module of the journal imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from vmrep.journal.store import GCStats

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


def utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def parse_time(s: str) -> datetime:
    return utc(datetime.fromisoformat(s))


@dataclass
class CheckpointInfo:
    id: str
    seq: int
    time: datetime
    tags: list[str] = field(default_factory=list)
    added_bytes: int = 0
    changed_blocks: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # Per-disk counts of changed / encrypted-looking bytes (vmrep.ransomware.detect), kept
    # in the file as meta["encryption"]; empty for checkpoints written before detection.
    encryption: dict[str, Any] = field(default_factory=dict)


def info_from_header(h: dict[str, Any], tags: list[str]) -> CheckpointInfo:
    """The CheckpointInfo a checkpoint or base file header describes, plus later tags."""
    c = h["checkpoint"]
    return CheckpointInfo(
        id=c["id"],
        seq=c["seq"],
        time=parse_time(c["time"]),
        tags=list(c.get("tags", [])) + [t for t in tags if t not in c.get("tags", [])],
        added_bytes=c.get("added_bytes", 0),
        changed_blocks=c.get("changed_blocks", 0),
        meta={k: v for k, v in c.get("meta", {}).items() if k != "encryption"},
        encryption=c.get("meta", {}).get("encryption", {}),
    )


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
    # retention_lock_hours: checkpoints at or after this time were never candidates
    locked_since: datetime | None = None
    locked: int = 0  # how many kept checkpoints are locked
    # the hard limit is exceeded and only locked history is left to drop: nothing locked
    # was dropped; the caller pauses replication with an error alert
    lock_blocked_limit: bool = False

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


@dataclass
class RepairResult:
    busy: bool = False  # a garbage collection or recover() was running: nothing was done
    packs_indexed: int = 0  # packs whose trailer was read and listed in the new index file
    blobs_indexed: int = 0
    index_files_replaced: int = 0  # index files (readable or not) the new one replaced
    index_file: str | None = None  # name of the new index file (None: no pack to index)
    bad_packs: list[str] = field(default_factory=list)  # "name: reason" of packs left out


class BlockMap(Sequence):
    """Block ids of one disk at one checkpoint: map[i] is the id (32 bytes) or None (zero)."""

    def __init__(self, ids: np.ndarray, block_size: int, size: int) -> None:
        self._ids = ids  # (n, 32) uint8, read-only
        self.block_size = block_size
        self.size = size
        self._nz: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):  # type: ignore[override]  # Sequence's overloads; ints and slices both work
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
            nz = np.asarray(self._ids.any(axis=1)) if len(self._ids) else np.zeros(0, bool)
            self._nz = nz
            return nz
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
