"""The monitor against the lab: RPO alerts over time, VMs that stop being protectable,
constant round trips, and transitions read back as Prefect events."""

from __future__ import annotations

import time
from datetime import timedelta

from pyVmomi import vim

from vmrep.monitor import monitor_pass
from vmrep.replication import engine
from vmrep.vsphere.connection import connect
from vmrep.vsphere.inventory import Inventory
from vmrep.vsphere.property import retrieve_one
from vmrep.vsphere.task import run_task


def sync(rt, name: str) -> None:  # type: ignore[no-untyped-def]
    engine.initial_sync(rt, rt.config.vpg(name))
    rt.store.update_runtime(name, initial_sync_done=True)


def by_vpg(results):  # type: ignore[no-untyped-def]
    return {r.vpg: r for r in results}


def test_rpo_alerts_raise_and_clear_at_the_right_samples(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    sync(rt, "erp")
    cp = rt.journal.checkpoints("erp")[-1].time
    seen = []
    for seconds in (30, 90, 150, 30):  # target 60 s: ok, over, over 2x, and after a new checkpoint
        if seen and seconds == 30:
            cp = engine.run_cycle(rt, rt.config.vpg("erp")).time
        r = by_vpg(monitor_pass(rt, now=cp + timedelta(seconds=seconds), vpgs=["erp"]))["erp"]
        seen.append((r.evaluation.status, sorted(r.evaluation.codes),
                     sorted((t.kind, t.code) for t in r.transitions if t.code)))
    assert seen == [
        ("MeetingSLA", [], []),
        ("RpoNotMeetingSLA", ["RPO_OVER_TARGET"], [("raised", "RPO_OVER_TARGET")]),
        ("RpoNotMeetingSLA", ["RPO_OVER_2X_TARGET"],
         [("cleared", "RPO_OVER_TARGET"), ("raised", "RPO_OVER_2X_TARGET")]),
        ("MeetingSLA", [], [("cleared", "RPO_OVER_2X_TARGET")]),
    ]
    samples = rt.store.frame("samples")
    assert len(samples[samples.vpg == "erp"]) == 4


def test_deleted_vm_and_new_multi_writer_disk_are_noticed(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    sync(rt, "erp")
    with connect(rt.config.sites["siteA"]) as c:
        inv = Inventory(c)
        if inv.vm("erp-web").power_state == "poweredOn":
            run_task(c, "VM erp-web", inv.vm("erp-web").ref.PowerOffVM_Task)
        run_task(c, "VM erp-web", inv.vm("erp-web").ref.Destroy_Task)
        app = inv.vm("erp-app")
        devices = retrieve_one(c, app.ref, ["config.hardware.device"]).get("config.hardware.device")
        disk = next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk))
        disk.backing.sharing = "sharingMultiWriter"
        run_task(c, "VM erp-app", app.ref.ReconfigVM_Task,
                 vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)]))
    r = by_vpg(monitor_pass(rt, vpgs=["erp"]))["erp"]
    assert r.evaluation.status == "Error" and r.evaluation.substatus == "NeedsConfiguration"
    texts = sorted(a.text for a in rt.store.open_alerts("erp") if a.code == "VM_NOT_PROTECTED")
    assert texts == ["VPG erp: VM erp-app is no longer protected: it gained a multi-writer disk (Hard disk 1 is a "
                     "multi-writer disk)",
                     "VPG erp: VM erp-web is no longer protected: it was deleted or can no longer be found"]


def test_test_overdue_and_missing_recovery_network(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    sync(rt, "files")
    first = rt.journal.checkpoints("files")[0].time
    later = first + timedelta(days=200)  # files: default test interval of 6 months
    engine_codes = by_vpg(monitor_pass(rt, now=later, vpgs=["files"]))["files"].evaluation.codes
    assert "TEST_OVERDUE" in engine_codes
    cfg = rt.config.vpg("files")
    cfg.recovery.test_network = "no-such-bubble"
    try:
        r = by_vpg(monitor_pass(rt, vpgs=["files"]))["files"]
    finally:
        cfg.recovery.test_network = "dr-test"
    assert "RECOVERY_NETWORK_MISSING" in r.evaluation.codes
    assert any(a.text == "VPG files: recovery network no-such-bubble not found" for a in rt.store.open_alerts("files"))


def test_monitor_pass_reads_each_site_in_one_round_trip(lab) -> None:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    monitor_pass(rt)  # warm: the watch of each site made its full read
    for site in ("siteA", "siteB"):
        lab.control(site).reset_calls()
    monitor_pass(rt)
    # nothing changed (or only guest state): the changes since the last pass, one call
    assert lab.control("siteA").calls() == {"WaitForUpdatesEx": 1}
    assert lab.control("siteB").calls() == {"WaitForUpdatesEx": 1}


def test_monitor_flow_emits_events_read_back_from_prefect(lab, prefect_harness) -> None:  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    from flows.monitor import monitor
    from test_health_events import read_events

    rt = lab.runtime()
    start = datetime.now(timezone.utc)
    rt.store.update_runtime("files", paused=True, initial_sync_done=True)
    try:
        out = {r["vpg"]: r for r in monitor(str(lab.config_path), ["files"])}
    finally:
        rt.store.update_runtime("files", paused=False)
    assert "REPLICATION_PAUSED" in out["files"]["alerts"]
    events = read_events("vmrep.vpg.files", start, want=2)
    names = [(e.event, e.payload.get("code") or e.payload.get("status")) for e in events]
    assert ("vmrep.alert.raised", "REPLICATION_PAUSED") in names
    assert any(n == "vmrep.vpg.status-changed" for n, _ in names)


def test_facts_reused_between_passes_give_the_verdicts_of_a_full_gathering(fresh_lab, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pass reuses a VPG's journal facts and protectability (vmrep.monitor.Gathered)
    while their inputs are unchanged. Over a scenario where time passes thresholds, a
    checkpoint is added and a VM stops being protectable, each pass is compared with the
    same pass gathering everything again: the same evaluations, and nothing left for the
    full one to change."""
    from vmrep.monitor import site_watches

    monkeypatch.setattr("vmrep.monitor.RACY_NS", 200_000_000)  # the test need not wait 2 s per step
    rt = fresh_lab.runtime()
    sync(rt, "erp")
    watches = site_watches(rt)
    seen = []

    def compare(now):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # past the racy window of what the previous step wrote
        reused = watches.reused
        inc = by_vpg(monitor_pass(rt, now=now))
        assert watches.reused > reused  # something was reused, else this compares nothing
        watches.gathered.clear()
        full = by_vpg(monitor_pass(rt, now=now))
        assert {v: r.evaluation for v, r in inc.items()} == {v: r.evaluation for v, r in full.items()}
        assert not any(r.transitions for r in full.values())
        seen.append((inc["erp"].evaluation.status, sorted(inc["erp"].evaluation.codes)))

    cp = rt.journal.checkpoints("erp")[-1].time
    monitor_pass(rt, now=cp + timedelta(seconds=10))  # gathered once
    compare(cp + timedelta(seconds=30))
    compare(cp + timedelta(seconds=90))  # only time changed: over the 60 s target
    cp = engine.run_cycle(rt, rt.config.vpg("erp")).time  # a new checkpoint
    compare(cp + timedelta(seconds=20))
    with connect(rt.config.sites["siteA"]) as c:  # a VM gains a multi-writer disk
        app = Inventory(c).vm("erp-app")
        devices = retrieve_one(c, app.ref, ["config.hardware.device"]).get("config.hardware.device")
        disk = next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk))
        disk.backing.sharing = "sharingMultiWriter"
        run_task(c, "VM erp-app", app.ref.ReconfigVM_Task,
                 vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)]))
    time.sleep(1)  # the change reaches the collector's queue
    compare(cp + timedelta(seconds=25))
    compare(cp + timedelta(days=200))  # RPO, history and the DR test all overdue
    assert seen == [
        ("MeetingSLA", []),
        ("RpoNotMeetingSLA", ["RPO_OVER_TARGET"]),
        ("MeetingSLA", []),
        ("Error", ["VM_NOT_PROTECTED"]),
        ("Error", ["RPO_OVER_2X_TARGET", "TEST_OVERDUE", "VM_NOT_PROTECTED"]),
    ]
