"""Keeping an inventory current between reads: a PropertyCollector filter that stays in
place, and `WaitForUpdatesEx` to take only what changed since the last version.

`property.py` reads everything each time (RetrievePropertiesEx): at 5,000 VMs that is the
whole inventory on the wire and decoded on every monitor pass. A `Watch` instead owns a
PropertyCollector of its own (so nobody else's filters mix in) with one filter over a
container view of the whole inventory:

- the first `poll()` (version "") returns every object ("enter"): the full read, made once
  at start and again after a fault;
- each later `poll()` returns only the objects entered, modified or left since the last
  version, or nothing (`maxWaitSeconds=0`: a poll, never a wait), in one round trip when
  nothing changed;
- a large update is taken in pieces of `max_object_updates` objects (`truncated` set, the
  next piece asked for at once with the version just received), as vCenter pages it.

Changes are applied property by property. A change to part of a requested property (a
real vCenter may send `config.hardware.device[2000]` for one device of the array) is not
patched in: the object is read again in full with one RetrievePropertiesEx for all such
objects, so the state is never a guess.

Any failure (session lost and renewed: the collector and view belonged to the old session;
`InvalidCollectorVersion`; the site unreachable) drops the collector: the next poll starts
over with a full read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from pyVmomi import vim, vmodl

from vmrep.vsphere.connection import Client
from vmrep.vsphere.inventory import VM_PATHS, Inventory, VMInfo
from vmrep.vsphere.property import Obj, retrieve

log = logging.getLogger("vmrep.vsphere.watch")

PC = vmodl.query.PropertyCollector
MAX_OBJECT_UPDATES = 1000  # per WaitForUpdatesEx answer, as RetrievePropertiesEx's maxObjects


@dataclass
class Changes:
    """What one poll brought: moids entered, modified and left since the previous poll."""

    full: bool = False  # a full read (the first poll, or the first after a fault)
    entered: set[str] = field(default_factory=set)
    modified: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)
    calls: int = 0  # WaitForUpdatesEx round trips (plus re-reads) this poll took
    wait_seconds: float = 0.0  # of the poll's time, waiting for WaitForUpdatesEx answers

    @property
    def changed(self) -> set[str]:
        return self.entered | self.modified

    def __bool__(self) -> bool:
        return bool(self.full or self.entered or self.modified or self.left)


class Watch:
    """The objects of `types` in the whole inventory (plus single `objects`), kept current."""

    def __init__(self, client: Client, types: dict[type, Sequence[str]],
                 objects: Sequence[tuple[Any, type, Sequence[str]]] = (), *,
                 max_object_updates: int = MAX_OBJECT_UPDATES) -> None:
        self.client = client
        self.types = {t: tuple(p) for t, p in types.items()}
        self.single = [(o, t, tuple(p)) for o, t, p in objects]
        self.max_object_updates = max_object_updates
        self.objects: dict[str, Obj] = {}
        self.version: str | None = None  # None: no collector (start, or after a fault)
        self._pc: Any = None
        self._view: Any = None
        self.full_reads = 0
        self._paths_of: dict[type, frozenset[str]] = {}

    # -- paths -------------------------------------------------------------------------

    def _paths(self, ref: Any) -> frozenset[str]:
        """The paths the filter asks of this object: the union over every requested type
        it is an instance of (a DistributedVirtualPortgroup is a Network too)."""
        key = type(ref)
        paths = self._paths_of.get(key)
        if paths is None:
            found = {p for t, ps in self.types.items() if isinstance(ref, t) for p in ps}
            found |= {p for _o, t, ps in self.single if isinstance(ref, t) for p in ps}
            paths = self._paths_of[key] = frozenset(found)
        return paths

    # -- collector ---------------------------------------------------------------------

    def _start(self) -> None:
        what = "inventory watch"
        content = self.client.content
        self._view = self.client.call(what, content.viewManager.CreateContainerView, content.rootFolder,
                                      list(self.types), True, method_name="CreateContainerView")
        self._pc = self.client.call(what, content.propertyCollector.CreatePropertyCollector,
                                    method_name="CreatePropertyCollector")
        traverse = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        obj_specs = [PC.ObjectSpec(obj=self._view, skip=True, selectSet=[traverse])]
        prop_specs = [PC.PropertySpec(type=t, pathSet=list(p), all=False) for t, p in self.types.items()]
        for obj, t, paths in self.single:
            obj_specs.append(PC.ObjectSpec(obj=obj, skip=False))
            if t not in self.types:
                prop_specs.append(PC.PropertySpec(type=t, pathSet=list(paths), all=False))
        # partialUpdates: a "modify" carries only the properties that changed
        self.client.call(what, self._pc.CreateFilter, PC.FilterSpec(objectSet=obj_specs, propSet=prop_specs),
                         True, method_name="CreateFilter")
        self.objects = {}
        self.version = ""

    def close(self) -> None:
        """Destroy the collector (its filter goes with it) and the view; harmless if gone."""
        pc, view, self._pc, self._view, self.version = self._pc, self._view, None, None, None
        for obj, method in ((pc, "DestroyPropertyCollector"), (view, "DestroyView")):
            if obj is None:
                continue
            try:
                fn = obj.Destroy if method == "DestroyPropertyCollector" else obj.DestroyView
                self.client.call("inventory watch", fn, method_name=method, attempts=1)
            except Exception:  # noqa: BLE001 - a leaked collector dies with its session
                pass

    # -- polling -----------------------------------------------------------------------

    def poll(self) -> Changes:
        """Take what changed since the last poll (everything on the first). On a fault the
        collector is dropped and the poll is made once more from scratch (a full read); a
        second failure is raised."""
        try:
            return self._poll()
        except Exception as exc:  # noqa: BLE001 - any fault: start over once with a full read
            log.warning("site %s: inventory watch lost (%s); reading the inventory in full",
                        self.client.site.name, exc)
            self.close()
            return self._poll()

    def _poll(self) -> Changes:
        full = self.version is None
        if full:
            self._start()
            self.full_reads += 1
        ch = Changes(full=full)
        reread: set[str] = set()
        options = PC.WaitOptions(maxWaitSeconds=0, maxObjectUpdates=self.max_object_updates)
        while True:
            t0 = time.perf_counter()
            update = self.client.call("inventory watch", self._pc.WaitForUpdatesEx, self.version, options,
                                      method_name="WaitForUpdatesEx")
            ch.calls += 1
            ch.wait_seconds += time.perf_counter() - t0
            if update is None:  # nothing (more) changed
                break
            self._apply(update, ch, reread)
            self.version = update.version
            if not getattr(update, "truncated", False):
                break
        reread -= ch.left
        if reread:
            self._reread(reread)
            ch.calls += 1
        return ch

    def _apply(self, update: Any, ch: Changes, reread: set[str]) -> None:
        for fs in update.filterSet or []:
            for ou in fs.objectSet or []:
                moid = ou.obj._moId
                if ou.kind == "leave":
                    self.objects.pop(moid, None)
                    ch.left.add(moid)
                    ch.entered.discard(moid)
                    ch.modified.discard(moid)
                    continue
                obj = self.objects.get(moid)
                if ou.kind == "enter" or obj is None:
                    obj = self.objects[moid] = Obj(ref=ou.obj, props={})
                    ch.entered.add(moid)
                    ch.left.discard(moid)
                elif moid not in ch.entered:
                    ch.modified.add(moid)
                wanted = self._paths(ou.obj)
                for pc in ou.changeSet or []:
                    if pc.name in wanted:
                        if pc.op in ("assign", "add") and pc.val is not None:
                            obj.props[pc.name] = pc.val
                        else:  # remove, indirectRemove, or assigned unset
                            obj.props.pop(pc.name, None)
                    else:  # a part of a requested property: read the object again, whole
                        reread.add(moid)
                for missing in ou.missingSet or []:
                    obj.props.pop(missing.path, None)

    def _reread(self, moids: set[str]) -> None:
        by_type: dict[type, list[Any]] = {}
        for moid in moids:
            ref = self.objects[moid].ref
            by_type.setdefault(type(ref), []).append(ref)
        for t, refs in by_type.items():
            for o in retrieve(self.client, t, sorted(self._paths(refs[0])), objects=refs):
                self.objects[o.ref._moId] = o


NETWORK_TYPES: dict[type, Sequence[str]] = {
    vim.Network: ["name"],
    vim.dvs.DistributedVirtualPortgroup: ["name", "key"],
}


class InventoryWatch:
    """An `Inventory` of one site kept current through a `Watch`: what `Inventory.vms()`
    reads, with each VM decoded (devices, custom values, snapshots) only when it changed.
    When a network, port group or custom field name changes, every VM is decoded again
    (their NICs and custom values are named through those)."""

    def __init__(self, client: Client, *, max_object_updates: int = MAX_OBJECT_UPDATES) -> None:
        self.client = client
        cfm = client.content.customFieldsManager
        extra = [(cfm, vim.CustomFieldsManager, ["field"])] if cfm is not None else []
        self.watch = Watch(client, {vim.VirtualMachine: VM_PATHS, **NETWORK_TYPES}, extra,
                           max_object_updates=max_object_updates)
        self._decoded: dict[str, VMInfo] = {}
        self.last: Changes = Changes()

    def close(self) -> None:
        self.watch.close()

    def refresh(self) -> Inventory:
        """One poll, and an Inventory as `Inventory(client)` after `vms()` would hold now."""
        ch = self.last = self.watch.poll()
        inv = Inventory(self.client)
        vms: list[Obj] = []
        naming_changed = ch.full
        for moid, o in self.watch.objects.items():
            if isinstance(o.ref, vim.CustomFieldsManager):
                inv.fields = {f.key: f.name for f in (o.get("field") or [])}
                naming_changed |= moid in ch.changed
            elif isinstance(o.ref, vim.dvs.DistributedVirtualPortgroup):
                inv.portgroups[o.get("key")] = o.name
                inv.networks[moid] = o.name
                naming_changed |= moid in ch.changed or moid in ch.left
            elif isinstance(o.ref, vim.Network):
                inv.networks[moid] = o.name
                naming_changed |= moid in ch.changed or moid in ch.left
            else:
                vms.append(o)
        naming_changed |= bool(ch.left - self._decoded.keys())  # what left and is no VM: a network
        if naming_changed:
            self._decoded = {}
        for moid in ch.left:
            self._decoded.pop(moid, None)
        out = []
        for o in vms:
            moid = o.ref._moId
            info = self._decoded.get(moid)
            if info is None or moid in ch.changed:
                # Inventory._vm decodes one VM with the inventory's network and field names
                info = self._decoded[moid] = inv._vm(o)
            out.append(info)
        inv._vms = out  # the inventory is complete: vms() and network_names() read no more
        return inv
