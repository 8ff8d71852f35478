"""Approval of live operations (VPG setting `approval: required`) through the Prefect API,
against a real Prefect server serving the deployments on the lab: the run pauses, a resume
with another VPG's name or without a reason is refused by the server and the run stays
paused, the right answer lets it run and the record says who requested and who approved;
nobody approving in time fails the run with one line and nothing changed; the same flow
started by the CLI is not gated. The browser side (the UI's Resume form) is in
tests/test_ui_browser.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from browser import wait_for
from serving import forget_prefect_workers
from test_config import BASE, write
from test_ui_browser import RUN_TIMEOUT, client, finished, stack, the_run  # noqa: F401 - fixtures
from vmrep.cli import main
from vmrep.config import parse_config
from vmrep.errors import ConfigError
from vmrep.recovery import operations as ops


def test_approval_setting_defaults_to_none_and_a_bad_value_names_the_field(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert parse_config(BASE).vpg("web").approval == "none"
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["vpgs"][0]["approval"] = "required"
    assert parse_config(data).vpg("web").approval == "required"
    data["vpgs"][0]["approval"] = "yes"
    with pytest.raises(ConfigError, match=r"^vpgs\[web\]\.approval: .*'none' or 'required'"):
        parse_config(data)
    rc = main(["validate", "--config", str(write(tmp_path, data))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: vpgs[web].approval: "), err


def _paused(client: Any, fr: Any) -> Any:  # noqa: F811 - `client` is the fixture's value here
    return wait_for("the run to pause for approval",
                    lambda: (r := the_run(client, fr.id)).state.is_paused() and r, RUN_TIMEOUT)


def _failover(client: Any, **extra: Any) -> Any:  # noqa: F811
    dep = client.read_deployment_by_name("failover/live-failover")
    return client.create_flow_run_from_deployment(dep.id, parameters={
        "vpg": "erp", "confirm": "erp", "commit_policy": "none", "who": "carol-requester", **extra})


def _log_lines(client: Any, run_id: Any) -> list[str]:  # noqa: F811
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return [x.message for x in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def _last(rt: Any, kind: str) -> Any:
    return next((o for o in rt.store.operations("erp") if o.kind == kind), None)


@pytest.mark.timeout(600)
def test_api_resume_with_another_vpg_is_refused_and_the_right_one_runs_and_is_recorded(  # type: ignore[no-untyped-def]
        lab, stack, client) -> None:  # noqa: F811
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus

    rt = lab.runtime()
    fr = _failover(client)
    run = _paused(client, fr)
    assert rt.store.runtime("erp").lock_holder is None  # nothing held, nothing started
    assert _last(rt, "failover") is None

    for bad in ({"approver": "dave", "vpg": "files", "reason": "INC-1"},   # another VPG
                {"approver": "dave", "vpg": "ERP", "reason": "INC-1"},     # not exactly the name
                {"approver": "dave", "vpg": "erp"}):                       # no reason
        answer = client.resume_flow_run(run.id, run_input=bad)
        assert answer.status == SetStateStatus.REJECT, bad
        assert client.read_flow_run(run.id).state.type == StateType.PAUSED
    refusal = client.resume_flow_run(run.id, run_input={"approver": "dave", "vpg": "files", "reason": "x"})
    assert "'files' does not match '^erp$'" in refusal.details.reason

    answer = client.resume_flow_run(run.id, run_input={"approver": "dave-approver", "vpg": "erp",
                                                       "reason": "CHG-77 planned DR exercise"})
    assert answer.status == SetStateStatus.ACCEPT
    work = finished(client, fr.id)
    assert work.state.is_completed(), f"{work.state.type} {work.state.message}"

    op = _last(rt, "failover")
    summary = ops.operation_summary(rt.store, op.id)
    assert summary["result"] == "succeeded" and summary["flow_run_id"] == str(run.id)
    a = summary["approval"]
    assert (a["requested_by"], a["approved_by"], a["reason"]) == (
        "carol-requester", "dave-approver", "CHG-77 planned DR exercise")
    assert summary["started_by"] == "carol-requester"
    requested, approved = (datetime.fromisoformat(a[k]) for k in ("requested_at", "approved_at"))
    started = op.started_at if op.started_at.tzinfo else op.started_at.replace(tzinfo=timezone.utc)
    assert requested < approved <= started

    # The compliance report's failovers and moves say who approved, when and why.
    from reports.compliance import build_compliance_report

    now = datetime.now(timezone.utc)
    rep = build_compliance_report(rt.store.engine, requested - timedelta(minutes=5), now + timedelta(minutes=1),
                                  ["erp"], rt.config, now=now)
    row = rep.frames["recoveries"].set_index("id").loc[op.id]
    assert (row["approved_by"], row["approval_reason"]) == ("dave-approver", "CHG-77 planned DR exercise")
    assert f"dave-approver, {a['approved_at']}: CHG-77 planned DR exercise" in rep.html
    ops.rollback(str(stack["config"]), "erp", who="approval-test clean-up")


@pytest.mark.timeout(600)
def test_nobody_approving_in_time_fails_the_run_with_one_line_and_changes_nothing(  # type: ignore[no-untyped-def]
        lab, stack, client) -> None:  # noqa: F811
    rt = lab.runtime()
    before = _last(rt, "failover")
    fr = _failover(client, approval_timeout_minutes=0.05)  # 3 s
    work = finished(client, fr.id)
    assert work.state.is_failed()  # the server fails a pause that expires ("never resumed")
    line = "VPG erp: failover not approved within 0.05 min; nothing was changed"
    wait_for("the run's log line", lambda: line in _log_lines(client, work.id), 60)
    after = _last(rt, "failover")
    assert (after.id if after else None) == (before.id if before else None)  # no operation began
    assert rt.store.runtime("erp").lock_holder is None


@pytest.mark.timeout(600)
def test_a_failover_started_by_the_cli_is_not_gated(lab, stack, client, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    rt = lab.runtime()
    # The same flow, run by the CLI in its own process: no deployment, so no pause (the
    # CLI's --confirm is the operator's confirmation). A pause would block here until the
    # timeout of this test.
    rc = main(["failover", "erp", "--confirm", "erp", "--commit-policy", "none", "--config", str(stack["config"]),
               "--json"])
    forget_prefect_workers()  # that run's events went to this module's server, not the session's
    assert rc == 0, capsys.readouterr().err
    op = _last(rt, "failover")
    summary = ops.operation_summary(rt.store, op.id)
    assert summary["result"] == "succeeded" and summary["approval"] is None
    ops.rollback(str(stack["config"]), "erp", who="approval-test clean-up")


@pytest.mark.timeout(600)
def test_a_move_from_the_deployment_waits_for_approval_too(lab, stack, client) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    rt = lab.runtime()
    dep = client.read_deployment_by_name("move/planned-move")
    fr = client.create_flow_run_from_deployment(dep.id, parameters={
        "vpg": "erp", "confirm": "erp", "who": "erin-requester", "reverse_protection": False,
        "keep_source_vms": True})
    run = _paused(client, fr)
    assert _last(rt, "move") is None
    client.resume_flow_run(run.id, run_input={"approver": "frank-approver", "vpg": "erp", "reason": "site A works"})
    work = finished(client, fr.id)
    assert work.state.is_completed(), f"{work.state.type} {work.state.message}"
    summary = ops.operation_summary(rt.store, _last(rt, "move").id)
    assert summary["approval"]["approved_by"] == "frank-approver"
    assert summary["approval"]["requested_by"] == "erin-requester"
