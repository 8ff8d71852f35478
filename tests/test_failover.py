"""Live failover against the lab: shutdown policies, production network and re-IP,
awaiting commit, rollback leaving the source exactly as before, commit, commit policy,
and a failing step rolled back by itself."""

from __future__ import annotations

import time

import pytest

from preseed import stored_from_protected_site
from test_recovery import power_on_sources, recovery_site_state, source_state, synced
from vmrep.errors import Refused, VmrepError
from vmrep.recovery import operations as ops
from vmrep.recovery import vms as vmops


@pytest.fixture(scope="module")
def erp(lab):  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    synced(rt, "erp")
    lab.control("siteA").boot_delay(100)
    lab.control("siteB").boot_delay(100)
    return lab


@pytest.fixture(autouse=True)
def _faults_cleared(erp):  # type: ignore[no-untyped-def]
    yield
    for s in ("siteA", "siteB"):
        erp.control(s).clear_faults()
        erp.control(s).never_boot("erp-web", False)


def test_failover_then_rollback_leaves_the_source_exactly_as_before(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cfg = str(erp.config_path)
    power_on_sources(rt, ["erp-db", "erp-app"])
    # 'lab up' leaves every protected VM running: erp-web is powered off here, so that the
    # failover meets one VM it has nothing to shut down.
    client = rt.client("siteA")
    vmops.power_off(client, "erp-web", vmops.source_vm(client, "erp", "erp-web").ref)
    before = source_state(rt)
    checkpoints = [c.id for c in rt.journal.checkpoints("erp")]
    s = ops.run_failover(cfg, "erp", confirm="erp", shutdown="graceful", commit_policy="none", who="carol",
                         verify_timeout=20, shutdown_timeout=10)
    assert s["result"] == "succeeded" and s["kind"] == "failover" and s["started_by"] == "carol"
    assert s["checkpoint_id"] == checkpoints[-1] and s["checkpoint_age_seconds"] > 0 and s["rto_seconds"] > 0
    # recovered on the production network with the live IPs, verified
    assert [s["verification"][vm]["guest"]["ip"] for vm in ("erp-db", "erp-app", "erp-web")] == \
        ["10.20.1.10", "10.20.1.11", "10.20.1.12"]
    assert all(v["ok"] for v in s["verification"].values())
    site_b = {sv.name: sv for sv in vmops.site_vms(rt.client("siteB"))}
    assert {n: site_b[n].power for n in ("erp-db", "erp-app", "erp-web")} == dict.fromkeys(
        ("erp-db", "erp-app", "erp-web"), "poweredOn")
    # the source was shut down by its guests; replication is paused
    shut = {x["vm"]: x for x in (dict(vm=vm, **st) for vm, sts in s["steps"].items() for st in sts)
            if x["step"] == "shutdown-source"}
    assert {vm: shut[vm]["result"] for vm in shut} == {"erp-db": "ok", "erp-app": "ok", "erp-web": "skipped"}
    assert {n: v["power"] for n, v in source_state(rt).items()} == dict.fromkeys(before, "poweredOff")
    row = rt.store.runtime("erp")
    assert (row.status, row.substatus, row.paused) == ("FailingOver", "FailingOverBeforeCommit", True)
    assert [a.code for a in rt.store.open_alerts("erp")] == ["AWAITING_COMMIT"]
    assert ops.live_facts(rt.store, "erp")["awaiting_commit_since"] is not None
    # the monitor sees the same: it keeps the alert open and the status as the failover set it
    from vmrep.monitor import monitor_pass

    ev = {r.vpg: r for r in monitor_pass(rt, vpgs=["erp"])}["erp"].evaluation
    assert (ev.status, ev.substatus) == ("FailingOver", "FailingOverBeforeCommit")
    assert "AWAITING_COMMIT" in ev.codes
    assert [a.code for a in rt.store.open_alerts("erp")] == ["AWAITING_COMMIT"]
    with pytest.raises(Refused, match="^VPG erp: test refused: a failover awaiting commit or rollback holds"):
        ops.run_test(cfg, "erp")
    # rollback
    r = ops.rollback(cfg, "erp", who="carol")
    assert r["result"] == "succeeded" and r["kind"] == "rollback"
    assert source_state(rt) == before
    assert [c.id for c in rt.journal.checkpoints("erp")] == checkpoints  # journal untouched
    assert recovery_site_state(rt) == ([], [])
    row = rt.store.runtime("erp")
    assert (row.status, row.paused, row.lock_holder) == ("MeetingSLA", False, None)
    assert rt.store.open_alerts("erp") == []
    with pytest.raises(Refused, match="^VPG erp: rollback refused: no failover or move is awaiting commit$"):
        ops.rollback(cfg, "erp")


def test_graceful_shutdown_fails_without_tools_and_nothing_changes(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    erp.control("siteA").never_boot("erp-web")
    power_on_sources(rt, ["erp-web"], wait_tools=False)
    power_on_sources(rt, ["erp-db", "erp-app"])
    before = source_state(rt)
    with pytest.raises(VmrepError, match="^VM erp-web: graceful shutdown impossible: VMware Tools do not answer"):
        ops.run_failover(str(erp.config_path), "erp", confirm="erp", shutdown="graceful", commit_policy="none",
                         shutdown_timeout=10)
    # erp-db and erp-app were shut down in parallel: powered back on
    assert source_state(rt) == before
    assert recovery_site_state(rt) == ([], [])
    op = rt.store.operations("erp", kind="failover")[0]
    assert op.result == "failed" and "graceful shutdown impossible" in op.error
    assert rt.store.runtime("erp").lock_holder is None and rt.store.runtime("erp").paused is False
    steps = {(s.vm, s.step): s.result for s in rt.store.steps(op.id)}
    assert steps[("erp-db", "power-on-source")] == "ok" and steps[("erp-web", "shutdown-source")] == "failed"


def test_a_failing_step_rolls_the_failover_back(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    power_on_sources(rt, ["erp-db", "erp-app", "erp-web"])
    before = source_state(rt)
    erp.control("siteB").fault("CreateVM_Task", "fault", "InvalidArgument", count=1)  # permanent: no retry
    with pytest.raises(VmrepError, match="InvalidArgument"):
        ops.run_failover(str(erp.config_path), "erp", confirm="erp", shutdown="force", commit_policy="none",
                         shutdown_timeout=5)
    assert source_state(rt) == before
    assert recovery_site_state(rt) == ([], [])
    assert rt.store.runtime("erp").lock_holder is None


def test_commit_policy_rolls_back_at_its_timeout(erp) -> None:  # type: ignore[no-untyped-def]
    from vmrep.recovery import policy

    rt = erp.runtime()
    cfg = str(erp.config_path)
    before = source_state(rt)
    lines: list[str] = []
    s = ops.run_failover(cfg, "erp", confirm="erp", shutdown="none", commit_policy="rollback",
                         commit_after_minutes=0.005, verify_timeout=20, notify=lines.append)
    # the failover returns awaiting commit; the deadline is in the state database
    assert s["result"] == "succeeded" and "commit" not in s and s["commit_policy"]["policy"] == "rollback"
    assert lines and "the commit policy will rollback at" in lines[0]
    deadline = rt.store.policy_deadline(s["operation_id"])
    assert deadline.applied_at is None and (deadline.due_at - s["ended_at"]).total_seconds() < 1.0
    while ops.utcnow() < deadline.due_at:
        time.sleep(0.05)
    # the next command on the VPG applies the passed deadline before it decides
    with pytest.raises(Refused, match="no failover or move is awaiting commit \\(the commit policy rolled it back at"):
        ops.commit(cfg, "erp")
    applied = rt.store.policy_deadline(s["operation_id"])
    rb = rt.store.operation(applied.applied_operation_id)
    assert (applied.outcome, rb.kind, rb.result, rb.started_by) == ("rolled back", "rollback", "succeeded",
                                                                   "commit policy")
    assert policy.apply_due(cfg) == []  # applied once
    assert source_state(rt) == before
    assert recovery_site_state(rt) == ([], [])


def test_force_shutdown_then_commit_leaves_needs_configuration(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cfg = str(erp.config_path)
    erp.control("siteA").never_boot("erp-web")  # tools never answer: force waits, then powers off
    power_on_sources(rt, ["erp-web"], wait_tools=False)
    client = rt.client("siteA")
    web = vmops.source_vm(client, "erp", "erp-web")
    deadline = time.monotonic() + 5
    while vmops.guest_state(client, web.ref).tools == "guestToolsRunning":  # the guest goes down
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s = ops.run_failover(cfg, "erp", confirm="erp", shutdown="force", commit_policy="none", verify_timeout=20,
                         shutdown_timeout=0.5)
    web = next(x for x in s["steps"]["erp-web"] if x["step"] == "shutdown-source")
    assert web["result"] == "ok"
    detail = next(st.detail for st in rt.store.steps(s["operation_id"])
                  if st.step == "shutdown-source" and st.vm == "erp-web")
    assert detail["action"] == "power off"
    c = ops.commit(cfg, "erp", who="dave")
    assert c["result"] == "succeeded" and c["kind"] == "commit"
    row = rt.store.runtime("erp")
    assert (row.status, row.substatus, row.lock_holder) == ("Recovered", "NeedsConfiguration", None)
    site_b = [sv for sv in vmops.site_vms(rt.client("siteB")) if sv.marked_vpg == "erp"]
    assert sorted(sv.name for sv in site_b) == ["erp-app", "erp-db", "erp-web"]
    assert all(sv.committed and sv.power == "poweredOn" for sv in site_b)
    # the source VMs stay (powered off); the VPG protects nothing until it is set up again
    assert {n: v["power"] for n, v in source_state(rt).items()} == dict.fromkeys(("erp-db", "erp-app", "erp-web"),
                                                                                 "poweredOff")
    assert ops.live_facts(rt.store, "erp")["committed"] is True
    with pytest.raises(Refused, match="^VPG erp: test refused: its VMs were recovered and committed"):
        ops.run_test(cfg, "erp")
    with pytest.raises(Refused, match="no failover or move is awaiting commit"):
        ops.commit(cfg, "erp")
    # the next operation's leftover clean-up never touches committed VMs
    assert len([sv for sv in vmops.site_vms(rt.client("siteB")) if sv.marked_vpg == "erp"]) == 3


def test_failover_then_commit_with_reverse_protection(fresh_lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    cfg = str(fresh_lab.config_path)
    synced(rt, "erp")
    fresh_lab.control("siteB").boot_delay(100)
    lines: list[str] = []
    s = ops.run_failover(cfg, "erp", confirm="erp", checkpoint="latest-tagged", shutdown="none",
                         commit_policy="none", verify_timeout=20, notify=lines.append)
    assert lines == ["VPG erp: failover awaiting commit: run 'vmrep commit erp' or 'vmrep rollback erp'"]
    assert s["checkpoint_id"] == rt.journal.checkpoint("erp", "latest-tagged").id
    # one recovered disk's change tracking is reset (as a host does after a crash): its
    # baseline change id is refused then, and that disk alone is read in full
    ctl = fresh_lab.control("siteB")
    ctl.cbt_reset("erp-db", ctl.disk_index("erp-db", "scsi0:1"))
    c = ops.commit(cfg, "erp", reverse_protection=True, who="gina")
    rp = c["reverse_protection"]
    assert c["result"] == "succeeded" and rp["vpg"] == "erp-reverse"
    # nothing written since the failover's baseline, checkpoint == pre-seed: nothing else to
    # read (docs/recovery.md, "Reverse protection reads less than a full copy")
    assert rp["bytes_read"] == 16 * 1024 * 1024  # erp-db scsi0:1
    rows = {(r["vm"], r["disk"]): r for r in rt.journal.checkpoint("erp-reverse", rp["checkpoint"]).meta["disks"]}
    full = rows.pop(("erp-db", "scsi0:1"))
    assert full["method"] == "full" and "refused" in full["fallback"] and full["bytes_changed"] == 0
    assert {(r["method"], r["bytes_read"], r.get("fallback")) for r in rows.values()} == {("cbt", 0, None)}
    # the pre-seed (the original disks at siteA) saves sending the data back: measured in a
    # journal of its own, as the shared one holds erp's blocks anyway
    seeded = stored_from_protected_site(fresh_lab.config_path, tmp_path / "preseed", "erp-reverse", preseed=True)
    plain = stored_from_protected_site(fresh_lab.config_path, tmp_path / "preseed", "erp-reverse", preseed=False)
    assert len(seeded["preseeded_disks"]) == 4 and plain["preseeded_disks"] == []
    assert seeded["bytes_stored"] == 0 < plain["bytes_stored"]
    assert [o.kind for o in rt.store.operations("erp-reverse")] == ["reverse_protect"]
    assert (rt.store.runtime("erp").status, rt.store.runtime("erp").substatus) == ("Recovered", None)
    assert rt.store.runtime("erp-reverse").initial_sync_done is True
    # the original VMs left the inventory of siteA; the reverse VPG's test network is erp's
    assert not {"erp-db", "erp-app", "erp-web"} & {sv.name for sv in vmops.site_vms(rt.client("siteA"))}
    rev = rt.config.vpg("erp-reverse")
    assert rev.vm("erp-db").nics[0].test_network == "dr-test" and rev.vm("erp-db").recovery_host == "DC0_C0_H0"
