"""One monitor pass: for every VPG, what vSphere, the journal and the state say, judged
by `vmrep.health` into a status and the alerts that should be open; transitions are
recorded (and emitted as Prefect events by the flow), one sample per VPG is stored.

vSphere is read through a watch per site (`vmrep.vsphere.watch.InventoryWatch`), kept on
the runtime between passes: the first pass reads the whole inventory, each later one takes
only what changed (`WaitForUpdatesEx`: one round trip per site when nothing did), and only
changed VMs are decoded again. A fault drops the watch; the next read is full again.

The store's part of the pass (runtime rows, status, alerts, samples) is one transaction
(`StateStore.batch`), not five per VPG.

What is costly to gather per VPG is gathered again only when its inputs changed
(`Gathered`): the journal's facts (checkpoint times, bytes stored, encryption
suspicions) while neither the VPG's journal directories nor the block index changed,
and which of its VMs cannot be protected while none of its VMs was decoded again (the
watch keeps the same decoded VM until it changes) and their tags are the same. The
judgement itself (`evaluate`, `apply_transitions`) runs for every VPG on every pass at
the pass's time: it is pure and cheap, so a verdict that changes with time alone (RPO
growing past its target, history, a test falling due) is never late.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from vmrep.config import VPG
from vmrep.errors import VmrepError
from vmrep.health import Evaluation, Transition, UnprotectedVM, apply_transitions, evaluate, gather_facts
from vmrep.protection import exclusions
from vmrep.recovery.operations import live_facts
from vmrep.runtime import Runtime
from vmrep.splitbrain import judge as split_brain
from vmrep.vsphere.connection import unreachable
from vmrep.vsphere.inventory import Inventory
from vmrep.vsphere.watch import InventoryWatch

def ransomware_suspicions(journal: object, vpg: str, cps: list) -> list:
    """The VPG's open ENCRYPTION_SUSPECTED facts, from the checkpoints already read."""
    from vmrep.ransomware.service import assess_vpg, suspicions

    return suspicions(assess_vpg(journal, vpg, cps))


@dataclass
class VpgHealth:
    vpg: str
    evaluation: Evaluation
    transitions: list[Transition] = field(default_factory=list)


def unprotected(vpg: VPG, inv: Inventory, rt: Runtime, tags: dict[str, set[str]] | None = None,
                vms: dict[str, Any] | None = None) -> list[UnprotectedVM]:
    """The VPG's VMs that cannot be protected now. `tags` (VM moid -> tag names): read
    by the caller for many VPGs at once, else read here for this VPG's VMs. `vms`: the
    site's VMs by name, made once per pass by the caller (not once per VPG: at 5,000 VMs
    that dictionary per VPG was most of the pass)."""
    from vmrep.validate import vm_tags

    if vms is None:
        vms = inv.vms_by_name()
    if tags is None:
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


# A directory changed less than this before it was looked at may change again within the
# same timestamp tick unseen (file system times are coarse): its VPG is gathered again on
# the next pass rather than trusted (as git treats a "racily clean" index entry).
RACY_NS = 2_000_000_000
JOURNAL_SUBDIRS = ("", "checkpoints", "base", "start", "tags", "ransomware")


@dataclass
class Gathered:
    """What a VPG's facts were gathered from last pass, and those facts. `journal_key`:
    the modification times of the VPG's journal directories (every checkpoint, tag,
    start marker, dismissal or incident is published into one of them by a rename)
    and the block index's generation (bytes stored), None when too recent to trust.
    `vms_key`: per VM of the VPG, the decoded VM (compared by identity: the watch
    decodes a VM again only when it changed) and its tags."""

    journal_key: tuple[int, ...] | None = None
    journal: dict[str, Any] = field(default_factory=dict)
    vms_key: tuple[Any, ...] | None = None
    unprotected: list[UnprotectedVM] = field(default_factory=list)


def journal_key(rt: Runtime, vpg: str, generation: int) -> tuple[int, ...] | None:
    d = str(rt.journal.chains.vpg_dir(vpg))  # a string: six pathlib joins per VPG cost more than the stats
    key = [generation]
    for sub in JOURNAL_SUBDIRS:
        try:
            key.append(os.stat(os.path.join(d, sub)).st_mtime_ns)
        except FileNotFoundError:
            key.append(-1)
    if time.time_ns() - max(key[1:]) < RACY_NS:
        return None
    return tuple(key)


class SiteWatches:
    """One InventoryWatch per site of a runtime, kept between passes. A watch is made
    again when the runtime's client for the site changed (closed and reconnected).
    `gathered`: per VPG, the facts of the last pass and what they came from."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.watches: dict[str, InventoryWatch] = {}
        self.lock = threading.Lock()  # two passes at once (threads) must not share a poll
        self.gathered: dict[str, Gathered] = {}
        self.reused = 0  # VPG facts taken from `gathered` (journal and VMs counted apart)

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
        self.gathered.clear()


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
            gone = unreachable(rt.config.site(site))  # bounded by the connect timeout
            if gone is not None:
                inventories[site], errors[site] = None, gone
                return None
            try:
                inventories[site] = watches.inventory(site)  # changes only, after the first pass
            except VmrepError as exc:
                inventories[site] = None
                errors[site] = str(exc)
        return inventories[site]

    tags: dict[str, dict[str, set[str]]] = {}
    for vpg in chosen:  # vSphere first: no site read while the store's write lock is held
        inventory(vpg.protected_site), inventory(vpg.recovery_site)
    for site in {v.protected_site for v in chosen}:
        inv = inventories.get(site)
        if inv is not None:  # the tags of every protected VM of the site: one request, not one per VPG
            tags[site] = _site_tags(rt, inv, [v for v in chosen if v.protected_site == site])
    with rt.store.batch():
        view = PassView(rt.store, [v.name for v in chosen])
        return _judge(rt, view, now, chosen, inventory, errors, tags, watches)


def _site_tags(rt: Runtime, inv: Inventory, vpgs: list[VPG]) -> dict[str, set[str]]:
    from vmrep.validate import vm_tags

    vms = inv.vms_by_name()
    return vm_tags(inv, [vms[s.name] for v in vpgs for s in v.vms if s.name in vms], rt.config)


class PassView:
    """The store as one pass sees it: runtime rows, test results, open alerts and
    operations read once for all VPGs (four queries, not ~20 per VPG), writes passed
    through to the store. Made inside the pass's transaction (`StateStore.batch`): on
    SQLite that holds the write lock, so no other process changes these rows under the
    pass. `set_status` to the status a VPG has already is answered from the rows read
    (no statement: what it would have done). A VPG's cached alerts are dropped when an
    alert of it is raised or cleared through the view, so a later step reads them again."""

    def __init__(self, store: Any, vpgs: list[str]) -> None:
        self._store = store
        runtimes = {r.vpg: r for r in store.runtimes()}
        for v in vpgs:
            if v not in runtimes:
                runtimes[v] = store.runtime(v)  # created (Initializing) on first use
        self._runtimes = runtimes
        self._tests: dict[str, list[Any]] = {}
        for t in store.test_results():  # newest first, kept in that order per VPG
            self._tests.setdefault(t.vpg, []).append(t)
        self._alerts: dict[str, list[Any]] = {v: [] for v in vpgs}
        for a in store.open_alerts():
            self._alerts.setdefault(a.vpg, []).append(a)
        self._ops: list[Any] = store.operations()  # human-started operations: a short table

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def runtime(self, vpg: str) -> Any:
        r = self._runtimes.get(vpg)
        return r if r is not None else self._store.runtime(vpg)

    def test_results(self, vpg: str | None = None) -> list[Any]:
        if vpg is None:
            return self._store.test_results()  # type: ignore[no-any-return]
        return list(self._tests.get(vpg, []))

    def open_alerts(self, vpg: str | None = None) -> list[Any]:
        if vpg is None or vpg not in self._alerts:
            return self._store.open_alerts(vpg)  # type: ignore[no-any-return]
        return list(self._alerts[vpg])

    def operations(self, vpg: str | None = None, kind: str | None = None, result: str | None = None
                   ) -> list[Any]:
        return [o for o in self._ops if (vpg is None or o.vpg == vpg) and (kind is None or o.kind == kind)
                and (result is None or o.result == result)]

    def set_status(self, vpg: str, status: str, substatus: str | None = None, detail: str | None = None, *,
                   at: datetime | None = None) -> tuple[str, str | None] | None:
        r = self._runtimes.get(vpg)
        if r is not None and (r.status, r.substatus) == (status, substatus):
            return None
        before = self._store.set_status(vpg, status, substatus, detail, at=at)
        if r is not None:
            r.status, r.substatus = status, substatus
        return before  # type: ignore[no-any-return]

    def raise_alert(self, vpg: str, *args: Any, **kwargs: Any) -> Any:
        self._alerts.pop(vpg, None)
        return self._store.raise_alert(vpg, *args, **kwargs)

    def clear_alert(self, alert_id: int, **kwargs: Any) -> bool:
        for v, rows in list(self._alerts.items()):
            if any(a.id == alert_id for a in rows):
                self._alerts.pop(v, None)
        return self._store.clear_alert(alert_id, **kwargs)  # type: ignore[no-any-return]


def _journal_facts(rt: Runtime, vpg: str) -> dict[str, Any]:
    cps = rt.journal.checkpoints(vpg)
    return dict(newest_checkpoint_at=cps[-1].time if cps else None,
                oldest_checkpoint_at=cps[0].time if cps else None,
                journal_bytes=rt.journal.usage(vpg).total_bytes,
                encryption_suspected=ransomware_suspicions(rt.journal, vpg, cps))


def _judge(rt: Runtime, store: Any, now: datetime, chosen: list[VPG],
           inventory: Callable[[str], Inventory | None], errors: dict[str, str],
           tags: dict[str, dict[str, set[str]]], watches: SiteWatches | None = None) -> list[VpgHealth]:
    """Per VPG: the facts, the evaluation, the transitions and the sample. `store` is the
    pass's view of the store (PassView). `watches.gathered`: facts reused where their
    inputs did not change (none without `watches`)."""
    out = []
    samples: list[tuple[str, dict[str, Any]]] = []
    gathered = watches.gathered if watches is not None else {}
    rt.journal.store.refresh()  # the block index's generation, once for the pass
    generation = rt.journal.store.generation
    by_name: dict[str, dict[str, Any]] = {}
    names: dict[str, set[str]] = {}
    marker = repr(rt.config.domain_controller_marker)
    for vpg in chosen:
        prot, rec = inventory(vpg.protected_site), inventory(vpg.recovery_site)
        g = gathered.get(vpg.name) if watches is not None else None
        if g is None:
            g = Gathered()
        jkey = journal_key(rt, vpg.name, generation)
        if jkey is None or jkey != g.journal_key:
            g.journal, g.journal_key = _journal_facts(rt, vpg.name), jkey
        elif watches is not None:
            watches.reused += 1
        facts = dict(g.journal, **live_facts(store, vpg.name))  # + awaiting commit since, failover or move, committed
        if prot is None:
            facts["error"] = f"protected site unreachable: {errors[vpg.protected_site]}"
        else:
            site = vpg.protected_site
            vms = by_name.get(site)
            if vms is None:
                vms = by_name[site] = prot.vms_by_name()
            site_tags = tags.get(site)
            vkey = None
            if site_tags is not None:  # else unprotected() reads the tags itself: nothing to compare
                vkey = (marker, tuple((s.name, v, frozenset(site_tags.get(v.ref._moId, ())) if v else frozenset())
                                      for s in vpg.vms for v in (vms.get(s.name),)))
            if vkey is None or g.vms_key is None or not _same(vkey, g.vms_key):
                g.unprotected, g.vms_key = unprotected(vpg, prot, rt, site_tags, vms), vkey
            elif watches is not None:
                watches.reused += 1
            facts["unprotected_vms"] = list(g.unprotected)
        if watches is not None:
            gathered[vpg.name] = g
        if rec is not None:
            rnames = names.get(vpg.recovery_site)
            if rnames is None:
                rnames = names[vpg.recovery_site] = rec.network_names()
            facts["recovery_networks_missing"] = missing_networks(vpg, rnames)
        if prot is not None and rec is not None:
            facts["split_brain"] = split_brain(rt.store, vpg, prot.vms(), rec.vms(), facts)
        elif prot is not None:
            facts["error"] = f"recovery site unreachable: {errors[vpg.recovery_site]}"
        ev = evaluate(vpg, gather_facts(store, vpg.name, now, **facts))
        transitions = apply_transitions(store, vpg.name, ev, now)
        samples.append((vpg.name, ev.sample()))
        out.append(VpgHealth(vpg.name, ev, transitions))
    store.add_samples(samples, at=now)  # one INSERT for the pass
    return out


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Keys of `Gathered.vms_key`: the decoded VMs by identity (an equal VM decoded again
    counts as changed: safe, and comparing every field would cost what it saves), names
    and tags by value."""
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a[1], b[1], strict=True))
