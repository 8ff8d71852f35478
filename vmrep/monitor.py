"""One monitor pass: for every VPG, what vSphere, the journal and the state say, judged
by `vmrep.health` into a status and the alerts that should be open; transitions are
recorded (and emitted as Prefect events by the flow), one sample per VPG is stored.

vSphere is read with one PropertyCollector round trip per site, whatever the number
of VMs: the VMs with their devices and the networks come back together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from vmrep.config import VPG
from vmrep.errors import VmrepError
from vmrep.health import Evaluation, Transition, UnprotectedVM, apply_transitions, evaluate, gather_facts
from vmrep.protection import exclusions
from vmrep.recovery.operations import live_facts
from vmrep.runtime import Runtime
from vmrep.vsphere.inventory import Inventory

def ransomware_suspicions(journal: object, vpg: str, cps: list) -> list:
    """The VPG's open ENCRYPTION_SUSPECTED facts, from the checkpoints already read."""
    from vmrep.ransomware.service import assess_vpg, suspicions

    return suspicions(assess_vpg(journal, vpg, cps))


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


def monitor_pass(rt: Runtime, now: datetime | None = None, vpgs: list[str] | None = None) -> list[VpgHealth]:
    now = now or datetime.now(timezone.utc)
    chosen = [rt.config.vpg(n) for n in vpgs] if vpgs else rt.config.vpgs
    inventories: dict[str, Inventory | None] = {}
    errors: dict[str, str] = {}

    def inventory(site: str) -> Inventory | None:
        if site not in inventories:
            try:
                inv = rt.inventory(site)
                inv.vms()  # the one round trip: VMs, devices, networks
                inventories[site] = inv
            except VmrepError as exc:
                inventories[site] = None
                errors[site] = str(exc)
        return inventories[site]

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
        facts["encryption_suspected"] = ransomware_suspicions(rt.journal, vpg.name, cps)
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
