"""One monitor pass: for every VPG, what vSphere, the journal and the state say, judged
by `vmrep.health` into a status and the alerts that should be open; transitions are
recorded (and emitted as Prefect events by the flow), one sample per VPG is stored.

vSphere is read through a watch per site (`vmrep.vsphere.watch.InventoryWatch`), kept on
the runtime between passes: the first pass reads the whole inventory, each later one takes
only what changed (`WaitForUpdatesEx`: one round trip per site when nothing did), and only
changed VMs are decoded again. A fault drops the watch; the next read is full again.

The store's part of the pass (runtime rows, status, alerts, samples) is one transaction
(`StateStore.batch`), not five per VPG.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from vmrep.config import VPG
from vmrep.errors import VmrepError
from vmrep.health import Evaluation, Transition, UnprotectedVM, apply_transitions, evaluate, gather_facts
from vmrep.protection import exclusions
from vmrep.recovery.operations import live_facts
from vmrep.runtime import Runtime
from vmrep.vsphere.inventory import Inventory
from vmrep.vsphere.watch import InventoryWatch

@dataclass
class VpgHealth:
    vpg: str
    evaluation: Evaluation
    transitions: list[Transition] = field(default_factory=list)


def unprotected(vpg: VPG, inv: Inventory, rt: Runtime) -> list[UnprotectedVM]:
    from vmrep.validate import vm_tags

    vms = inv.vms_by_name()
    tags = vm_tags(inv, [vms[s.name] for s in vpg.vms if s.name in vms], rt.config)
    out = []
    for spec in vpg.vms:
        vm = vms.get(spec.name)
        if vm is None:
            out.append(UnprotectedVM(spec.name, "deleted"))
            continue
        for ex in exclusions(vm, rt.config.domain_controller_marker, tags.get(vm.ref._moId, set())):
            out.append(UnprotectedVM(spec.name, ex.code, ex.reason))
    return out


def missing_networks(vpg: VPG, names: set[str]) -> list[str]:
    wanted = {vpg.recovery.live_network, vpg.recovery.test_network}
    for vm in vpg.vms:
        for nic in vm.nics:
            wanted |= {nic.live_network, nic.test_network}
    return sorted(n for n in wanted if n and n not in names)


class SiteWatches:
    """One InventoryWatch per site of a runtime, kept between passes. A watch is made
    again when the runtime's client for the site changed (closed and reconnected)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.watches: dict[str, InventoryWatch] = {}
        self.lock = threading.Lock()  # two passes at once (threads) must not share a poll

    def inventory(self, site: str) -> Inventory:
        client = self.rt.client(site)
        w = self.watches.get(site)
        if w is None or w.client is not client:
            w = self.watches[site] = InventoryWatch(client)
        try:
            return w.refresh()
        except BaseException:
            # the watch tried once more from scratch inside refresh(); next pass: a new one
            self.watches.pop(site, None)
            w.close()
            raise

    def close(self) -> None:
        for w in self.watches.values():
            w.close()
        self.watches.clear()


def site_watches(rt: Runtime) -> SiteWatches:
    """The runtime's watches (made on first use): a runtime lives as long as its process's
    monitor run, so they last from pass to pass."""
    d: dict[str, Any] = rt.__dict__
    with _watches_lock:
        w = d.get("_site_watches")
        if w is None:
            w = d["_site_watches"] = SiteWatches(rt)
        return w


_watches_lock = threading.Lock()


def monitor_pass(rt: Runtime, now: datetime | None = None, vpgs: list[str] | None = None) -> list[VpgHealth]:
    now = now or datetime.now(timezone.utc)
    chosen = [rt.config.vpg(n) for n in vpgs] if vpgs else rt.config.vpgs
    watches = site_watches(rt)
    with watches.lock:
        return _pass(rt, watches, now, chosen)


def _pass(rt: Runtime, watches: SiteWatches, now: datetime, chosen: list[VPG]) -> list[VpgHealth]:
    inventories: dict[str, Inventory | None] = {}
    errors: dict[str, str] = {}

    def inventory(site: str) -> Inventory | None:
        if site not in inventories:
            try:
                inventories[site] = watches.inventory(site)  # changes only, after the first pass
            except VmrepError as exc:
                inventories[site] = None
                errors[site] = str(exc)
        return inventories[site]

    for vpg in chosen:  # vSphere first: no site read while the store's write lock is held
        inventory(vpg.protected_site), inventory(vpg.recovery_site)
    with rt.store.batch():
        return _judge(rt, now, chosen, inventory, errors)


def _judge(rt: Runtime, now: datetime, chosen: list[VPG], inventory: Callable[[str], Inventory | None],
           errors: dict[str, str]) -> list[VpgHealth]:
    out = []
    for vpg in chosen:
        prot, rec = inventory(vpg.protected_site), inventory(vpg.recovery_site)
        cps = rt.journal.checkpoints(vpg.name)
        usage = rt.journal.usage(vpg.name)
        facts = dict(
            newest_checkpoint_at=cps[-1].time if cps else None,
            oldest_checkpoint_at=cps[0].time if cps else None,
            journal_bytes=usage.total_bytes,
            **live_facts(rt.store, vpg.name),  # awaiting commit since, failover or move, committed
        )
        if prot is None:
            facts["error"] = f"protected site unreachable: {errors[vpg.protected_site]}"
        else:
            facts["unprotected_vms"] = unprotected(vpg, prot, rt)
        if rec is not None:
            facts["recovery_networks_missing"] = missing_networks(vpg, rec.network_names())
        elif prot is not None:
            facts["error"] = f"recovery site unreachable: {errors[vpg.recovery_site]}"
        ev = evaluate(vpg, gather_facts(rt.store, vpg.name, now, **facts))
        transitions = apply_transitions(rt.store, vpg.name, ev, now)
        rt.store.add_sample(vpg.name, **ev.sample())
        out.append(VpgHealth(vpg.name, ev, transitions))
    return out
