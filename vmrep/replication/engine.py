"""Replication steps: consistency points, disk transfer into the journal, checkpoints.

Plain functions over a `Runtime`; each is one retryable step (Prefect tasks in
`tasks/replication.py` wrap them one to one). A cycle is:

    consistency point (one snapshot per VM, all VMs at once)
    -> changed blocks of every disk since the last checkpoint, into the journal
    -> one VPG-wide checkpoint, timed at the consistency point
    -> snapshots removed (also when the cycle failed)
    -> retention (in one process; served, the recovery site's retention run does it).

The parts live beside it: consistency points in `points.py`, the disk and journal ends
of a transfer in `endpoints.py`, CBT and its fallbacks in `changes.py`, verification
against the source in `source_check.py`, the block engine in `blocks.py`; this module
holds the transfer, the checkpoint writers, retention and the sequences (~550 lines:
they share the writer registry below, which a cycle's steps find their open checkpoint
in, and which is why the sequences and the writers stay in one module).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Callable


from vmrep.config import VPG
from vmrep.errors import JournalError, JournalLocked, NotFound, Refused
from vmrep.replication.blocks import DiskSyncStats, sync_disk
from vmrep.runtime import Runtime
from vmrep.vsphere.inventory import DiskInfo, VMInfo, named_vms
from vmrep.stamps import utcnow
from vmrep.status import Status, Substatus
# The cycle's parts, each in its module; named here too, so `engine.X` stays the one
# address of every replication step for the tasks, the CLI and the tests.
from vmrep.replication.changes import (SOURCE_MISMATCH as SOURCE_MISMATCH, DiskPlan as DiskPlan,
                                       clear_delta_sync as clear_delta_sync,
                                       enable_change_tracking as enable_change_tracking,
                                       mark_delta_sync as mark_delta_sync, plan_disk as plan_disk,
                                       previous_change_ids as previous_change_ids, previous_map as previous_map,
                                       snapshot_ids as snapshot_ids, source_mismatch_disks as source_mismatch_disks)
from vmrep.replication.endpoints import (DatastoreFileSource as DatastoreFileSource, VMDiskSource as VMDiskSource,
                                         is_remote as is_remote, journal_for as journal_for,
                                         preseed_source as preseed_source)
from vmrep.replication.points import (SNAPSHOT_PREFIX as SNAPSHOT_PREFIX,
                                      create_consistency_point as create_consistency_point,
                                      create_consistency_points as create_consistency_points,
                                      find_snapshot as find_snapshot,
                                      remove_consistency_points as remove_consistency_points,
                                      snapshot_label as snapshot_label)
from vmrep.replication.source_check import (source_verification_due as source_verification_due,
                                            verify_against_source as verify_against_source)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Inventory of a VPG


def vpg_vms(rt: Runtime, vpg: VPG) -> dict[str, VMInfo]:
    """The VPG's VMs at the protected site, read afresh (only those, by id: a site may hold
    thousands); NotFound names a missing VM."""
    found = named_vms(rt.client(vpg.protected_site), [vm.name for vm in vpg.vms])
    missing = [vm.name for vm in vpg.vms if vm.name not in found]
    if missing:
        raise NotFound(f"VPG {vpg.name}: VM {', '.join(missing)} not found at protected site {vpg.protected_site}")
    return {vm.name: found[vm.name] for vm in vpg.vms}


# --------------------------------------------------------------------------------------
# Transfer


@dataclass
class VMTransfer:
    vm: str
    disks: dict[str, DiskSyncStats] = field(default_factory=dict)

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.disks.values())

    @property
    def bytes_stored(self) -> int:
        return sum(s.bytes_stored for s in self.disks.values())

    @property
    def blocks_changed(self) -> int:
        return sum(s.blocks_changed for s in self.disks.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.disks.values())


def transfer_disk(rt: Runtime, vpg: VPG, vm: VMInfo, disk: DiskInfo, writer: Any, previous: str | None, *,
                  threads: int = 2, progress: Callable[[int], None] | None = None,
                  preseed: Any = None, snapshot: Any | None = None, new_ids: dict[int, str] | None = None,
                  prev_ids: dict[tuple[str, str], str | None] | None = None) -> DiskSyncStats:
    """Send the changed blocks of one disk into the open checkpoint.

    `preseed` is a DiskSource holding a copy already at the recovery site: its blocks
    are stored from there first, so only the blocks that differ travel. `snapshot` and
    `new_ids` (the VM's replication snapshot and its change ids) let CBT find the
    changed areas; without them the disk is hash-scanned."""
    writer.set_disk_size(vm.name, disk.id, disk.capacity)
    seeded = preseed is not None and preseed.size == disk.capacity and previous is None
    seed_map = None
    remote_seed = getattr(writer, "preseed", None)
    if seeded and remote_seed is not None and isinstance(preseed, DatastoreFileSource):
        # Through the journal service: the copy is hashed next to it at the recovery site
        # and its blocks stored there; the source is compared with its map here and only
        # the blocks that differ cross (docs/journal-service.md).
        seed_map = remote_seed(vm.name, disk.id, preseed.path, preseed.size)
    elif seeded:
        sync_disk(writer, vm.name, disk.id, preseed, previous=None, threads=threads)
    plan = plan_disk(rt, vpg, vm, disk, previous, snapshot, new_ids or {}, prev_ids or {}, preseeded=seeded)
    if plan.fallback is not None:
        # a warning unless the VPG asked for it (change_tracking: off): then every cycle scans
        level = logging.INFO if vpg.change_tracking == "off" else logging.WARNING
        log.log(level, "VPG %s: VM %s disk %s: %s by hash scan: %s", vpg.name, vm.name, disk.id,
                "full copy" if plan.method == "full" else "changes found", plan.fallback)
        mark_delta_sync(rt, vpg.name, f"VM {vm.name} disk {disk.id}: hash scan ({plan.fallback})")
    src = VMDiskSource(rt.datastores(vpg.protected_site), disk)
    hint = getattr(writer, "hint_extents", None)
    if hint is not None and plan.method == "cbt" and plan.ranges is not None:
        # Through the journal service: a changed block may cross as its changed extents
        # only, rebuilt at the recovery site on the previous block (docs/journal-service.md).
        hint(vm.name, disk.id, plan.ranges, plan.previous)
    st = sync_disk(writer, vm.name, disk.id, src, previous=plan.previous if seed_map is None else seed_map,
                   changed_ranges=plan.ranges,
                   threads=threads, progress=progress or progress_hook())
    sent_for = getattr(writer, "sent_for", None)
    if sent_for is not None:
        # Through the journal service the blocks are queued and sent in batches: the disk's
        # last ones go now, and what they cost (sent, stored, already there) is known after.
        writer.flush(vm.name, disk.id)
        st.bytes_sent = sent_for(vm.name, disk.id)
        st.bytes_stored, st.blocks_deduplicated = writer.stored_for(vm.name, disk.id)
    st.method, st.change_id, st.fallback = plan.method, plan.change_id, plan.fallback
    st.bytes_changed = plan.bytes_changed if plan.bytes_changed is not None else \
        min(st.blocks_changed * writer.block_size, disk.capacity)
    return st


def transfer_vm(rt: Runtime, vpg: VPG, vm: VMInfo, writer: Any, previous: str | None, *,
                threads: int = 2, progress: Callable[[int], None] | None = None,
                preseed: dict[str, Any] | None = None) -> VMTransfer:
    out = VMTransfer(vm.name)
    snap, ids = snapshot_ids(rt, vpg, vm)
    prev_ids = previous_change_ids(rt, vpg.name, previous)
    for disk in vm.disks:
        out.disks[disk.id] = transfer_disk(rt, vpg, vm, disk, writer, previous, threads=threads,
                                           progress=progress, preseed=(preseed or {}).get(disk.id),
                                           snapshot=snap, new_ids=ids, prev_ids=prev_ids)
    return out


def checkpoint_meta(transfers: dict[str, VMTransfer]) -> dict[str, Any]:
    """The per-checkpoint transfer record (docs/journal-format.md, "Checkpoint meta"):
    totals and one row per disk with its method and change id. bytes_sent: what crossed
    the WAN to the recovery site's journal service (block batches), or, where the journal
    is written directly (no WAN link of its own), what was stored."""
    disks = [{"vm": vm, "disk": d, "method": s.method, "bytes_read": s.bytes_read,
              "bytes_changed": s.bytes_changed,
              "bytes_sent": s.bytes_stored if s.bytes_sent is None else s.bytes_sent, "change_id": s.change_id,
              **({"fallback": s.fallback} if s.fallback else {})}
             for vm, t in sorted(transfers.items()) for d, s in sorted(t.disks.items())]
    return {"bytes_read": sum(r["bytes_read"] for r in disks),
            "bytes_sent": sum(r["bytes_sent"] for r in disks),
            "bytes_changed": sum(r["bytes_changed"] for r in disks),
            "disks": disks}


_progress: list[Callable[[int], None]] = []


def progress_hook() -> Callable[[int], None] | None:
    """The CLI's progress bar, when one is showing (flows run in the same process)."""
    return _progress[-1] if _progress else None


class showing_progress:
    def __init__(self, fn: Callable[[int], None]) -> None:
        self.fn = fn

    def __enter__(self) -> None:
        _progress.append(self.fn)

    def __exit__(self, *exc: object) -> None:
        _progress.remove(self.fn)


# --------------------------------------------------------------------------------------
# Checkpoints and cycles


@dataclass
class _OpenCheckpoint:
    writer: Any
    cycle: str | None
    hold: bool = False  # an empty checkpoint holding the writer lock after the commit: never committed


# The open checkpoint of each VPG, per Runtime, in this process. Module-global because
# an open checkpoint exists only in the memory of the process that began it (its pack
# buffers and block maps, the journal's per-VPG lock held by that process): all of a
# cycle's steps (transfers and the commit) must therefore run in its flow run's
# process, which is why the flows run their tasks in threads (ThreadPoolTaskRunner)
# and never hand them to other workers. A step that finds no open checkpoint of its
# cycle fails with one line saying so.
# This registry works only because all of a cycle's tasks run in its flow run's process.
# Work pools keep that true: a process worker starts each flow run as one process, whose
# tasks run in its threads; Prefect never sends a task run to another worker or machine.
# Whoever changes the task runner (Dask, Ray, a task worker) must move the open
# checkpoint out of process memory first.
_writers: dict[tuple[int, str], _OpenCheckpoint] = {}
_writers_lock = threading.Lock()


def new_cycle() -> str:
    """A token naming one cycle's open checkpoint; kept in the checkpoint's meta, so a
    retried commit finds what the first try published."""
    return uuid.uuid4().hex[:16]


def open_writer(rt: Runtime, vpg: str, cycle: str | None = None) -> Any:
    """The open checkpoint of a VPG in this process (shared by the cycle's transfer
    steps), begun by the first step that asks. With `cycle`, the open checkpoint of
    another cycle is refused: two sequences in one process never share a writer."""
    key = (id(rt), vpg)
    with _writers_lock:
        e = _writers.get(key)
        if e is not None and cycle is not None and e.cycle not in (None, cycle):
            raise JournalLocked(f"VPG {vpg}: locked by another writer in this process "
                               f"(cycle {e.cycle} is open)")
        if e is None:
            j = journal_for(rt, vpg)
            if not is_remote(rt, vpg):
                from vmrep.journal.journal import RETENTION_WAIT_SECONDS

                w = j.begin(vpg, wait=RETENTION_WAIT_SECONDS)  # a retention run may hold the VPG a moment
            else:  # compressed at the sender when the VPG says so (docs/journal-service.md)
                w = j.begin(vpg, compress=rt.config.vpg(vpg).wan_compression,
                            compression_level=max(1, rt.config.journal.compression_level))
            e = _writers[key] = _OpenCheckpoint(w, cycle)
        return e.writer


def close_writer(rt: Runtime, vpg: str, *, commit: bool, at: datetime | None = None,
                 tag: str | None = None, meta: dict[str, Any] | None = None) -> Any:
    """Commit or abort the VPG's open checkpoint (None when there is none)."""
    key = (id(rt), vpg)
    with _writers_lock:
        e = _writers.pop(key, None)
    if e is None:
        return None
    if not commit:
        e.writer.abort()
        return None
    return e.writer.commit(time=at, tag=tag, meta=meta)


def discard_writer(rt: Runtime, vpg: str, cycle: str | None = None) -> None:
    """Abort the open checkpoint (only that of `cycle` when given): after a failed
    sequence, or one a crashed run left in this process."""
    key = (id(rt), vpg)
    with _writers_lock:
        e = _writers.get(key)
        if e is None or (cycle is not None and e.cycle != cycle):
            return
        del _writers[key]
    e.writer.abort()


def _hold_writer_lock(rt: Runtime, vpg: str, cycle: str) -> None:
    """Take the VPG's writer lock again for `cycle` at once after its commit, as an empty
    open checkpoint (a hold, never committed) that `discard_writer` aborts: the cycle's
    snapshots outlive its commit (verification against the source, their removal), and
    while they exist the lock must say the cycle is alive (vmrep.replication.leftovers).
    Taken by someone else in between (retention): the cycle goes on without it."""
    key = (id(rt), vpg)
    try:
        with _writers_lock:
            if key not in _writers:
                _writers[key] = _OpenCheckpoint(journal_for(rt, vpg).begin(vpg), cycle, hold=True)
    except JournalError as exc:
        log.info("VPG %s: writer lock not held again after the commit: %s", vpg, exc)


def published_checkpoint(rt: Runtime, vpg: str, cycle: str) -> Any | None:
    """The checkpoint that cycle `cycle` published, if it did."""
    for cp in reversed(journal_for(rt, vpg).checkpoints(vpg)):
        if cp.meta.get("cycle") == cycle:
            return cp
    return None


def commit_checkpoint(rt: Runtime, vpg: str, cycle: str, *, at: datetime | None, tag: str | None,
                      meta: dict[str, Any]) -> Any:
    """Publish the cycle's open checkpoint; idempotent. A retry after the publication
    (a later side effect failed, or the reply was lost) gets the checkpoint the first
    try published, found by the cycle's token in its meta; a retry after a commit that
    published nothing fails with one line (the open checkpoint went with it)."""
    key = (id(rt), vpg)
    with _writers_lock:
        e = _writers.get(key)
        mine = e is not None and e.cycle == cycle and not e.hold  # a hold: the retry of a published commit
        if mine:
            del _writers[key]
    if e is not None and mine:
        try:
            cp = e.writer.commit(time=at, tag=tag, meta={**meta, "cycle": cycle})
        except BaseException:
            cp = published_checkpoint(rt, vpg, cycle)
            if cp is None:
                raise
            return cp  # published, then something after it failed
        _hold_writer_lock(rt, vpg, cycle)  # in this step, so no step boundary lies between
        return cp
    cp = published_checkpoint(rt, vpg, cycle)
    if cp is not None:
        return cp
    raise JournalError(f"VPG {vpg}: no open checkpoint of cycle {cycle} in this process and none published "
                       "(its commit failed, or its steps ran in another process); the next cycle takes it again")


def latest_checkpoint_id(rt: Runtime, vpg: str) -> str | None:
    cps = journal_for(rt, vpg).checkpoints(vpg)
    return cps[-1].id if cps else None


LOCK_ALERT = "JOURNAL_LIMIT_LOCKED"


def retention_bounds(rt: Runtime, vpg: VPG, now: datetime, journal: Any = None) -> tuple[datetime, datetime | None]:
    """(keep since, locked since) for retention. Locked: checkpoints younger than
    retention_lock_hours, and while encryption is suspected everything back to the last
    clean checkpoint (vmrep.ransomware): both are held even against the hard limit."""
    from vmrep.ransomware.service import keep_since as clean_since

    keep = now - timedelta(seconds=vpg.history_seconds)
    lock = now - timedelta(hours=vpg.retention_lock_hours) if vpg.retention_lock_hours > 0 else None
    held = clean_since(journal if journal is not None else rt.journal, vpg.name)
    if held is not None:
        lock = held if lock is None else min(lock, held)
    return keep, lock


def apply_retention(rt: Runtime, vpg: VPG, now: datetime | None = None, *,
                    at_recovery_site: bool = False) -> Any:
    """The VPG's retention (history window, hard limit, and the locks of retention_bounds)
    on the journal directory, with its alerts in the state database.

    `at_recovery_site`: the caller runs where the journal is (the `retention/<site>`
    deployment on the recovery site's pool, flows/retention.py), so a VPG replicated
    through that site's journal service is retained too. Without it such a VPG is
    skipped: the protected site reaches its journal only through the service, whose
    writer credential may not shorten history."""
    if is_remote(rt, vpg.name) and not at_recovery_site:
        from vmrep.journal.results import RetentionResult

        return RetentionResult(vpg.name, None)
    now = now or utcnow()
    limit = vpg.hard_limit_bytes or None
    # At the recovery site the journal directory is this VPG's journal even where the
    # config also names the service that the protected site writes through: there the
    # guard on rt.journal (runtime.GuardedJournal) does not apply.
    journal = getattr(rt.journal, "_local", rt.journal) if at_recovery_site else rt.journal
    keep, lock = retention_bounds(rt, vpg, now, journal)
    result = journal.apply_retention(vpg.name, keep, limit, lock)
    if result.hard_limit_hit:
        # An event, not a state: recorded raised and cleared at once, so it shows in the
        # history and the reports without staying open.
        row = rt.store.raise_alert(
            vpg.name, "JOURNAL_HARD_LIMIT", "warning",
            f"VPG {vpg.name}: journal hard limit {vpg.journal_hard_limit_gb:g} GB reached: "
            f"{len(result.dropped_by_limit)} oldest checkpoint(s) dropped", data={"dropped": result.dropped_by_limit})
        if row is not None:
            rt.store.clear_alert(row.id)
    open_lock = [a for a in rt.store.open_alerts(vpg.name) if a.code == LOCK_ALERT]
    if result.lock_blocked_limit:
        # A state, not an event: open until retention can honour the limit again (the lock
        # window moved on, a suspicion was dismissed, the limit was raised); replication
        # refuses to run meanwhile (`ensure_not_blocked`) instead of dropping locked history.
        if not open_lock:
            why = (f"the {result.locked} newest checkpoint(s) are locked (retention_lock_hours "
                   f"{vpg.retention_lock_hours:g}, or kept back to the last clean checkpoint while "
                   "ENCRYPTION_SUSPECTED is open)")
            rt.store.raise_alert(
                vpg.name, LOCK_ALERT, "error",
                f"VPG {vpg.name}: replication paused: journal hard limit {vpg.journal_hard_limit_gb:g} GB reached "
                f"and {why}; raise the limit or wait for the lock to pass",
                data={"locked": result.locked,
                      "locked_since": result.locked_since.isoformat() if result.locked_since else None})
    else:
        for a in open_lock:
            rt.store.clear_alert(a.id)
    return result


def retention_summary(r: Any) -> dict[str, Any]:
    """A retention result as plain values (a task's result, the retention flow's log)."""
    return {"vpg": r.vpg, "base": r.base, "promoted": len(r.promoted), "dropped_by_limit": len(r.dropped_by_limit),
            "hard_limit_hit": r.hard_limit_hit, "lock_blocked_limit": r.lock_blocked_limit, "locked": r.locked,
            "bytes_before": r.bytes_before, "bytes_after": r.bytes_after}


def ensure_not_blocked(rt: Runtime, vpg: VPG, *, retention: bool = True) -> None:
    """Replication is paused while the hard limit can only be met by dropping locked
    history; retention is tried again first (the lock may have passed meanwhile) when
    this process applies it (`retention`, and the journal is here). Otherwise the
    recovery site's retention run clears the alert, and until then the cycle refuses."""
    if not any(a.code == LOCK_ALERT for a in rt.store.open_alerts(vpg.name)):
        return
    here = retention and not is_remote(rt, vpg.name)
    if not here or apply_retention(rt, vpg).lock_blocked_limit:
        raise Refused(f"VPG {vpg.name}: replication paused: journal hard limit "
                      f"{vpg.journal_hard_limit_gb:g} GB reached and the oldest history is locked "
                      f"({LOCK_ALERT} is open)")


@dataclass
class CycleResult:
    vpg: str
    checkpoint_id: str
    time: datetime
    vms: dict[str, VMTransfer]
    seconds: float
    tag: str | None = None
    verified: dict[str, Any] | None = None  # the verification against the source, when one ran

    @property
    def bytes_read(self) -> int:
        return sum(v.bytes_read for v in self.vms.values())

    @property
    def bytes_stored(self) -> int:
        return sum(v.bytes_stored for v in self.vms.values())

    @property
    def blocks_changed(self) -> int:
        return sum(v.blocks_changed for v in self.vms.values())

    @property
    def transfer_seconds(self) -> float:
        """The slowest VM's transfer: the cycle's own work on its critical path (the
        rest of `seconds` is orchestration: Prefect's, when a flow runs the steps)."""
        return max((v.seconds for v in self.vms.values()), default=0.0)

    def summary(self) -> dict[str, Any]:
        return {"vpg": self.vpg, "checkpoint": self.checkpoint_id, "time": self.time.isoformat(),
                "bytes_read": self.bytes_read, "bytes_stored": self.bytes_stored,
                "blocks_changed": self.blocks_changed, "seconds": round(self.seconds, 3),
                "transfer_seconds": round(self.transfer_seconds, 3),
                **({"verified_against_source": self.verified} if self.verified is not None else {})}

    def disk_rows(self) -> list[dict[str, Any]]:
        return [{"vm": vm, "disk": d, "bytes_read": s.bytes_read, "bytes_stored": s.bytes_stored,
                 "blocks_changed": s.blocks_changed, "seconds": s.seconds}
                for vm, t in self.vms.items() for d, s in t.disks.items()]


def ensure_replicable(rt: Runtime, vpg: VPG, *, retention: bool = True) -> None:
    runtime = rt.store.runtime(vpg.name)
    if not runtime.initial_sync_done:
        raise Refused(f"VPG {vpg.name}: initial sync has not completed; run 'vmrep sync {vpg.name}' first")
    if runtime.paused:
        raise Refused(f"VPG {vpg.name}: replication is paused")
    ensure_not_blocked(rt, vpg, retention=retention)


# --------------------------------------------------------------------------------------
# The sequences, written once: a runner runs their steps (`vmrep.replication.steps`),
# DirectRunner in this process or the flows' Prefect runner as one task run per step.


def direct_runner() -> Any:
    from vmrep.replication.steps import STEPS
    from vmrep.runner import DirectRunner

    return DirectRunner(STEPS)


def _cleanup_runner(runner: Any, exc: BaseException | None) -> Any:
    """After a cancel the orchestration may not submit tasks any more: clean up here."""
    return direct_runner() if exc is not None and not isinstance(exc, Exception) else runner


_STAT_FIELDS = [f.name for f in fields(DiskSyncStats)]


def _transfers(rows: list[dict[str, Any]]) -> dict[str, VMTransfer]:
    out: dict[str, VMTransfer] = {}
    for r in rows:
        t = out.setdefault(r["vm"], VMTransfer(r["vm"]))
        for disk, st in r["disks"].items():
            t.disks[disk] = DiskSyncStats(**{k: st[k] for k in _STAT_FIELDS if k in st})
    return out


def run_cycle(rt: Runtime, vpg: VPG, *, tag: str | None = None, runner: Any = None,
              verify_source: bool | None = None, retention: bool = True) -> CycleResult:
    """One replication cycle: leftovers removed, consistency point, every VM's changed
    blocks (VMs in parallel), one checkpoint, snapshots removed (also when the cycle
    failed), retention.

    `retention` False: no retention step. A served replicate run (the protected site's
    pool) passes it: retention is the recovery site's `retention/<site>` deployment's
    (flows/retention.py). In one process (the CLI, `vmrep sync`/`replicate`) it stays on."""
    runner = runner or direct_runner()
    config, name = str(rt.config.source), vpg.name
    t0 = time.monotonic()
    ensure_not_blocked(rt, vpg, retention=retention)  # paused by a locked journal at its hard limit
    vms = runner.one("read-vpg-inventory", config, name)
    cycle = new_cycle()
    # The writer (and with it the journal's per-VPG writer lock) first, held until the
    # snapshots are gone: a monitor pass that finds the lock free knows that no cycle's
    # snapshot is live (`vmrep.replication.leftovers`).
    open_writer(rt, name, cycle)
    committed: dict[str, Any] | None = None
    verified: dict[str, Any] | None = None
    failure: BaseException | None = None
    try:
        runner.one("release-consistency-points", config, name)  # leftovers of a crashed cycle
        previous = latest_checkpoint_id(rt, name)
        at = runner.one("consistency-point", config, name, vms)
        rows = runner.each("transfer-vm", [(config, name, vm, previous, cycle) for vm in vms.values()])
        transfers = _transfers(rows)
        committed = runner.one("commit-checkpoint", config, name, cycle, at, tag,
                               {"kind": "cycle", "previous": previous, **checkpoint_meta(transfers)})
        if verify_source is None:
            verify_source = source_verification_due(rt, vpg)
        if verify_source:  # while the snapshots still freeze what the checkpoint holds
            verified = runner.one("verify-against-source", config, name, vms, committed["id"])
    except BaseException as exc:
        failure = exc
        raise
    finally:
        try:
            _cleanup_runner(runner, failure).one("release-consistency-points", config, name)
        finally:
            discard_writer(rt, name, cycle)  # the open checkpoint, or the hold after the commit
    clear_delta_sync(rt, name)  # every disk's changes are in the checkpoint: no scan runs now
    rescanned = {(vm, d) for vm, t in transfers.items() for d, st in t.disks.items() if st.method != "cbt"}
    for key, alert_id in source_mismatch_disks(rt, name).items():
        if key in rescanned and not (verified and any(
                (r["vm"], r["disk"]) == key and r["blocks_differing"] for r in verified["disks"])):
            rt.store.clear_alert(alert_id)  # compared block by block again: the checkpoint is exact
    if retention:
        runner.one("apply-retention", config, name)
    return CycleResult(name, committed["id"], committed["time"], transfers, time.monotonic() - t0, tag,
                       verified)


def initial_sync(rt: Runtime, vpg: VPG, *, runner: Any = None, who: str | None = None,
                 flow_run_id: str | None = None, validate: bool = True) -> CycleResult:
    """Full copy of every disk into the journal (one step per disk, pre-seeded where the
    config says), ending with the first checkpoint.

    Validates the VPG first (`validate`), then holds the VPG as operation initial_sync:
    Initializing/InitialSync while it runs (no recovery may start), MeetingSLA/DeltaSync
    and initial_sync_done when it ends. Resumable: blocks already in the store (from a
    run that broke off) are not stored again."""
    from vmrep.state.holding import holding_vpg

    runner = runner or direct_runner()
    config, name, store = str(rt.config.source), vpg.name, rt.store
    t0 = time.monotonic()
    if validate:
        runner.one("validate-vpg", config, name)

    def refusal(row: Any) -> str:
        return f"VPG {name}: another operation ({row.lock_kind}) holds it"

    with holding_vpg(store, name, "initial_sync", who=who, params={"vpg": name}, flow_run_id=flow_run_id,
                     refusal=refusal) as op:
        cycle = new_cycle()
        try:
            store.update_runtime(name, initial_sync_done=False)
            store.set_status(name, Status.INITIALIZING, Substatus.INITIAL_SYNC)
            vms = runner.one("read-vpg-inventory", config, name)
            discard_writer(rt, name)  # an open checkpoint of a crashed run in this process
            open_writer(rt, name, cycle)  # the writer lock before any snapshot, as in run_cycle
            runner.one("release-consistency-points", config, name)  # leftovers of a crashed run
            # Tracking on before the first snapshot, so that this snapshot's change ids
            # are the base of the first cycle's QueryChangedDiskAreas.
            runner.one("enable-change-tracking", config, name, vms)
            at = runner.one("consistency-point", config, name, vms)
            rows = runner.each("transfer-disk", [
                (config, name, vm, disk, None, vpg.vm(vm_name).preseed.get(disk.id), cycle)
                for vm_name, vm in vms.items() for disk in vm.disks])
            transfers = _transfers([{"vm": r["vm"], "disks": {r["disk"]: r}} for r in rows])
            cp = runner.one("commit-checkpoint", config, name, cycle, at, "initial sync",
                            {"kind": "initial_sync", **checkpoint_meta(transfers)})
        except BaseException as exc:
            store.set_status(name, Status.INITIALIZING, Substatus.INITIAL_SYNC, detail=f"initial sync failed: {exc}")
            try:
                _cleanup_runner(runner, exc).one("release-consistency-points", config, name)
            except Exception as cleanup:  # noqa: BLE001 - the sync's own failure is what the user must see
                log.warning("VPG %s: consistency points not released after the failed sync: %s", name, cleanup)
            finally:
                discard_writer(rt, name, cycle)  # the writer lock held until the snapshots are gone
            raise
        try:  # the commit step took the writer lock again (a hold) for this
            runner.one("release-consistency-points", config, name)
        finally:
            discard_writer(rt, name, cycle)
        store.update_runtime(name, initial_sync_done=True)
        store.set_status(name, Status.MEETING_SLA, Substatus.DELTA_SYNC)
        store.finish_operation(op, "succeeded")
    return CycleResult(name, cp["id"], cp["time"], transfers, time.monotonic() - t0, "initial sync")


def disk_bytes(vms: dict[str, VMInfo]) -> int:
    return sum(d.capacity for vm in vms.values() for d in vm.disks)
