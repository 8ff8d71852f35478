"""Replication snapshots a dead cycle left on the source VMs, removed by the monitor pass.

A replication cycle whose process died (SIGKILL, a lost host) leaves its consistency
points (`vmrep-cp-<vpg>`) on the protected site's VMs; a snapshot left there grows with
every guest write. The next cycle removes them first thing, but a VPG whose replication
stopped may have no next cycle for a long time, so each monitor pass removes them too.

Deciding that a snapshot is a leftover, safely: a cycle holds the VPG's journal writer
lock (`Journal.writer_idle`) from before its first snapshot until its last one is gone
(`engine.run_cycle`, `engine.initial_sync`). The pass takes that lock without waiting;
when it is free no cycle of the VPG runs, so every replication snapshot of the VPG is a
leftover: removed, then the lock released. When it is held, a cycle is alive (or
retention runs) and nothing is touched. A cycle starting while the pass holds the lock
fails with "journal is locked by another writer" before it takes any snapshot, and the
next cycle runs as usual; the pass takes the lock only when it saw a leftover.

With a journal service the protected site's writer holds the same lock file through its
session at the service (`vmrep.journal.service`), so the pass, run where the journal is
(the recovery site), sees it too. The pass acts only while the protected site answers
(the monitor's inventory of it was read): an unreachable site is left for a later pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from vmrep.config import VPG
from vmrep.errors import VmrepError
from vmrep.replication.points import remove_consistency_points, snapshot_label
from vmrep.runtime import Runtime
from vmrep.vsphere.inventory import Inventory, VMInfo

log = logging.getLogger(__name__)


def remove_leftovers(rt: Runtime, vpgs: list[VPG], inventories: Mapping[str, Inventory | None]
                     ) -> list[dict[str, Any]]:
    """The monitor pass's call: for each VPG whose protected site's inventory was read
    (None: unreachable, left for a later pass), `remove_leftover_snapshots`. One
    name index per site, not one per VPG (the pass is timed at thousands of VMs)."""
    by_site: dict[str, dict[str, VMInfo]] = {}
    out = []
    for vpg in vpgs:
        inv = inventories.get(vpg.protected_site)
        if inv is None:
            continue
        if vpg.protected_site not in by_site:
            by_site[vpg.protected_site] = inv.vms_by_name()
        r = remove_leftover_snapshots(rt, vpg, by_site[vpg.protected_site])
        if r is not None:
            out.append(r)
    return out


def with_snapshots(vpg: VPG, vms: Mapping[str, VMInfo]) -> list[str]:
    """The VPG's VMs that carry a replication snapshot of the VPG (`vms`: the protected
    site's VMs by name)."""
    label = snapshot_label(vpg.name)
    return [s.name for s in vpg.vms if s.name in vms and any(n == label for n, _ in vms[s.name].snapshots)]


def remove_leftover_snapshots(rt: Runtime, vpg: VPG, vms_by_name: Mapping[str, VMInfo]) -> dict[str, Any] | None:
    """Remove the VPG's replication snapshots when no cycle of it runs. `vms_by_name`:
    the protected site's VMs as the monitor pass read them (it found the site reachable).
    None when there was nothing to do; else {vpg, vms, removed} or {vpg, vms, skipped},
    or {vpg, vms, error}: never raises (the next pass tries again)."""
    vms = with_snapshots(vpg, vms_by_name)
    if not vms:
        return None
    idle = getattr(rt.journal, "writer_idle", None)
    if idle is None:  # a journal reached through its service: the pass belongs where it is
        return {"vpg": vpg.name, "vms": vms, "skipped": "the journal is not local"}
    try:
        with idle(vpg.name) as free:
            if not free:
                return {"vpg": vpg.name, "vms": vms, "skipped": "a cycle holds the journal's writer lock"}
            removed = remove_consistency_points(rt, vpg)
    except VmrepError as exc:
        log.error("VPG %s: replication snapshots a dead cycle left were not removed: %s", vpg.name, exc)
        return {"vpg": vpg.name, "vms": vms, "error": str(exc)}
    log.warning("VPG %s: removed %d replication snapshot(s) a dead cycle left (VM %s)", vpg.name, removed,
                ", ".join(vms))
    return {"vpg": vpg.name, "vms": vms, "removed": removed}
