"""The recovery operations as Prefect flows (ephemeral server, started once per process):
every step is a task run, the operation knows its flow run, and a run cancelled in the
middle of a test leaves nothing at the recovery site."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from test_recovery import power_on_sources, recovery_site_state, source_state, synced
from vmrep.errors import Refused
from vmrep.recovery import operations as ops


@pytest.fixture(scope="module")
def erp(lab):  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    synced(rt, "erp")
    lab.control("siteA").boot_delay(100)
    lab.control("siteB").boot_delay(100)
    return lab


def task_run_names(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_flow_run(flow_run_id).state.type.value


def test_dr_test_flow_runs_each_step_as_a_task_run(erp) -> None:  # type: ignore[no-untyped-def]
    from flows.dr_test import dr_test

    rt = erp.runtime()
    mails_before = len(erp.mail.messages)
    s = dr_test("erp", str(erp.config_path), who="frank", verify_timeout=20)
    assert s["success"] is True and s["flow_run_id"] and s["started_by"] == "frank"
    # the DR-test report was emailed to the VPG's recipients and the default ones
    new = erp.mail.messages[mails_before:]
    assert [m["Subject"].startswith("[vmrep] DR test PASS: VPG erp") for m in new] == [True]
    assert {a.strip() for a in new[0]["To"].split(",")} == {"dr-team@example.test", "dr-reports@example.test"}
    names = task_run_names(s["flow_run_id"])
    for vm in ("erp-db", "erp-app", "erp-web"):
        for step in ("write-disks", "create-vm", "customize", "power-on", "verify", "remove-vm"):
            assert f"{step} {vm}" in names
    assert any(n.startswith("cleanup-leftovers") for n in names) and any(n.startswith("plan") for n in names)
    assert flow_run_state(s["flow_run_id"]) == "COMPLETED"
    assert recovery_site_state(rt) == ([], [])


def test_a_flow_cancelled_mid_test_leaves_nothing_behind(erp) -> None:  # type: ignore[no-untyped-def]
    """Cancel as Prefect's runner does it for a cancel from the UI: the 'cancel' control
    intent, then SIGTERM to the process running the flow."""
    from prefect._internal import control_listener
    from prefect.exceptions import TerminationSignal

    from flows.dr_test import dr_test

    rt = erp.runtime()
    sent: list[str] = []

    def cancel_when_recovered() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            op = ops.running_test(rt.store, "erp")
            if op is not None and any(s.step == "recovered" for s in rt.store.steps(op.id)):
                sent.append(op.id)
                control_listener._set_intent("cancel")  # noqa: SLF001 - what the runner's control channel sets
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not end pytest
    watcher = threading.Thread(target=cancel_when_recovered, daemon=True)
    watcher.start()
    try:
        with pytest.raises(TerminationSignal):
            dr_test("erp", str(erp.config_path), keep_minutes=5, verify_timeout=20)
    finally:
        watcher.join(5)
        control_listener.clear_intent()
        signal.signal(signal.SIGTERM, previous)
    assert sent, "the test never reached its keep phase"
    op = rt.store.operation(sent[0])
    assert op.result == "cancelled"
    assert recovery_site_state(rt) == ([], [])
    assert rt.store.runtime("erp").lock_holder is None
    tr = next(t for t in rt.store.test_results("erp") if t.operation_id == op.id)
    assert tr.success is False and tr.cleanup_ok is True
    assert flow_run_state(op.flow_run_id) == "CANCELLED"


def test_failover_and_rollback_flows(erp) -> None:  # type: ignore[no-untyped-def]
    from flows.failover import failover, rollback

    rt = erp.runtime()
    cfg = str(erp.config_path)
    with pytest.raises(Refused, match="confirm by repeating the VPG's name"):
        failover("erp", "yes", cfg)
    power_on_sources(rt, ["erp-db"])
    before = source_state(rt)
    s = failover("erp", "erp", cfg, shutdown="graceful", commit_policy="none", verify_timeout=20,
                 shutdown_timeout=10)
    assert s["result"] == "succeeded" and s["flow_run_id"]
    names = task_run_names(s["flow_run_id"])
    assert "shutdown-source erp-db" in names and "verify erp-web" in names
    r = rollback("erp", cfg)
    assert r["result"] == "succeeded" and "power-on-source erp-db" in task_run_names(r["flow_run_id"])
    assert source_state(rt) == before and recovery_site_state(rt) == ([], [])


def test_cli_runs_the_test_flow(erp, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from vmrep.cli import main as cli_main

    code = cli_main(["test", "erp", "--config", str(erp.config_path), "--json", "--verify-timeout", "20",
                     "--notes", "from the CLI"])
    out = capsys.readouterr().out
    s = json.loads(out[out.index("{"):])
    assert code == 0 and s["success"] is True and s["flow_run_id"] and s["notes"] == "from the CLI"
