"""Check a configuration against the live sites, one line per problem.

The file itself has been validated by the models when it was loaded; here every name
in it is looked up at its site (one inventory read per site, whatever the number of
VMs), and every VM is checked for what may not be protected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from vmrep.config import VPG, Config
from vmrep.errors import VmrepError
from vmrep.protection import exclusions
from vmrep.vsphere.connection import Client, connect
from vmrep.vsphere.inventory import Inventory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    vpg: str | None
    subject: str  # "VM web-01", "recovery.datastore", "site siteB"
    reason: str

    def line(self) -> str:
        head = f"VPG {self.vpg}: " if self.vpg else ""
        return f"{head}{self.subject}: {self.reason}"


class Sites:
    """Connections and inventories per site, opened once and shared by the checks."""

    def __init__(self, config: Config, connector: Callable[..., Client] = connect) -> None:
        self.config = config
        self._connector = connector
        self.clients: dict[str, Client] = {}
        self.inventories: dict[str, Inventory] = {}
        self.errors: dict[str, str] = {}

    def inventory(self, site: str) -> Inventory | None:
        if site in self.inventories:
            return self.inventories[site]
        if site in self.errors:
            return None
        try:
            client = self._connector(self.config.site(site))
            self.clients[site] = client
            self.inventories[site] = Inventory(client)
            return self.inventories[site]
        except VmrepError as exc:
            self.errors[site] = str(exc)
            return None

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def _check_recovery_names(vpg: VPG, inv: Inventory) -> list[Problem]:
    problems: list[Problem] = []
    site = inv.client.site.name
    hosts = {h.name for h in inv.hosts()}
    datastores = {d.name for d in inv.datastores()}
    folders = {f.name for f in inv.folders() if "VirtualMachine" in (f.get("childType") or [])}
    clusters = {c.name for c in inv.clusters()}
    pools = {p.name for p in inv.resource_pools()}
    networks = inv.network_names()

    def need(value: str | None, known: set[str], subject: str, kind: str) -> None:
        if value is not None and value not in known:
            problems.append(Problem(vpg.name, subject, f"{kind} {value!r} not found at recovery site {site}"))

    r = vpg.recovery
    need(r.cluster, clusters, "recovery.cluster", "cluster")
    need(r.host, hosts, "recovery.host", "host")
    need(r.datastore, datastores, "recovery.datastore", "datastore")
    need(r.resource_pool, pools, "recovery.resource_pool", "resource pool")
    need(r.folder, folders, "recovery.folder", "VM folder")
    need(r.live_network, networks, "recovery.live_network", "network")
    need(r.test_network, networks, "recovery.test_network", "network")
    if r.live_network and r.test_network and r.live_network == r.test_network:
        problems.append(Problem(vpg.name, "recovery.test_network",
                                "is the production network; a test must run in an isolated network"))
    for vm in vpg.vms:
        subject = f"VM {vm.name}"
        need(vm.recovery_host, hosts, f"{subject} recovery_host", "host")
        need(vm.recovery_datastore, datastores, f"{subject} recovery_datastore", "datastore")
        need(vm.recovery_folder, folders, f"{subject} recovery_folder", "VM folder")
        if not (vm.recovery_datastore or r.datastore):
            problems.append(Problem(vpg.name, subject, "no recovery datastore (set recovery.datastore)"))
        if not (vm.recovery_host or r.host or r.cluster):
            problems.append(Problem(vpg.name, subject, "no recovery host or cluster (set recovery.host or .cluster)"))
        for i, nic in enumerate(vm.nics):
            need(nic.live_network, networks, f"{subject} nics[{i}].live_network", "network")
            need(nic.test_network, networks, f"{subject} nics[{i}].test_network", "network")
            live = nic.live_network or r.live_network
            test = nic.test_network or r.test_network
            if live and test and live == test:
                problems.append(Problem(vpg.name, f"{subject} nics[{i}].test_network",
                                        "is the production network; a test must run in an isolated network"))
    return problems


def vm_tags(inv: Inventory, vms: list, config: Config) -> dict[str, set[str]]:  # type: ignore[type-arg]  # config VMs or VMInfo
    """Tags of the VMs when a tag marks domain controllers; a site without the vAPI
    endpoint (a bare ESXi) has no tags, and the other markers still apply."""
    if not config.domain_controller_marker.tag or not vms:
        return {}
    from vmrep.vsphere.tags import tags_for

    try:
        return tags_for(inv.client).of_vms(vm.ref for vm in vms)
    except Exception as exc:  # noqa: BLE001 - tags are one marker of three
        log.warning("site %s: tags not readable (%s); domain controllers recognised by the other markers only",
                    inv.client.site.name, exc)
        return {}


def check_vpg(vpg: VPG, config: Config, sites: Sites) -> list[Problem]:
    problems: list[Problem] = []
    prot = sites.inventory(vpg.protected_site)
    if prot is None:
        return [Problem(vpg.name, f"site {vpg.protected_site}", sites.errors[vpg.protected_site])]
    found = prot.vms_by_name()
    present = [found[s.name] for s in vpg.vms if s.name in found]
    tags = vm_tags(prot, present, config)
    for spec in vpg.vms:
        vm = found.get(spec.name)
        if vm is None:
            problems.append(Problem(vpg.name, f"VM {spec.name}", f"not found at protected site {vpg.protected_site}"))
            continue
        if not vm.disks:
            problems.append(Problem(vpg.name, f"VM {spec.name}", "has no disks to replicate"))
        for ex in exclusions(vm, config.domain_controller_marker, tags.get(vm.ref._moId, set())):
            problems.append(Problem(vpg.name, f"VM {spec.name}", f"may not be protected: {ex.reason}"))
    rec = sites.inventory(vpg.recovery_site)
    if rec is None:
        problems.append(Problem(vpg.name, f"site {vpg.recovery_site}", sites.errors[vpg.recovery_site]))
    else:
        problems.extend(_check_recovery_names(vpg, rec))
    return problems


def setting_warnings(config: Config, vpg_names: list[str] | None = None) -> list[Problem]:
    """Settings the file accepts that nothing acts on yet: a setting either works or says so.

    Not problems (the exit code stays as it is): the VPG is protected as if it were unset."""
    vpgs = [config.vpg(n) for n in vpg_names] if vpg_names else config.vpgs
    # Blocks are always compressed in the journal; the setting acts only on the WAN link
    # of a VPG written through its recovery site's journal service (docs/journal-service.md).
    def crosses_service(v: VPG) -> bool:
        return v.protected_site != v.recovery_site and config.sites[v.recovery_site].journal_service is not None

    return [Problem(v.name, "wan_compression", "false has no effect yet: blocks are always compressed")
            for v in vpgs if v.wan_compression is False and not crosses_service(v)]


def validate(config: Config, vpg_names: list[str] | None = None,
             connector: Callable[..., Client] = connect) -> list[Problem]:
    vpgs = [config.vpg(n) for n in vpg_names] if vpg_names else config.vpgs
    sites = Sites(config, connector)
    try:
        problems: list[Problem] = []
        for vpg in vpgs:
            problems.extend(check_vpg(vpg, config, sites))
        return problems
    finally:
        sites.close()
