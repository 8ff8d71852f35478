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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable


from vmrep.config import VPG
from vmrep.errors import NotFound, Refused
from vmrep.replication.blocks import DiskSyncStats, sync_disk
from vmrep.runtime import Runtime
from vmrep.vsphere.datastore import DatastoreAccess
from vmrep.vsphere.inventory import DiskInfo, VMInfo
from vmrep.vsphere.task import run_task

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "vmrep-cp"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    run_task(client, f"VM {vm.name}: consistency point", vm.ref.CreateSnapshot_Task,
             name=label, description="vmrep replication consistency point", memory=False, quiesce=False)
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
                run_task(client, f"VM {name}: remove consistency point", ref.RemoveSnapshot_Task,
                         removeChildren=False)
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


_writers: dict[tuple[int, str], Any] = {}
_writers_lock = threading.Lock()


def open_writer(rt: Runtime, vpg: str) -> Any:
    """The open checkpoint of a VPG in this process (shared by the cycle's transfer steps)."""
    key = (id(rt), vpg)
    with _writers_lock:
        w = _writers.get(key)
        if w is None:
            w = rt.journal.begin(vpg)
            _writers[key] = w
        return w


def close_writer(rt: Runtime, vpg: str, *, commit: bool, at: datetime | None = None,
                 tag: str | None = None, meta: dict[str, Any] | None = None) -> Any:
    key = (id(rt), vpg)
    with _writers_lock:
        w = _writers.pop(key, None)
    if w is None:
        return None
    if not commit:
        w.abort()
        return None
    return w.commit(time=at, tag=tag, meta=meta)


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

    def summary(self) -> dict[str, Any]:
        return {"vpg": self.vpg, "checkpoint": self.checkpoint_id, "time": self.time.isoformat(),
                "bytes_read": self.bytes_read, "bytes_stored": self.bytes_stored,
                "blocks_changed": self.blocks_changed, "seconds": round(self.seconds, 3)}


def ensure_replicable(rt: Runtime, vpg: VPG) -> None:
    runtime = rt.store.runtime(vpg.name)
    if not runtime.initial_sync_done:
        raise Refused(f"VPG {vpg.name}: initial sync has not completed; run 'vmrep sync {vpg.name}' first")
    if runtime.paused:
        raise Refused(f"VPG {vpg.name}: replication is paused")


def run_cycle(rt: Runtime, vpg: VPG, *, tag: str | None = None, threads: int = 2,
              progress: Callable[[int], None] | None = None) -> CycleResult:
    """One replication cycle without Prefect (the CLI's --direct path and the tests)."""
    import time

    t0 = time.monotonic()
    vms = vpg_vms(rt, vpg)
    remove_consistency_points(rt, vpg)  # leftovers of a crashed cycle
    previous = latest_checkpoint_id(rt, vpg.name)
    committed = None
    try:
        at = create_consistency_points(rt, vpg, vms)
        writer = open_writer(rt, vpg.name)
        transfers = {name: transfer_vm(rt, vpg, vm, writer, previous, threads=threads, progress=progress)
                     for name, vm in vms.items()}
        committed = close_writer(rt, vpg.name, commit=True, at=at, tag=tag,
                                 meta={"kind": "cycle", "previous": previous})
    finally:
        if committed is None:
            close_writer(rt, vpg.name, commit=False)
        remove_consistency_points(rt, vpg, vms)
    rt.store.note_checkpoint(vpg.name, committed.time)
    apply_retention(rt, vpg)
    return CycleResult(vpg.name, committed.id, committed.time, transfers, time.monotonic() - t0, tag)


def initial_sync(rt: Runtime, vpg: VPG, *, threads: int = 2, progress: Callable[[int], None] | None = None,
                 preseed: dict[str, dict[str, Any]] | None = None) -> CycleResult:
    """Full copy of every disk into the journal, ending with the first checkpoint.

    Resumable: blocks already in the store (from a run that broke off) are not stored
    again. Callers set the VPG's status around it (Initializing/InitialSync)."""
    import time

    t0 = time.monotonic()
    vms = vpg_vms(rt, vpg)
    writer = open_writer(rt, vpg.name)
    committed = None
    try:
        transfers = {name: transfer_vm(rt, vpg, vm, writer, None, threads=threads, progress=progress,
                                       preseed=(preseed or {}).get(name))
                     for name, vm in vms.items()}
        committed = close_writer(rt, vpg.name, commit=True, at=utcnow(), tag="initial sync",
                                 meta={"kind": "initial_sync"})
    finally:
        if committed is None:
            close_writer(rt, vpg.name, commit=False)
    rt.store.note_checkpoint(vpg.name, committed.time)
    return CycleResult(vpg.name, committed.id, committed.time, transfers, time.monotonic() - t0, "initial sync")


def disk_bytes(vms: dict[str, VMInfo]) -> int:
    return sum(d.capacity for vm in vms.values() for d in vm.disks)
