"""Replication steps: consistency points, disk transfer into the journal, checkpoints.

Plain functions over a `Runtime`; each is one retryable step (Prefect tasks in
`tasks/replication.py` wrap them one to one). A cycle is:

    consistency point (one snapshot per VM, all VMs at once)
    -> changed blocks of every disk since the last checkpoint, into the journal
    -> one VPG-wide checkpoint, timed at the consistency point
    -> snapshots removed (also when the cycle failed)
    -> retention.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Callable


from vmrep.config import VPG
from vmrep.errors import JournalError, JournalLocked, NotFound, Refused
from vmrep.replication.blocks import DiskSyncStats, sync_disk
from vmrep.runtime import Runtime
from vmrep.vsphere.datastore import DatastoreAccess
from vmrep.vsphere.inventory import DiskInfo, VMInfo
from vmrep.stamps import utcnow
from vmrep.status import Status, Substatus
from vmrep.vsphere import vm as vmops

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "vmrep-cp"


class VMDiskSource:
    """A protected VM's disk, read through the datastore interface (local mount or /folder)."""

    def __init__(self, ds: DatastoreAccess, disk: DiskInfo) -> None:
        self.ds = ds
        self.disk = disk
        self.size = disk.capacity

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        return self.ds.read(self.disk.flat, offset, length)


class DatastoreFileSource:
    """A disk copy already on a datastore (a pre-seed at the recovery site)."""

    def __init__(self, ds: DatastoreAccess, path: str, size: int) -> None:
        self.ds, self.path, self.size = ds, path, size

    def read(self, offset: int, length: int) -> bytes:
        return self.ds.read(self.path, offset, min(length, self.size - offset))


def preseed_source(rt: Runtime, vpg: VPG, path: str, size: int) -> DatastoreFileSource | None:
    """The pre-seed copy at the recovery site, if it is there and of the disk's size."""
    ds = rt.datastores(vpg.recovery_site)
    try:
        if ds.size(path) != size:
            log.warning("VPG %s: pre-seed %s has another size than the disk; not used", vpg.name, path)
            return None
    except NotFound:
        return None
    return DatastoreFileSource(ds, path, size)


def snapshot_label(vpg: str) -> str:
    return f"{SNAPSHOT_PREFIX}-{vpg}"


# --------------------------------------------------------------------------------------
# Inventory of a VPG


def vpg_vms(rt: Runtime, vpg: VPG) -> dict[str, VMInfo]:
    """The VPG's VMs at the protected site, in one inventory read; NotFound names a missing VM."""
    found = rt.inventory(vpg.protected_site).vms_by_name()
    missing = [vm.name for vm in vpg.vms if vm.name not in found]
    if missing:
        raise NotFound(f"VPG {vpg.name}: VM {', '.join(missing)} not found at protected site {vpg.protected_site}")
    return {vm.name: found[vm.name] for vm in vpg.vms}


# --------------------------------------------------------------------------------------
# Consistency points


def create_consistency_point(rt: Runtime, vpg: VPG, vm: VMInfo) -> datetime:
    """Snapshot one VM (crash-consistent: no memory, no quiescing). Idempotent per cycle:
    an existing replication snapshot is reused by a retried step."""
    label = snapshot_label(vpg.name)
    if any(name == label for name, _ in vm.snapshots):
        return utcnow()
    client = rt.client(vpg.protected_site)
    at = utcnow()
    vmops.create_snapshot(client, vm.name, vm.ref, label, "consistency point",
                          description="vmrep replication consistency point")
    return at


def create_consistency_points(rt: Runtime, vpg: VPG, vms: dict[str, VMInfo]) -> datetime:
    """All VMs of the VPG at once; the checkpoint's time is when the first snapshot was asked for."""
    at = utcnow()
    with ThreadPoolExecutor(max_workers=min(8, len(vms))) as pool:
        list(pool.map(lambda v: create_consistency_point(rt, vpg, v), vms.values()))
    return at


def remove_consistency_points(rt: Runtime, vpg: VPG, vms: dict[str, VMInfo] | None = None) -> int:
    """Remove every replication snapshot of the VPG's VMs (also those a crashed cycle left).

    Reads the snapshot trees afresh; only snapshots named by vmrep are touched, one by
    one (RemoveAllSnapshots would take the user's own snapshots with it)."""
    label = snapshot_label(vpg.name)
    found = rt.inventory(vpg.protected_site).vms_by_name()
    names = [vm.name for vm in vpg.vms] if vms is None else list(vms)
    client = rt.client(vpg.protected_site)
    removed = 0
    for name in names:
        vm = found.get(name)
        if vm is None:
            continue
        for snap_name, ref in vm.snapshots:
            if snap_name == label:
                vmops.remove_snapshot(client, name, ref, "remove consistency point")
                removed += 1
    return removed


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


def previous_map(rt: Runtime, vpg: str, previous: str | None, vm: str, disk: DiskInfo) -> Any:
    if previous is None:
        return None
    disks = rt.journal.disks(vpg, previous)
    if disks.get((vm, disk.id)) != disk.capacity:
        return None  # new or resized disk: full scan (dedup still avoids storing known blocks)
    return rt.journal.block_map(vpg, previous, vm, disk.id)


def transfer_disk(rt: Runtime, vpg: VPG, vm: VMInfo, disk: DiskInfo, writer: Any, previous: str | None, *,
                  threads: int = 2, progress: Callable[[int], None] | None = None,
                  preseed: Any = None) -> DiskSyncStats:
    """Send the changed blocks of one disk into the open checkpoint.

    `preseed` is a DiskSource holding a copy already at the recovery site: its blocks
    are stored from there first, so only the blocks that differ travel."""
    writer.set_disk_size(vm.name, disk.id, disk.capacity)
    if preseed is not None and preseed.size == disk.capacity and previous is None:
        sync_disk(writer, vm.name, disk.id, preseed, previous=None, threads=threads)
    src = VMDiskSource(rt.datastores(vpg.protected_site), disk)
    return sync_disk(writer, vm.name, disk.id, src, previous=previous_map(rt, vpg.name, previous, vm.name, disk),
                     threads=threads, progress=progress or progress_hook())


def transfer_vm(rt: Runtime, vpg: VPG, vm: VMInfo, writer: Any, previous: str | None, *,
                threads: int = 2, progress: Callable[[int], None] | None = None,
                preseed: dict[str, Any] | None = None) -> VMTransfer:
    out = VMTransfer(vm.name)
    for disk in vm.disks:
        out.disks[disk.id] = transfer_disk(rt, vpg, vm, disk, writer, previous, threads=threads,
                                           progress=progress, preseed=(preseed or {}).get(disk.id))
    return out


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


# The open checkpoint of each VPG, per Runtime, in this process. Module-global because
# an open checkpoint exists only in the memory of the process that began it (its pack
# buffers and block maps, the journal's per-VPG lock held by that process): all of a
# cycle's steps (transfers and the commit) must therefore run in its flow run's
# process, which is why the flows run their tasks in threads (ThreadPoolTaskRunner)
# and never hand them to other workers. A step that finds no open checkpoint of its
# cycle fails with one line saying so.
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
            e = _writers[key] = _OpenCheckpoint(rt.journal.begin(vpg), cycle)
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


def published_checkpoint(rt: Runtime, vpg: str, cycle: str) -> Any | None:
    """The checkpoint that cycle `cycle` published, if it did."""
    for cp in reversed(rt.journal.checkpoints(vpg)):
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
        mine = e is not None and e.cycle == cycle
        if mine:
            del _writers[key]
    if e is not None and mine:
        try:
            return e.writer.commit(time=at, tag=tag, meta={**meta, "cycle": cycle})
        except BaseException:
            cp = published_checkpoint(rt, vpg, cycle)
            if cp is None:
                raise
            return cp  # published, then something after it failed
    cp = published_checkpoint(rt, vpg, cycle)
    if cp is not None:
        return cp
    raise JournalError(f"VPG {vpg}: no open checkpoint of cycle {cycle} in this process and none published "
                       "(its commit failed, or its steps ran in another process); the next cycle takes it again")


def latest_checkpoint_id(rt: Runtime, vpg: str) -> str | None:
    cps = rt.journal.checkpoints(vpg)
    return cps[-1].id if cps else None


def apply_retention(rt: Runtime, vpg: VPG, now: datetime | None = None) -> Any:
    now = now or utcnow()
    limit = vpg.hard_limit_bytes or None
    result = rt.journal.apply_retention(vpg.name, now - timedelta(seconds=vpg.history_seconds), limit)
    if result.hard_limit_hit:
        # An event, not a state: recorded raised and cleared at once, so it shows in the
        # history and the reports without staying open.
        row = rt.store.raise_alert(
            vpg.name, "JOURNAL_HARD_LIMIT", "warning",
            f"VPG {vpg.name}: journal hard limit {vpg.journal_hard_limit_gb:g} GB reached: "
            f"{len(result.dropped_by_limit)} oldest checkpoint(s) dropped", data={"dropped": result.dropped_by_limit})
        if row is not None:
            rt.store.clear_alert(row.id)
    return result


@dataclass
class CycleResult:
    vpg: str
    checkpoint_id: str
    time: datetime
    vms: dict[str, VMTransfer]
    seconds: float
    tag: str | None = None

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
                "transfer_seconds": round(self.transfer_seconds, 3)}

    def disk_rows(self) -> list[dict[str, Any]]:
        return [{"vm": vm, "disk": d, "bytes_read": s.bytes_read, "bytes_stored": s.bytes_stored,
                 "blocks_changed": s.blocks_changed, "seconds": s.seconds}
                for vm, t in self.vms.items() for d, s in t.disks.items()]


def ensure_replicable(rt: Runtime, vpg: VPG) -> None:
    runtime = rt.store.runtime(vpg.name)
    if not runtime.initial_sync_done:
        raise Refused(f"VPG {vpg.name}: initial sync has not completed; run 'vmrep sync {vpg.name}' first")
    if runtime.paused:
        raise Refused(f"VPG {vpg.name}: replication is paused")


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


def run_cycle(rt: Runtime, vpg: VPG, *, tag: str | None = None, runner: Any = None) -> CycleResult:
    """One replication cycle: leftovers removed, consistency point, every VM's changed
    blocks (VMs in parallel), one checkpoint, snapshots removed (also when the cycle
    failed), retention."""
    runner = runner or direct_runner()
    config, name = str(rt.config.source), vpg.name
    t0 = time.monotonic()
    vms = runner.one("read-vpg-inventory", config, name)
    runner.one("release-consistency-points", config, name)  # leftovers of a crashed cycle
    previous = latest_checkpoint_id(rt, name)
    cycle = new_cycle()
    committed: dict[str, Any] | None = None
    failure: BaseException | None = None
    try:
        at = runner.one("consistency-point", config, name, vms)
        rows = runner.each("transfer-vm", [(config, name, vm, previous, cycle) for vm in vms.values()])
        committed = runner.one("commit-checkpoint", config, name, cycle, at, tag,
                               {"kind": "cycle", "previous": previous})
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if committed is None:
            discard_writer(rt, name, cycle)
        _cleanup_runner(runner, failure).one("release-consistency-points", config, name)
    runner.one("apply-retention", config, name)
    return CycleResult(name, committed["id"], committed["time"], _transfers(rows), time.monotonic() - t0, tag)


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
            rows = runner.each("transfer-disk", [
                (config, name, vm, disk, None, vpg.vm(vm_name).preseed.get(disk.id), cycle)
                for vm_name, vm in vms.items() for disk in vm.disks])
            cp = runner.one("commit-checkpoint", config, name, cycle, utcnow(), "initial sync",
                            {"kind": "initial_sync"})
        except BaseException as exc:
            discard_writer(rt, name, cycle)
            store.set_status(name, Status.INITIALIZING, Substatus.INITIAL_SYNC, detail=f"initial sync failed: {exc}")
            raise
        store.update_runtime(name, initial_sync_done=True)
        store.set_status(name, Status.MEETING_SLA, Substatus.DELTA_SYNC)
        store.finish_operation(op, "succeeded")
    transfers = _transfers([{"vm": r["vm"], "disks": {r["disk"]: r}} for r in rows])
    return CycleResult(name, cp["id"], cp["time"], transfers, time.monotonic() - t0, "initial sync")


def disk_bytes(vms: dict[str, VMInfo]) -> int:
    return sum(d.capacity for vm in vms.values() for d in vm.disks)
