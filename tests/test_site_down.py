"""The disaster itself, in the two-site lab: the protected site goes away (`vmrep lab
site-down`: its vCenter port refuses connections, or accepts and never answers), a
failover recovers without it, the commit works without it, and when the site comes back
(`vmrep lab site-up`, VMs powered as they were) the monitor sees the split brain and
reverse protection sends the recovered VMs' data back as a delta.

Real processes throughout: two simulator processes, pyvmomi over HTTPS, the CLI's
`main`, SQLite; nothing of vSphere is mocked."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from lab import manage
from test_recovery import synced
from vmrep.cli import main
from vmrep.errors import Refused
from vmrep.recovery import operations as ops
from vmrep.recovery import vms as vmops
from vmrep.recovery.reach import SOURCE_NOT_SHUT_DOWN
from vmrep.vsphere.connection import split_host, unreachable

MiB = 1024 * 1024
ERP = ("erp-db", "erp-app", "erp-web")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return rc, out.out, [line for line in out.err.splitlines() if line.strip()]


def _refused(host: str) -> bool:
    try:
        socket.create_connection(split_host(host), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _disk_bytes_equal_checkpoint(lab: Any, rt: Any, checkpoint: str) -> int:
    """Each recovered disk, read as the recovered guest reads it at siteB, equals the
    checkpoint's disk block for block (independently of the failover's own verification).
    Returns the bytes compared."""
    ctl = lab.control("siteB")
    j = rt.journal
    n = 0
    for (vm, disk), size in sorted(j.disks("erp", checkpoint).items()):
        idx = ctl.disk_index(vm, disk)
        for offset, block in j.iter_disk("erp", checkpoint, vm, disk):
            length = min(j.block_size, size - offset)
            got = ctl.guest_read(vm, idx, offset, length)
            want = block[:length] if block is not None else bytes(length)
            assert got == want, f"{vm} {disk}: block at {offset} differs from checkpoint {checkpoint}"
            n += length
    return n


def test_failover_and_commit_without_the_protected_site_then_split_brain_and_protect_back(  # type: ignore[no-untyped-def]
        fresh_lab, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    lab = fresh_lab
    monkeypatch.setenv("VMREP_HOME", str(lab.base))  # `vmrep lab ...` finds this lab
    rt = lab.runtime()
    cfg = str(lab.config_path)
    site_a = lab.site("siteA")
    # sync, then a guest writes and a cycle replicates it: the checkpoint failed over to
    synced(rt, "erp")
    lab.control("siteB").boot_delay(100)
    # a DR test passed before the disaster: its report covers what follows until the next test
    t = ops.run_test(cfg, "erp", verify_timeout=30)
    assert t["success"] is True
    lab.guest_write("erp-db", "scsi0:0", 3 * MiB, b"after the sync " * 1000)
    from vmrep.replication import engine

    cp = engine.run_cycle(rt, rt.config.vpg("erp")).checkpoint_id
    # the source writes once more, and the disaster strikes before a cycle takes it
    lab.guest_write("erp-web", "scsi0:0", 5 * MiB + 10, b"never replicated " * 60)

    # --- the protected site goes away ---------------------------------------------------
    rc, out, err = _cli(capsys, "lab", "site-down", "siteA")
    assert rc == 0 and err == [] and "siteA: down" in out
    assert _refused(site_a.host)
    st = manage.status(lab.base)["sites"]
    assert (st["siteA"]["running"], st["siteA"]["state"], st["siteA"]["reachable"]) == (True, "down", False)
    assert st["siteB"]["state"] == "up" and st["siteB"]["reachable"] is True
    rc, out, _ = _cli(capsys, "lab", "status")
    assert "siteA: running, site down (connections refused)" in out

    # a move is planned and needs the source: refused in one line, nothing recorded
    n_ops = len(rt.store.operations("erp"))
    rc, _, err = _cli(capsys, "move", "erp", "--confirm", "erp", "--config", cfg, "--direct")
    assert rc != 0 and len(err) == 1 and "move refused" in err[0] and "siteA unreachable" in err[0]
    with pytest.raises(Refused, match="move refused: protected site siteA unreachable"):
        ops.run_move(cfg, "erp", confirm="erp")
    assert len(rt.store.operations("erp")) == n_ops

    # --- failover without the protected site ---------------------------------------------
    s = ops.run_failover(cfg, "erp", confirm="erp", shutdown="graceful", commit_policy="none", verify_timeout=30)
    assert s["result"] == "succeeded" and s["checkpoint_id"] == cp
    assert s["warnings"] == [SOURCE_NOT_SHUT_DOWN]
    assert SOURCE_NOT_SHUT_DOWN in (rt.store.operation(s["operation_id"]).notes or "")
    assert (rt.store.runtime("erp").status, rt.store.runtime("erp").substatus) == (
        "FailingOver", "FailingOverBeforeCommit")
    steps = rt.store.steps(s["operation_id"])
    probes = [x for x in steps if x.step == "protected-site"]
    assert len(probes) == 1 and probes[0].detail["reachable"] is False  # decided once
    assert "connection refused" in probes[0].detail["reason"]
    shut = {x.vm: x for x in steps if x.step == "shutdown-source"}
    assert set(shut) == set(ERP) and all(x.result == "skipped" for x in shut.values())
    assert all(x.detail["reason"] == SOURCE_NOT_SHUT_DOWN for x in shut.values())
    assert not [x for x in steps if x.result == "failed"]
    # recovered on the production network with the live IPs, every disk as the checkpoint
    assert [s["verification"][vm]["guest"]["ip"] for vm in ERP] == ["10.20.1.10", "10.20.1.11", "10.20.1.12"]
    assert all(v["ok"] for v in s["verification"].values())
    site_b = {sv.name: sv for sv in vmops.site_vms(rt.client("siteB"))}
    assert {n: site_b[n].power for n in ERP} == dict.fromkeys(ERP, "poweredOn")
    assert _disk_bytes_equal_checkpoint(lab, rt, cp) == sum(rt.journal.disks("erp", cp).values())
    # the recovered guests work: writes the original site never saw (one spans two blocks)
    lab.guest_write("erp-app", "scsi0:0", 2 * MiB - 500, b"recovered guest " * 63, site="siteB")
    lab.guest_write("erp-db", "scsi0:0", 3 * MiB, b"written after the failover " * 20, site="siteB")
    # the blocks that differ between the recovered disks and the original ones at siteA
    # (1 MiB blocks): what reverse protection must read and send, and nothing else
    differing = {("erp-app", "scsi0:0"): 2, ("erp-db", "scsi0:0"): 1, ("erp-web", "scsi0:0"): 1}

    # --- commit: reverse protection refused while the site is gone, plain commit works ---
    rc, _, err = _cli(capsys, "commit", "erp", "--reverse-protection", "--direct", "--config", cfg)
    assert rc != 0 and len(err) == 1 and "reverse protection needs protected site siteA" in err[0]
    assert ops.pending_live_operation(rt, rt.config.vpg("erp")) is not None  # nothing done
    rc, out, err = _cli(capsys, "commit", "erp", "--direct", "--config", cfg)
    assert rc == 0 and err == [], err
    assert (rt.store.runtime("erp").status, rt.store.runtime("erp").substatus) == (
        "Recovered", "NeedsConfiguration")
    # the record says the source was not shut down; so does the compliance report
    text, html = _report_text(rt)
    assert "failover" in text and SOURCE_NOT_SHUT_DOWN in text and SOURCE_NOT_SHUT_DOWN in html
    # and so does the DR report: the test's period holds the failover and its commit
    from reports import build_dr_test_report

    dr = build_dr_test_report(rt.store.engine, t["operation_id"], rt.config)
    live = dr.figures["live_operations"]
    assert [(o["kind"], o["result"]) for o in live] == [("failover", "succeeded"), ("commit", "succeeded")], live
    fo = live[0]
    assert fo["operation_id"] == s["operation_id"] and SOURCE_NOT_SHUT_DOWN in fo["warnings"]
    assert (fo["rto_target_seconds"], fo["rto_met"]) == (900.0, True) and 0 < fo["rto_seconds"]
    assert dr.figures["verdict"] == "PASS"  # the test's own verdict is the test's
    for out_ in (dr.text, dr.html, dr.print_html):
        assert "Live operations" in out_ and SOURCE_NOT_SHUT_DOWN in out_
    csv = dr.csv_bytes()[f"{dr.basename}-live_operations.csv"].decode()
    assert "failover" in csv and SOURCE_NOT_SHUT_DOWN in csv

    # --- the site comes back as it was ---------------------------------------------------
    rc, out, err = _cli(capsys, "lab", "site-up", "siteA")
    assert rc == 0 and err == [] and "siteA: up" in out
    assert manage.status(lab.base)["sites"]["siteA"]["state"] == "up"
    assert unreachable(rt.config.site("siteA")) is None
    back = {sv.name: sv.power for sv in vmops.site_vms(rt.client("siteA"))}
    assert {n: back[n] for n in ERP} == dict.fromkeys(ERP, "poweredOn")  # as 'lab up' left them

    # the monitor sees each source running beside its committed twin: an error per VM
    from vmrep.monitor import monitor_pass

    monitor_pass(rt, vpgs=["erp"])
    sb = {a.vm: a for a in rt.store.open_alerts("erp") if a.code == "SPLIT_BRAIN"}
    assert set(sb) == set(ERP) and {a.level for a in sb.values()} == {"error"}
    assert "power the source off" in sb["erp-db"].text and "--reverse-protection" in sb["erp-db"].text

    # reverse protection now works, and sends back less than a full copy
    full = sum(rt.journal.disks("erp", cp).values())
    rc, out, err = _cli(capsys, "commit", "erp", "--reverse-protection", "--direct", "--config", cfg, "--json")
    assert rc == 0 and err == [], err
    import json

    rp = json.loads(out)["reverse_protection"]
    assert rp["vpg"] == "erp-reverse" and 0 < rp["bytes_read"]
    assert rp["bytes_stored"] < full / 4, (rp, full)
    # read less than a full copy: only the blocks that differ from the original disks
    # (the failover's change-tracking baseline and checkpoint cp tell the rest), per disk
    bs = rt.journal.block_size
    assert rp["bytes_read"] == sum(differing.values()) * bs < full, (rp, full)
    from vmrep.replication.endpoints import journal_for

    meta = journal_for(rt, "erp-reverse").checkpoint("erp-reverse", rp["checkpoint"]).meta
    assert (meta["bytes_read"], meta["bytes_changed"]) == (rp["bytes_read"], rp["bytes_read"]), meta
    assert 0 < meta["bytes_sent"] < full / 4
    rows = {(r["vm"], r["disk"]): r for r in meta["disks"]}
    assert not [r for r in rows.values() if r["method"] != "cbt" or r.get("fallback")], meta["disks"]
    assert {k: r["bytes_read"] // bs for k, r in rows.items() if r["bytes_read"]} == differing
    assert {k: r["bytes_changed"] // bs for k, r in rows.items() if r["bytes_changed"]} == differing
    assert rows[("erp-web", "scsi0:0")]["baseline"]["blocks_unlike_preseed"] == 1  # the unreplicated write
    assert rows[("erp-app", "scsi0:0")]["baseline"]["blocks_written_since"] == 2  # the recovered guest's
    # and the reverse checkpoint is the recovered disks, block for block (their flat files
    # at siteB, read directly: the reverse sync's snapshot is gone, they are what the guests see)
    from test_replication import flat_files

    rj, n = journal_for(rt, "erp-reverse"), 0
    for (vm, disk), path in sorted(flat_files(rt, "erp-reverse").items()):
        data = path.read_bytes()
        for offset, block in rj.iter_disk("erp-reverse", rp["checkpoint"], vm, disk):
            got = data[offset:offset + bs]
            assert got == (block[:len(got)] if block is not None else bytes(len(got))), (vm, disk, offset)
            n += len(got)
    assert n == full
    assert not set(ERP) & {sv.name for sv in vmops.site_vms(rt.client("siteA"))}  # sources replaced
    monitor_pass(rt, vpgs=["erp"])
    assert not [a for a in rt.store.open_alerts("erp") if a.code == "SPLIT_BRAIN"]


def _report_text(rt: Any) -> tuple[str, str]:
    """The compliance report of the last day (text and HTML): its failovers and their notes."""
    from datetime import timedelta

    from reports import build_compliance_report
    from vmrep.recovery.records import utcnow

    now = utcnow()
    r = build_compliance_report(rt.store.engine, now - timedelta(days=1), now + timedelta(seconds=1), ["erp"],
                                rt.config)
    return r.text, r.html


def test_failover_while_the_site_hangs_then_split_brain_warning_and_rollback(  # type: ignore[no-untyped-def]
        lab, prefect_harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The other way a site is gone: its port accepts and never answers. The failover
    flow decides it after one connect timeout (a setting: 2 s here), once; after the site is
    back, the sources it could not shut down run beside their twins: SPLIT_BRAIN warnings
    while the failover awaits commit; a rollback needs no protected site and clears them."""
    import yaml

    from vmrep.monitor import monitor_pass
    from vmrep.runtime import forget_runtime

    monkeypatch.setenv("VMREP_HOME", str(lab.base))
    data = yaml.safe_load(lab.config_path.read_text())
    data["sites"]["siteA"]["connect_timeout_seconds"] = 2
    lab.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    forget_runtime(lab.config_path)
    rt = lab.runtime()
    cfg = str(lab.config_path)
    synced(rt, "erp")
    lab.control("siteB").boot_delay(100)
    rc, out, _ = _cli(capsys, "lab", "site-down", "siteA", "--hang")
    assert rc == 0 and "hanging" in out
    try:
        # the flow the deployment failover/live-failover runs, each step a Prefect task run
        from flows.failover import failover

        s = failover("erp", "erp", cfg, shutdown="force", commit_policy="none", verify_timeout=30)
        assert s["result"] == "succeeded" and s["flow_run_id"] and s["warnings"] == [SOURCE_NOT_SHUT_DOWN]
        op = rt.store.operation(s["operation_id"])
        assert op.kind == "failover" and SOURCE_NOT_SHUT_DOWN in (op.notes or "")
        assert (rt.store.runtime("erp").status, rt.store.runtime("erp").substatus) == (
            "FailingOver", "FailingOverBeforeCommit")
        assert all(v["ok"] for v in s["verification"].values())
        probes = [x for x in rt.store.steps(op.id) if x.step == "protected-site"]
        assert len(probes) == 1 and "no answer within 2 s" in probes[0].detail["reason"]
        # the monitor cannot read the protected site: it says so, and judges no split brain
        monitor_pass(rt, vpgs=["erp"])
        assert not [a for a in rt.store.open_alerts("erp") if a.code == "SPLIT_BRAIN"]
    finally:
        rc, _, _ = _cli(capsys, "lab", "site-up", "siteA")
    assert rc == 0
    # the monitor flow's passes (as its schedule runs them): each emits what it recorded
    import tasks  # noqa: F401 - the control plane's checkers, as in every flow process
    from flows.monitor import monitor
    from test_health_events import read_events
    from vmrep.state import utcnow

    start = utcnow()
    monitor(cfg, ["erp"])
    sb = {a.vm: a for a in rt.store.open_alerts("erp") if a.code == "SPLIT_BRAIN"}
    assert set(sb) == set(ERP) and {a.level for a in sb.values()} == {"warning"}
    assert "awaiting commit" in sb["erp-web"].text and "roll back" in sb["erp-web"].text
    r = ops.rollback(cfg, "erp")
    assert r["result"] == "succeeded"
    monitor(cfg, ["erp"])
    assert not [a for a in rt.store.open_alerts("erp") if a.code == "SPLIT_BRAIN"]
    # every SPLIT_BRAIN raised and cleared is a Prefect event, read back one for one
    assert rt.store.pending_events("erp") == []
    expected = sorted([("vmrep.alert.raised", a.id, a.vm, a.level) for a in sb.values()]
                      + [("vmrep.alert.cleared", a.id, a.vm, a.level) for a in sb.values()])
    deadline = time.monotonic() + 20  # the server persists events a moment after they are sent
    while True:
        events = [e for e in read_events("vmrep.vpg.erp", start, want=len(expected))
                  if e.occurred >= start and e.payload.get("code") == "SPLIT_BRAIN"]
        got = sorted((e.event, e.payload["alert_id"], e.payload["vm"], e.payload["level"]) for e in events)
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == expected
    assert all(e.payload["text"] == sb[e.payload["vm"]].text for e in events if e.event == "vmrep.alert.raised")


def test_a_site_that_accepts_and_never_answers_is_decided_within_the_connect_timeout(  # type: ignore[no-untyped-def]
        lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VMREP_HOME", str(lab.base))
    site = lab.config.site("siteA").model_copy(update={"connect_timeout_seconds": 1.0})
    rc, out, _ = _cli(capsys, "lab", "site-down", "siteA", "--hang")
    try:
        assert rc == 0 and "hanging" in out
        # TCP is accepted (not refused) ...
        socket.create_connection(split_host(site.host), timeout=5).close()
        assert manage.status(lab.base)["sites"]["siteA"]["state"] == "hang"
        # ... but nothing answers: unreachable, said in one line, after one connect timeout
        reason = unreachable(site)
        assert reason is not None and "no answer within 1 s" in reason
    finally:
        rc, _, _ = _cli(capsys, "lab", "site-up", "siteA")
    assert rc == 0 and unreachable(site) is None
