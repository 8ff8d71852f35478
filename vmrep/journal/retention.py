"""Retention and promotion: moving a VPG's history start forward (by time window and hard
limit), dropping tags of dropped checkpoints, and compaction (folding hidden deltas into a
new base file). Protocol: "Retention" in docs/journal-format.md.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from vmrep.journal import format as fmt
from vmrep.journal._fs import ensure_dir, fsync_dir, publish, unlink_quiet
from vmrep.journal._sessions import open_session, vpg_lock
from vmrep.journal.chain import Chain, drop_tags
from vmrep.journal.maintenance import collect_garbage
from vmrep.journal.results import CheckpointInfo, RetentionResult, utc
from vmrep.journal.store import now_iso

if TYPE_CHECKING:
    from vmrep.journal.journal import Journal


def apply_retention(j: Journal, vpg: str, keep_since: datetime,
                    hard_limit_bytes: int | None = None, lock_since: datetime | None = None) -> RetentionResult:
    """Move the history start to the oldest checkpoint at or after `keep_since`, further
    if the hard limit needs it; never past the oldest checkpoint at or after
    `lock_since` (retention_lock_hours): a locked checkpoint is removed by nothing."""
    keep_since = utc(keep_since)
    if lock_since is not None:
        lock_since = utc(lock_since)
        keep_since = min(keep_since, lock_since)  # a shortened history window cannot cut the lock
    chains = j.chains
    vlock = vpg_lock(chains.vpg_dir(vpg), vpg, j.lock_timeout, "retention")
    try:
        session = open_session(j.root, j.store, "retention", vpg)
        try:
            chain = chains.chain(vpg)
            infos = chains.infos(chain)
            res = RetentionResult(vpg, infos[0].id if infos else None)
            if not infos:
                return res
            k = next((k for k, i in enumerate(infos) if i.time >= keep_since), len(infos) - 1)
            # Index of the oldest locked checkpoint (len(infos): none is locked)
            kl = len(infos) if lock_since is None else \
                next((n for n, i in enumerate(infos) if i.time >= lock_since), len(infos))
            res.locked_since, res.locked = lock_since, len(infos) - kl
            res.bytes_before = chains.usage_at(chain, infos[0].seq)[0]
            final = k
            if hard_limit_bytes is not None and hard_limit_bytes > 0:
                if chains.usage_at(chain, infos[k].seq)[0] > hard_limit_bytes:
                    lo, hi = k + 1, len(infos) - 1
                    final = hi
                    while lo <= hi:  # usage never grows as the start moves forward
                        mid = (lo + hi) // 2
                        if chains.usage_at(chain, infos[mid].seq)[0] <= hard_limit_bytes:
                            final, hi = mid, mid - 1
                        else:
                            lo = mid + 1
                    if final > kl:
                        final = kl  # the limit would cut locked history: keep it, say so
                        res.lock_blocked_limit = True
                    res.hard_limit_hit = final > k
                    res.over_limit = chains.usage_at(chain, infos[final].seq)[0] > hard_limit_bytes
            res.promoted = [i.id for i in infos[:k]]
            res.dropped_by_limit = [i.id for i in infos[k:final]]
            res.base = infos[final].id
            if final > 0:
                move_start(j, chain, infos[final], [i.id for i in infos[:final]], session.sid)
                chain = chains.chain(vpg)
                res.compacted = maybe_compact(j, chain, session.sid)
                if res.compacted:
                    chain = chains.chain(vpg)
            assert chain.start_seq is not None  # there are checkpoints
            res.bytes_after = chains.usage_at(chain, chain.start_seq)[0]
        finally:
            session.close()
        if final > 0:
            res.gc, res.gc_deferred = collect_garbage(j)
        return res
    finally:
        vlock.release()


def move_start(j: Journal, chain: Chain, new_start: CheckpointInfo, dropped: list[str], owner: str) -> None:
    """Publish the start marker (the commit point of retention), then tidy up behind it."""
    d = chain.dir
    ensure_dir(d / "start")
    body = {"format": fmt.FORMAT_VERSION, "checkpoint": new_start.id, "seq": new_start.seq,
            "written": now_iso(), "dropped": dropped}
    publish(j.root / "tmp", d / "start" / f"{new_start.id}.start", json.dumps(body).encode(), owner=owner)
    for s, p in chain.starts.items():
        if s < new_start.seq:
            unlink_quiet(p)
    drop_tags(d, set(dropped))
    fsync_dir(d / "start")


def maybe_compact(j: Journal, chain: Chain, owner: str, force: bool = False) -> bool:
    """Fold the hidden deltas (before the history start) into a new base file."""
    start = chain.start_seq
    if start is None or start == chain.base_seq:
        return False
    hidden = [p for s, p in chain.deltas.items() if chain.base_seq < s <= start]
    hidden_bytes = sum(p.stat().st_size for p in hidden)
    base_bytes = chain.base.stat().st_size if chain.base else 0
    if not force and hidden_bytes < max(j.compact_min_bytes, j.compact_ratio * base_bytes) \
            and len(hidden) < j.compact_max_files:
        return False
    write_base(j, chain, start, owner)
    return True


def write_base(j: Journal, chain: Chain, seq: int, owner: str) -> None:
    h = j.chains.header_at(chain, seq)
    disks, maps = [], []
    for d in h["disks"]:
        r = j.chains.map_array(chain, seq, d["vm"], d["disk"])
        assert r is not None  # the disk is in the header of the file at seq
        arr, size = r
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
        "block_size": j.block_size,
        "written": now_iso(),
        "checkpoint": h["checkpoint"],
        "disks": disks,
    }
    cp_id = h["checkpoint"]["id"]
    ensure_dir(chain.dir / "base")
    publish(j.root / "tmp", chain.dir / "base" / f"{cp_id}.base", fmt.encode_ckpt(header, maps),
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
