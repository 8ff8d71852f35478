"""Test failover against the two-site lab (engine run directly; the Prefect flows are in
test_dr_test_flow.py): what is created and verified, what is recorded, and that nothing
is left at the recovery site whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_recovery import corrupt_block, recovery_site_state, restore_block, synced
from vmrep import health
from vmrep.cli import main as cli_main
from vmrep.errors import Refused
from vmrep.recovery import operations as ops
from vmrep.recovery import vms as vmops
from vmrep.replication import engine
from vmrep.state.models import utcnow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def erp(lab):  # type: ignore[no-untyped-def]
    """The module's lab with VPG erp synced; the guests boot in 100 ms."""
    rt = lab.runtime()
    synced(rt, "erp")
    lab.control("siteB").boot_delay(100)
    return lab


@pytest.fixture(autouse=True)
def _clean_after(request):  # type: ignore[no-untyped-def]
    yield
    if "erp" in request.fixturenames:
        lab = request.getfixturevalue("erp")
        for s in ("siteA", "siteB"):
            lab.control(s).clear_faults()
        rt = lab.runtime()
        assert rt.store.runtime("erp").lock_holder is None, "a test left the VPG locked"
        assert recovery_site_state(rt) == ([], []), "a test left something at the recovery site"


def steps_of(rt, op):  # type: ignore[no-untyped-def]
    return [(s.vm, s.step, s.result) for s in rt.store.steps(op)]


def test_test_failover_recovers_verifies_records_and_cleans_up(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cp = rt.journal.checkpoint("erp", "latest")
    s = ops.run_test(str(erp.config_path), "erp", notes="quarterly", who="alice", verify_timeout=20)
    assert s["result"] == "succeeded" and s["success"] is True and s["cleanup_ok"] is True
    assert s["started_by"] == "alice" and s["checkpoint_id"] == cp.id and s["checkpoint_age_seconds"] > 0
    # verified: test VMs on the test network with the test IPs, every block equal
    ver = s["verification"]
    assert set(ver) == {"erp-db", "erp-app", "erp-web"} and all(v["ok"] for v in ver.values())
    assert [v["guest"]["ip"] for v in (ver["erp-db"], ver["erp-app"], ver["erp-web"])] == \
        ["192.168.1.10", "192.168.1.11", "192.168.1.12"]
    assert [d["blocks"] for d in ver["erp-db"]["disks"]] == [32, 16]
    assert all(d["ok"] and d["mismatch_count"] == 0 for v in ver.values() for d in v["disks"])
    # every step per VM, with start, end and result; the RTO
    for vm in ("erp-db", "erp-app", "erp-web"):
        assert [x["step"] for x in s["steps"][vm]] == ["write-disks", "create-vm", "customize", "power-on",
                                                       "verify", "remove-vm"]
        assert all(x["result"] == "ok" and x["ended_at"] >= x["started_at"] for x in s["steps"][vm])
    assert 0 < s["rto_seconds"] <= s["wall_seconds"]
    # boot groups in order, with their delays (database 1 s, application 1 s)
    on = {vm: s["steps"][vm][3]["started_at"] for vm in ver}
    assert (on["erp-app"] - on["erp-db"]).total_seconds() >= 1.0
    assert (on["erp-web"] - on["erp-app"]).total_seconds() >= 1.0
    # records: test result, test clock, checkpoint tag
    tr = rt.store.test_results("erp")[0]
    assert tr.success and tr.verification_ok and tr.cleanup_ok and tr.notes == "quarterly" and tr.tested_by == "alice"
    assert rt.store.runtime("erp").last_test_at == s["started_at"]
    assert f"Tested at {s['started_at'].isoformat()}" in rt.journal.checkpoint("erp", cp.id).tags


def passed_test_clock(rt):  # type: ignore[no-untyped-def]
    """Where the monitor's test-overdue clock starts (the newest passed test)."""
    return health.gather_facts(rt.store, "erp", utcnow()).last_test_at


def test_a_vm_that_never_boots_fails_verification_and_the_test_cleans_up(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    clock = passed_test_clock(rt)
    overdue = rt.store.raise_alert("erp", "TEST_OVERDUE", "warning", "VPG erp: DR test overdue (set by the test)")
    assert overdue is not None
    erp.control("siteB").never_boot("erp-web - testing recovery")
    try:
        s = ops.run_test(str(erp.config_path), "erp", verify_timeout=1.5)
    finally:
        erp.control("siteB").never_boot("erp-web - testing recovery", False)
    # a failed test proves nothing: the clock stays, the alert stays open, the tag says so
    try:
        assert passed_test_clock(rt) == clock
        assert "TEST_OVERDUE" in {a.code for a in rt.store.open_alerts("erp")}
    finally:
        rt.store.clear_alert(overdue.id)
    tags = rt.journal.checkpoint("erp", s["checkpoint_id"]).tags
    assert f"Tested at {s['started_at'].isoformat()} (failed)" in tags
    assert f"Tested at {s['started_at'].isoformat()}" not in tags
    assert s["success"] is False and s["result"] == "failed" and s["cleanup_ok"] is True
    assert s["verification"]["erp-db"]["ok"] and s["verification"]["erp-app"]["ok"]
    web = s["verification"]["erp-web"]
    assert not web["ok"] and "VMware Tools not running" in web["error"] and "192.168.1.12 expected" in web["error"]
    assert s["rto_seconds"] is None
    assert rt.store.test_results("erp")[0].success is False


def test_a_block_corrupted_in_the_journal_is_caught_by_verification(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cp = rt.journal.checkpoint("erp", "latest").id
    bmap = rt.journal.block_map("erp", cp, "erp-app", "scsi0:0")
    others = {bytes(b) for (vm, d) in rt.journal.disks("erp", cp) if vm != "erp-app"
              for b in rt.journal.block_map("erp", cp, vm, d) if b is not None}
    idx = next(i for i in range(len(bmap)) if bmap[i] is not None and bmap[i] not in others)
    saved = corrupt_block(rt.journal, bmap[idx])
    try:
        s = ops.run_test(str(erp.config_path), "erp", verify_timeout=20)
    finally:
        restore_block(saved)
    assert s["success"] is False and s["cleanup_ok"] is True
    app = s["verification"]["erp-app"]
    assert not app["ok"] and f"1 block(s) differ from checkpoint {cp}" in app["error"]
    assert app["disks"][0]["mismatches"] == [idx]
    assert s["verification"]["erp-db"]["ok"] and s["verification"]["erp-web"]["ok"]


def test_faults_in_createvm_and_poweron_are_retried(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    ctl = erp.control("siteB")
    ctl.reset_calls()
    ctl.fault("CreateVM_Task", "fault", "HostCommunication", count=2)
    # more faults than the client's own attempts: the step itself is retried
    ctl.fault("PowerOnVM_Task", "fault", "HostCommunication", count=rt.client("siteB").retry.attempts + 1)
    s = ops.run_test(str(erp.config_path), "erp", verify_timeout=20)
    assert s["success"] is True
    calls = ctl.calls()
    assert calls["CreateVM_Task"] == 3 + 2
    assert calls["PowerOnVM_Task"] == 3 + rt.client("siteB").retry.attempts + 1
    power = [(x["step"], x["result"]) for x in s["steps"]["erp-db"] if x["step"] == "power-on"]
    assert power == [("power-on", "failed"), ("power-on", "ok")]
    assert [x["result"] for x in s["steps"]["erp-app"] if x["step"] == "create-vm"] == ["ok"]


def test_test_start_keeps_running_while_replication_continues_then_stop(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cfg = str(erp.config_path)
    s = ops.run_test(cfg, "erp", stop=False, verify_timeout=20)
    assert s["result"] == "running" and s["verification_ok"] is True
    names, folders = recovery_site_state(rt)
    assert names == ["erp-app - testing recovery", "erp-db - testing recovery", "erp-web - testing recovery"]
    assert folders == ["[LocalDS_0] vmrep-test-erp"]
    on = {sv.name: sv.power for sv in vmops.site_vms(rt.client("siteB"))}
    assert on["erp-db - testing recovery"] == "poweredOn"
    # replication continues during the test
    before = len(rt.journal.checkpoints("erp"))
    engine.run_cycle(rt, rt.config.vpg("erp"))
    assert len(rt.journal.checkpoints("erp")) == before + 1
    # while it runs, nothing else may start
    with pytest.raises(Refused, match=r"^VPG erp: failover refused: a test left running"):
        ops.run_failover(cfg, "erp", confirm="erp")
    out = ops.stop_test(cfg, "erp", success=True, notes="app team checked", who="bob")
    assert out["result"] == "succeeded" and out["success"] is True and out["cleanup_ok"] is True
    assert "app team checked (stopped by bob)" == rt.store.test_results("erp")[0].notes
    with pytest.raises(Refused, match="no test is running"):
        ops.stop_test(cfg, "erp", success=True)


def test_refusals_are_one_clear_line(erp, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cfg = str(erp.config_path)
    before = [(o.id, o.result) for o in rt.store.operations("erp")]
    tags_before = {c.id: list(c.tags) for c in rt.journal.checkpoints("erp")}

    def cli(*args: str) -> tuple[int, list[str]]:
        code = cli_main([*args, "--config", cfg])
        err = capsys.readouterr().err.strip().splitlines()
        return code, err

    # while the initial sync runs
    assert rt.store.try_lock("erp", "sync-1", "initial_sync")
    try:
        code, err = cli("test", "erp")
        assert code == 1 and err == ["error: VPG erp: test refused: initial sync in progress; no recovery "
                                     "operation may start before it completes"]
        code, err = cli("failover", "erp", "--confirm", "erp")
        assert code == 1 and len(err) == 1 and "failover refused: initial sync in progress" in err[0]
    finally:
        rt.store.unlock("erp", "sync-1")
    rt.store.update_runtime("erp", initial_sync_done=False)
    try:
        code, err = cli("test", "start", "erp")
        assert err == ["error: VPG erp: test refused: initial sync has not completed (run 'vmrep sync erp')"]
    finally:
        rt.store.update_runtime("erp", initial_sync_done=True)
    # while another operation holds the VPG
    assert rt.store.try_lock("erp", "other-op", "test")
    try:
        code, err = cli("move", "erp", "--confirm", "erp")
        assert code == 1 and len(err) == 1 and err[0].startswith("error: VPG erp: move refused: a test holds the VPG")
    finally:
        rt.store.unlock("erp", "other-op")
    # missing or wrong confirmation
    for args in (("failover", "erp"), ("failover", "erp", "--confirm", "files"), ("move", "erp")):
        code, err = cli(*args)
        assert code == 1 and err == [f"error: VPG erp: {args[0]} refused: confirm by repeating the VPG's name "
                                     "(--confirm erp)"]
    # a test network that is the production network
    data = yaml.safe_load(Path(cfg).read_text())
    data["vpgs"][0]["vms"][1]["nics"][0]["test_network"] = "prod"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code = cli_main(["test", "erp", "--config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == ["error: VPG erp: test refused: the test network 'prod' of VM erp-app NIC 1 is the "
                                 "production network; a test must run isolated"]
    # nothing was recorded by any of them: no operation, no checkpoint tag (and, checked
    # after every test, nothing created at the recovery site)
    assert [(o.id, o.result) for o in rt.store.operations("erp")] == before
    assert {c.id: list(c.tags) for c in rt.journal.checkpoints("erp")} == tags_before


def test_a_crashed_test_is_cleaned_up_by_the_next_operation(erp) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    cfg = str(erp.config_path)
    code = ("import sys; from vmrep.recovery import operations as o; "
            f"o.run_test({cfg!r}, 'erp', keep_minutes=10, verify_timeout=20)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        op = None
        while time.monotonic() < deadline:  # wait until the test VMs are up (keep phase)
            op = ops.running_test(rt.store, "erp")
            if op is not None and any(s.step == "recovered" for s in rt.store.steps(op.id)):
                break
            assert proc.poll() is None, "the test process ended early"
            time.sleep(0.1)
        else:
            pytest.fail("the test did not reach its keep phase")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no finally, no hook runs
        proc.wait()
    assert len(recovery_site_state(rt)[0]) == 3
    s = ops.run_test(cfg, "erp", verify_timeout=20)  # finds the dead holder, cleans up, runs
    assert s["success"] is True
    crashed = rt.store.operation(op.id)
    assert crashed.result == "cancelled" and "interrupted" in crashed.error
    tr = next(t for t in rt.store.test_results("erp") if t.operation_id == op.id)
    assert tr.success is False and tr.cleanup_ok is True
    tags = rt.journal.checkpoint("erp", tr.checkpoint_id).tags
    assert f"Tested at {crashed.started_at.isoformat()} (cancelled)" in tags
    assert passed_test_clock(rt) == s["started_at"]  # the test that passed after it


def test_local_vpg_test_recovers_in_its_folder(erp) -> None:  # type: ignore[no-untyped-def]
    from pyVmomi import vim

    from vmrep.vsphere.property import retrieve

    rt = erp.runtime()
    cfg = str(erp.config_path)
    synced(rt, "files")
    erp.control("siteA").boot_delay(100)
    s = ops.run_test(cfg, "files", verify_timeout=20, stop=False)
    ver = s["verification"]["files-01"]
    assert ver["ok"] and ver["guest"]["ip"]  # no static test IP: any address will do
    assert "customize" not in [x["step"] for x in s["steps"]["files-01"]]  # the guest keeps its settings
    client = rt.client("siteA")
    folders = {f.ref._moId: f.name for f in retrieve(client, vim.Folder, ["name"])}
    placed = {o.name: folders.get(o.get("parent")._moId) for o in retrieve(client, vim.VirtualMachine,
                                                                            ["name", "parent"])}
    assert placed["files-01 - testing recovery"] == "recovered" and placed["files-01"] != "recovered"
    out = ops.stop_test(cfg, "files", success=True)
    assert out["cleanup_ok"] is True and recovery_site_state(rt, "files") == ([], [])
    assert "files-01" in {sv.name for sv in vmops.site_vms(client)}  # the protected VM is untouched


def test_scripts_run_around_the_boot_groups_and_a_failed_step_still_cleans_up(erp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rt = erp.runtime()
    log = tmp_path / "scripts.log"
    data = yaml.safe_load(Path(erp.config_path).read_text())
    probe = f"sh -c 'echo $(date +%s.%N) $VMREP_PHASE $VMREP_OPERATION $VMREP_VPG $VMREP_CHECKPOINT >> {log}'"
    data["vpgs"][0]["pre_recovery_script"] = {"command": probe, "timeout_seconds": 10}
    data["vpgs"][0]["post_recovery_script"] = {"command": probe, "timeout_seconds": 10}
    cfg2 = tmp_path / "with-scripts.yaml"  # same sites, journal and state database
    cfg2.write_text(yaml.safe_dump(data))
    s = ops.run_test(str(cfg2), "erp", verify_timeout=20)
    assert s["success"] is True
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert [ln[1:4] for ln in lines] == [["pre", "test", "erp"], ["post", "test", "erp"]]
    assert lines[0][4] == s["checkpoint_id"]
    on = [x for vm in ("erp-db", "erp-app", "erp-web") for x in s["steps"][vm] if x["step"] == "power-on"]
    assert float(lines[0][0]) <= min(x["started_at"].timestamp() for x in on)
    assert float(lines[1][0]) >= max(x["ended_at"].timestamp() for x in on)
    assert [x["step"] for x in s["steps"]["*"]][:4] == ["cleanup-leftovers", "plan", "pre-script", "post-script"]
    # a step that fails for good (a permanent fault): raised after the clean-up
    erp.control("siteB").fault("PowerOnVM_Task", "fault", "InvalidState", count=1)
    with pytest.raises(Exception, match="InvalidState"):
        ops.run_test(str(cfg2), "erp", verify_timeout=20)
    op = rt.store.operations("erp", kind="test")[0]
    assert op.result == "failed" and "InvalidState" in op.error
    tr = rt.store.test_results("erp")[0]
    assert tr.operation_id == op.id and tr.success is False and tr.cleanup_ok is True


def test_test_over_the_datastore_http_interface(erp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The recovery site's datastores not mounted here: scratch disks are uploaded with
    streaming PUTs to /folder and verified with ranged GETs, as against a real vCenter."""
    import yaml

    from vmrep.runtime import forget_runtime, get_runtime

    data = yaml.safe_load(erp.config_path.read_text())
    data["sites"]["siteB"]["datastore_mounts"] = {}
    cfg = erp.config_path.with_name("vmrep-siteB-http.yaml")
    cfg.write_text(yaml.safe_dump(data))
    ctl = erp.control("siteB")
    ctl.reset_calls()
    ctl.fault("DatastoreFile.PUT", "drop", count=1)  # an upload cut off: the step starts it again
    try:
        s = ops.run_test(str(cfg), "erp", notes="over HTTP", verify_timeout=20)
        calls = ctl.calls()
        rt = get_runtime(cfg)
        assert s["result"] == "succeeded" and s["success"] is True and s["cleanup_ok"] is True
        assert all(d["ok"] and d["mismatch_count"] == 0 for v in s["verification"].values() for d in v["disks"])
        # every disk went up as one PUT (plus its descriptor) and was read back through /folder
        disks = sum(len(v["disks"]) for v in s["verification"].values())
        assert calls.get("DatastoreFile.PUT", 0) >= 2 * disks
        assert calls.get("DatastoreFile.GET", 0) >= disks
        from test_recovery import recovery_site_state

        assert recovery_site_state(rt) == ([], [])
    finally:
        forget_runtime(cfg)


def test_a_createvm_reply_lost_after_the_vm_was_made_is_not_made_twice(erp) -> None:  # type: ignore[no-untyped-def]
    """The lab serves CreateVM, then drops the connection instead of answering: the retry
    must find the VM the lost call made, not make a second one."""
    rt = erp.runtime()
    ctl = erp.control("siteB")
    ctl.reset_calls()
    ctl.fault("CreateVM_Task", "drop-reply", count=1)
    s = ops.run_test(str(erp.config_path), "erp", notes="lost reply", verify_timeout=20)
    assert s["result"] == "succeeded" and s["success"] is True
    assert ctl.calls()["CreateVM_Task"] == 3  # one lost reply, then one per remaining VM
    created = {x.vm: x for x in rt.store.steps(s["operation_id"]) if x.step == "create-vm"}
    found_again = [vm for vm, x in created.items() if x.result == "skipped"]
    assert len(found_again) == 1 and created[found_again[0]].detail["created"] is False
    from test_recovery import recovery_site_state

    assert recovery_site_state(rt) == ([], [])
