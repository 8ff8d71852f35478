"""Split brain: a VM running twice, its source at the protected site and its recovered
twin at the recovery site, while the VPG is failed over.

It happens when a failover could not shut the source down (the protected site was gone,
and came back with its VMs as they were) or was told not to (`shutdown_policy: none`).
Two copies of one server on the network, writing two diverging disks, is a hazard to
resolve by hand: the monitor judges it on every pass from the inventories it read, and
`vmrep.health` turns each finding into a `SPLIT_BRAIN` alert, a warning while the
failover awaits commit (the sources may run on purpose until then), an error once
committed.

Kept apart from `vmrep.monitor` (which decides how inventories are read): this is a pure
judgement of two inventories and the state database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmrep.config import VPG
from vmrep.recovery import naming
from vmrep.vsphere.inventory import VMInfo

AWAITING_COMMIT = "awaiting-commit"
COMMITTED = "committed"


@dataclass(frozen=True)
class SplitBrainVM:
    """One source VM powered on while its recovered twin runs."""

    vm: str
    phase: str  # AWAITING_COMMIT | COMMITTED
    source_site: str
    recovery_site: str
    twin: str  # the recovered VM's name

    @property
    def level(self) -> str:
        return "warning" if self.phase == AWAITING_COMMIT else "error"

    def text(self, vpg: str) -> str:
        where = (f"VM {self.vm} runs twice: the source at {self.source_site} is powered on while its recovered "
                 f"twin {self.twin} runs at {self.recovery_site}")
        if self.phase == AWAITING_COMMIT:
            return (f"{where} (failover awaiting commit); power the source off, or commit with "
                    f"'vmrep commit {vpg} --reverse-protection' (removes the source), or roll back")
        return (f"{where} (failover committed); power the source off now, or protect back with "
                f"'vmrep commit {vpg} --reverse-protection' (removes the source)")


def _phase(store: Any, vpg: str, live: dict[str, Any]) -> str | None:
    """AWAITING_COMMIT, COMMITTED (without reverse protection), or None (not failed over)."""
    if live.get("awaiting_commit_since") is not None:
        return AWAITING_COMMIT
    if live.get("committed"):
        from vmrep.recovery.records import committed_since_protection

        done = committed_since_protection(store, vpg)
        params = (done.params or {}) if done is not None else {}
        # Reverse protection removed the sources: anything running there now is not ours.
        if done is not None and not params.get("reverse_protection"):
            later = [o for o in store.operations(vpg)  # newest first
                     if o.kind == "commit" and o.result == "succeeded" and (o.params or {}).get("after_commit")]
            if not later:
                return COMMITTED
    return None


def _recovered_twins(vpg: VPG, rec: list[VMInfo]) -> dict[str, VMInfo]:
    """Source name -> its powered-on recovered twin from a live recovery of `vpg`."""
    out: dict[str, VMInfo] = {}
    for v in rec:
        if (v.extra.get(naming.MARK_VPG) == vpg.name and v.extra.get(naming.MARK_KIND) == naming.KIND_LIVE
                and v.power_state == "poweredOn"):
            out[v.extra.get(naming.MARK_SOURCE) or v.name] = v
    return out


def judge(store: Any, vpg: VPG, protected: list[VMInfo], recovery: list[VMInfo],
          live: dict[str, Any]) -> list[SplitBrainVM]:
    """The VMs of `vpg` in split brain, from the two sites' VMs as the monitor read them
    and `live` (`vmrep.recovery.records.live_facts`)."""
    phase = _phase(store, vpg.name, live)
    if phase is None:
        return []
    twins = _recovered_twins(vpg, recovery)
    # A local VPG recovers to the same site: the recovered namesakes carry the marker.
    sources = {v.name: v for v in protected
               if v.extra.get(naming.MARK_VPG) != vpg.name and v.power_state == "poweredOn"}
    out = []
    for spec in vpg.vms:
        src, twin = sources.get(spec.name), twins.get(spec.name)
        if src is not None and twin is not None:
            out.append(SplitBrainVM(spec.name, phase, vpg.protected_site, vpg.recovery_site, twin.name))
    return out
