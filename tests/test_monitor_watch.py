"""The monitor's inventory watch (vmrep.vsphere.watch) against the lab, and the pass's
single store transaction.

The watch must hold what a full read holds, after VMs were powered off, reconfigured,
cloned and destroyed, while taking only the changes (one WaitForUpdatesEx when nothing
changed); after the session is lost it reads in full again; a change to part of a
property (as vCenter sends for one device of `config.hardware.device`) makes it read
that object again rather than guess.
"""

from __future__ import annotations

import time

from pyVmomi import vim, vmodl
from sqlalchemy import event

from vmrep.monitor import monitor_pass
from vmrep.state.store import StateStore
from vmrep.vsphere.connection import connect
from vmrep.vsphere.inventory import Inventory
from vmrep.vsphere.task import run_task
from vmrep.vsphere.watch import Changes, InventoryWatch

PC = vmodl.query.PropertyCollector


def facts(inv: Inventory) -> dict[str, tuple]:  # type: ignore[type-arg]
    """What the monitor reads of each VM, comparable between two inventories."""
    return {v.name: (v.ref._moId, v.power_state, v.notes, v.tools, v.ip, v.heartbeat, v.has_snapshot,
                     tuple((d.id, d.capacity, d.file, d.multi_writer) for d in v.disks),
                     tuple((n.label, n.network, n.mac) for n in v.nics), tuple(sorted(v.custom.items())))
            for v in inv.vms()}


def settle(w: InventoryWatch) -> None:
    """Let the guest simulation's changes after power-ons arrive, so a poll sees nothing."""
    for _ in range(20):
        time.sleep(0.5)
        w.refresh()
        if not w.last:
            return
    raise AssertionError(f"inventory keeps changing: {w.last}")


def test_watch_takes_only_changes_and_matches_a_full_read(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    ctl = fresh_lab.control("siteA")
    with connect(fresh_lab.config.sites["siteA"]) as c:
        w = InventoryWatch(c)
        first = w.refresh()
        assert w.last.full and facts(first) == facts(Inventory(c))
        settle(w)
        ctl.reset_calls()
        same = w.refresh()
        assert not w.last and ctl.calls() == {"WaitForUpdatesEx": 1}  # nothing changed: one call
        assert facts(same) == facts(first)

        inv = Inventory(c)
        web, app, db = inv.vm("erp-web"), inv.vm("erp-app"), inv.vm("erp-db")
        if web.power_state == "poweredOn":
            run_task(c, "erp-web", web.ref.PowerOffVM_Task)
        run_task(c, "erp-app", app.ref.ReconfigVM_Task, vim.vm.ConfigSpec(annotation="changed by the test"))
        # a new VM (CreateVM: 0.24.2's CloneVM_Task rewrites the source's disk paths in
        # place, without an update, which vCenter never does)
        spec = vim.vm.ConfigSpec(name="erp-db-clone", guestId="otherGuest64", numCPUs=1, memoryMB=64,
                                 files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"))
        run_task(c, "erp-db-clone", db.folder.CreateVM_Task, spec, db.resource_pool)
        time.sleep(1)  # changes reach a collector's queue a moment after the task ends

        ctl.reset_calls()
        now = w.refresh()
        assert not w.last.full and ctl.calls().get("RetrievePropertiesEx", 0) == 0
        assert web.ref._moId in w.last.changed and app.ref._moId in w.last.changed
        assert "erp-db-clone" in now.vms_by_name() and now.vm("erp-db-clone").ref._moId in w.last.entered
        assert now.vm("erp-app").notes == "changed by the test"
        full = facts(Inventory(c))
        assert facts(now) == full
        # VMs that did not change were not decoded again: the same objects as before
        assert now.vms_by_name()["erp-db"] is first.vms_by_name()["erp-db"]

        run_task(c, "erp-db-clone", now.vm("erp-db-clone").ref.Destroy_Task)
        time.sleep(1)
        now = w.refresh()
        assert "erp-db-clone" not in now.vms_by_name() and facts(now) == facts(Inventory(c))
        assert w.last.full or now.vm("erp-db").ref._moId not in w.last.changed

        # The session lost (as a vCenter restart or timeout): the collector is gone with
        # it; the watch starts over with a full read and is right again.
        ctl.drop_sessions()
        again = w.refresh()
        assert w.last.full and facts(again) == facts(Inventory(c))
        w.close()


def test_a_change_to_part_of_a_property_reads_the_object_again(lab) -> None:  # type: ignore[no-untyped-def]
    with connect(lab.config.sites["siteA"]) as c:
        w = InventoryWatch(c)
        w.refresh()
        vm = Inventory(c).vm("erp-app")
        disk = next(d for d in w.watch.objects[vm.ref._moId].props["config.hardware.device"]
                    if isinstance(d, vim.vm.device.VirtualDisk))
        # what vCenter may send for one device: its path inside the array, not the array
        update = PC.UpdateSet(version="x", filterSet=[PC.FilterUpdate(objectSet=[PC.ObjectUpdate(
            kind="modify", obj=vm.ref, changeSet=[PC.Change(name=f"config.hardware.device[{disk.key}].backing",
                                                            op="assign", val=None)])])])
        w.watch.objects[vm.ref._moId].props.pop("config.hardware.device")
        ch, reread = Changes(), set()  # type: ignore[var-annotated]
        w.watch._apply(update, ch, reread)
        assert reread == {vm.ref._moId} and ch.modified == {vm.ref._moId}
        lab.control("siteA").reset_calls()
        w.watch._reread(reread)
        assert lab.control("siteA").calls() == {"RetrievePropertiesEx": 1}
        assert w.watch.objects[vm.ref._moId].props["config.hardware.device"]  # read again, whole
        w.close()


def test_the_store_part_of_a_pass_is_one_write_transaction(lab) -> None:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    monitor_pass(rt)
    begins: list[bool] = []  # per transaction begun: read-only?

    def on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        begins.append(bool(conn.get_execution_options().get("vmrep_readonly", False)))

    before = len(rt.store.frame("samples"))
    rt.store.update_runtime("files", paused=True)  # the pass then writes a status change and an alert
    event.listen(rt.store.engine, "begin", on_begin)
    try:
        results = {r.vpg: r for r in monitor_pass(rt)}
    finally:
        event.remove(rt.store.engine, "begin", on_begin)
        rt.store.update_runtime("files", paused=False)
    assert "raised" in {t.kind for t in results["files"].transitions}
    assert begins == [False]  # reads, status, alert and samples: one write transaction
    assert len(rt.store.frame("samples")) == before + len(rt.config.vpgs)


def test_batch_keeps_each_call_atomic_and_rolls_back_as_a_whole(db_url) -> None:  # type: ignore[no-untyped-def]
    """On SQLite and PostgreSQL (savepoints inside the batch's transaction on both)."""
    import pytest

    with StateStore.open(db_url) as store:
        with store.batch():
            a = store.raise_alert("erp", "RPO_OVER_TARGET", "warning", "one")
            # the same alert again: refused by the unique index, inside its own savepoint
            assert store.raise_alert("erp", "RPO_OVER_TARGET", "warning", "again") is None
            store.add_samples([("erp", dict(rpo_seconds=1.0, rpo_target_seconds=60, history_seconds=None,
                                            history_target_seconds=3600))])
        assert a is not None and [x.text for x in store.open_alerts("erp")] == ["one"]
        assert len(store.frame("samples")) == 1
        with pytest.raises(RuntimeError), store.batch():
            store.set_status("erp", "Paused")
            store.add_samples([("erp", dict(rpo_seconds=2.0, rpo_target_seconds=60, history_seconds=None,
                                            history_target_seconds=3600))])
            raise RuntimeError("the pass failed")
        assert store.runtime("erp").status == "Initializing" and len(store.frame("samples")) == 1


def test_a_truncated_update_is_taken_page_by_page(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    """vCenter pages a large update (`maxObjectUpdates`, `truncated`, a version that
    continues); so does the lab's collector. The watch takes every page and ends with
    exactly what a full read holds, at the start and after changes."""
    import math

    import pytest

    ctl = fresh_lab.control("siteA")
    with connect(fresh_lab.config.sites["siteA"]) as c:
        # The collector itself: at most one object per answer, versions that advance,
        # an old version refused (as vCenter does: the client starts over).
        content = c.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        pc = content.propertyCollector.CreatePropertyCollector()
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[
                PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"], all=False)])
        pc.CreateFilter(spec, True)
        options = PC.WaitOptions(maxWaitSeconds=0, maxObjectUpdates=1)
        names, versions, version = [], [], ""
        while True:
            u = pc.WaitForUpdatesEx(version, options)
            assert u is not None and len(u.filterSet) == 1 and len(u.filterSet[0].objectSet) == 1
            names += [ch.val for ou in u.filterSet[0].objectSet for ch in ou.changeSet if ch.name == "name"]
            versions.append(u.version)
            version = u.version
            if not u.truncated:
                break
        assert sorted(names) == sorted(v.name for v in Inventory(c).vms()) and len(names) >= 4
        assert len(set(versions)) == len(versions) and "" not in versions
        assert pc.WaitForUpdatesEx(version, options) is None  # nothing changed since
        with pytest.raises(vmodl.query.InvalidCollectorVersion):
            pc.WaitForUpdatesEx(versions[0], options)
        pc.Destroy()
        view.DestroyView()

        # The watch, two objects per answer.
        w = InventoryWatch(c, max_object_updates=2)
        ctl.reset_calls()
        first = w.refresh()
        n = len(w.watch.objects)
        assert n >= 4 and ctl.calls()["WaitForUpdatesEx"] == math.ceil(n / 2)
        assert facts(first) == facts(Inventory(c))
        settle(w)

        inv = Inventory(c)
        vms = [v for v in inv.vms() if v.name.startswith(("erp-", "files"))][:5]
        assert len(vms) >= 3
        for v in vms:
            run_task(c, v.name, v.ref.ReconfigVM_Task, vim.vm.ConfigSpec(annotation=f"paged {v.name}"))
        time.sleep(1)
        ctl.reset_calls()
        now = w.refresh()
        assert not w.last.full and {v.ref._moId for v in vms} <= w.last.modified
        assert ctl.calls()["WaitForUpdatesEx"] >= math.ceil(len(vms) / 2)
        assert all(now.vm(v.name).notes == f"paged {v.name}" for v in vms)
        assert facts(now) == facts(Inventory(c))
        w.close()


def test_a_change_costs_the_lab_collector_its_objects_not_the_filter(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    """As vCenter, the lab answers a queued change by reading the changed object's
    properties only (0.24.2 collected the whole filter again for every queued change: at
    5,000 VMs that was minutes per pass). Counted by the launcher (GET /collector)."""
    ctl = fresh_lab.control("siteA")

    def stats() -> dict[str, int]:
        r = ctl.http.get(f"{ctl.url}/collector", timeout=5)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    with connect(fresh_lab.config.sites["siteA"]) as c:
        w = InventoryWatch(c)
        w.refresh()
        settle(w)
        app = Inventory(c).vm("erp-app")
        run_task(c, "erp-app", app.ref.ReconfigVM_Task, vim.vm.ConfigSpec(annotation="one change"))
        time.sleep(1)
        ctl.http.delete(f"{ctl.url}/collector", timeout=5).raise_for_status()
        now = w.refresh()
        assert w.last.modified == {app.ref._moId} and now.vm("erp-app").notes == "one change"
        # one VM read (its task entered the inventory: the view's scope worked out once,
        # without properties), of the filter's objects
        assert stats() == {"objects_read": 1, "scopes": 1} and len(w.watch.objects) > 4
        w.close()
