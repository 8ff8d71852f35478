"""Deployments: every flow deployable, parameter models matching the flows, schemas the
Prefect server validates with (and refuses runs by, on the session's test server),
schedules, and the alert automation."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from dateutil.rrule import rrulestr

from deployments import params as P
from deployments import serve
from deployments.automations import AUTOMATION_NAME, EVENT, NOTIFY_PARAMETERS, alert_email_automation


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deploy")
    vpg = lambda name, **kw: {"name": name, "protected_site": "a", "recovery_site": "b",  # noqa: E731
                              "vms": [{"name": f"{name}-01"}], **kw}
    p = d / "vmrep.yaml"
    p.write_text(yaml.safe_dump({
        "database_url": f"sqlite:///{d / 'state.db'}",
        "sites": {"a": {"host": "vc-a.example.com", "password": "env:X"},
                  "b": {"host": "vc-b.example.com", "password": "env:X"}},
        "vpgs": [vpg("erp", rpo_target_seconds=60, test_interval_months=3),
                 vpg("crm", rpo_target_seconds=300, test_interval_months=9),
                 vpg("lab", test_interval_months="off")],
    }))
    return p


@pytest.fixture(scope="module")
def built(config_path):
    deps, specs = serve.build_deployments(config_path, strict=True)
    return {f"{d.flow_name}/{d.name}": d for d in deps}, specs


def test_every_flow_is_deployed(built):
    deps, _ = built
    assert set(deps) == {
        "replicate/erp", "replicate/crm", "replicate/lab", "replicate-site/a", "monitor/every-minute",
        "initial-sync/initial-sync",
        "compliance-report/monthly", "dr-test-report/dr-test-report", "notify/notify", "dr-test/dr-test",
        "dr-test-start/dr-test-start", "dr-test-stop/dr-test-stop", "failover/live-failover",
        "move/planned-move", "commit/commit", "rollback/rollback",
        # the per-site deployments the UI entries hand over to (one work pool each)
        "initial-sync/a", "dr-test/b", "dr-test-start/b", "dr-test-stop/b", "failover/b", "move/b", "commit/b",
        "rollback/b",
        # the journal's retention, where the journal is: one per recovery site, on its pool
        "retention/b",
    }
    for d in deps.values():
        # module entry points: flows/reports.py must not be imported as a top-level `reports`
        assert d.entrypoint.startswith("flows.") and ":" not in d.entrypoint
        assert d.enforce_parameter_schema and d.description and "vmrep" in d.tags
    # exactly one pool each: replication on the protected site's, the rest on the recovery site's
    assert deps["replicate/erp"].work_pool_name == "vmrep-a" and deps["initial-sync/a"].work_pool_name == "vmrep-a"
    for name in ("dr-test/b", "failover/b", "monitor/every-minute", "dr-test/dr-test", "compliance-report/monthly"):
        assert deps[name].work_pool_name == "vmrep-b", name
    assert not deps["dr-test/b"].schedules and len(deps["dr-test/dr-test"].schedules) == 2
    assert deps["retention/b"].work_pool_name == "vmrep-b" and deps["retention/b"].parameters["site"] == "b"
    # one run for every VPG of a site: on its pool, its schedule registered switched off
    site = deps["replicate-site/a"]
    assert site.work_pool_name == "vmrep-a" and site.parameters["site"] == "a"
    assert [s.active for s in site.schedules] == [False]


def test_schemas_have_a_form_for_people(built, config_path):
    deps, _ = built
    for name, d in deps.items():
        schema = d._parameter_openapi_schema.model_dump()
        props = schema["properties"]
        assert "config" not in props, name  # never in a form ...
        assert d.parameters["config"] == str(config_path.resolve())  # ... but a default of every deployment
        for field, p in props.items():
            assert p.get("title"), (name, field)
        if "vpg" in props and name != "notify/notify":
            assert props["vpg"]["enum"] == ["crm", "erp", "lab"], name
    dr = deps["dr-test/dr-test"]._parameter_openapi_schema.model_dump()["properties"]
    assert "latest-tagged" in dr["checkpoint"]["description"]
    assert dr["keep_minutes"]["minimum"] == 0


GOOD = [("dr-test/dr-test", {"vpg": "erp", "keep_minutes": 5}), ("compliance-report/monthly", {"period": "2025-10"}),
        ("monitor/every-minute", {"vpgs": ["erp", "crm"]}),
        ("notify/notify", {"vpg": "a-vpg-removed-since", "alert_id": 3})]
BAD = [("dr-test/dr-test", {"vpg": "erpp"}), ("dr-test/dr-test", {"vpg": "erp", "keep_minutes": -1}),
       ("compliance-report/monthly", {"period": "last month"}),
       ("failover/live-failover", {"vpg": "erp", "shutdown": "now"}),
       ("monitor/every-minute", {"vpgs": ["nope"]}),
       ("replicate/erp", {"interval_seconds": 0})]


def test_the_server_refuses_bad_parameters(prefect_harness, config_path):
    """Registered on a real Prefect server (the session's harness), a run with a value
    the form would not allow is refused by the server's API, as a run from the UI is."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from deployments import pools

    pools.ensure_for_path(prefect_harness, config_path)  # the sites' pools, as `make server` makes them
    deps, _ = serve.build_deployments(config_path, strict=True, schedules_active=False)
    by_name = {f"{d.flow_name}/{d.name}": d for d in deps}
    ids = {name: by_name[name].apply() for name in {n for n, _ in GOOD + BAD}}
    with get_client(sync_client=True) as client:
        for dep, params in GOOD:
            fr = client.create_flow_run_from_deployment(ids[dep], parameters=params)
            client.delete_flow_run(fr.id)  # accepted; nobody is to run it
        for dep, bad in BAD:
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(ids[dep], parameters=bad)
            assert refused.value.response.status_code == 409, (dep, bad)
            assert "Validation failed" in refused.value.response.text, (dep, bad)


def test_models_validate_what_a_schema_cannot():
    vpgs = ["erp", "crm"]
    assert P.validate(P.FailoverParams, {"vpg": "erp", "confirm": "erp"}, vpgs).checkpoint == "latest"
    with pytest.raises(ValueError, match="confirm must repeat the VPG's name"):
        P.validate(P.FailoverParams, {"vpg": "erp", "confirm": "crm"}, vpgs)
    with pytest.raises(ValueError, match="confirm must repeat"):
        P.validate(P.MoveParams, {"vpg": "erp", "confirm": "ERP"}, vpgs)
    with pytest.raises(ValueError, match=r"vpg: no VPG named 'hr' \(known: crm, erp\)"):
        P.validate(P.DrTestParams, {"vpg": "hr"}, vpgs)
    with pytest.raises(ValueError, match="vpgs: no VPG named 'x'"):
        P.validate(P.ComplianceParams, {"vpgs": ["erp", "x"]}, vpgs)
    with pytest.raises(ValueError, match="keep_minutes"):
        P.validate(P.DrTestParams, {"vpg": "erp", "keep_minutes": -3}, vpgs)
    with pytest.raises(ValueError, match="force: Extra inputs are not permitted"):
        P.validate(P.RollbackParams, {"vpg": "erp", "force": True}, vpgs)
    assert P.validate(P.NotifyParams, {"vpg": "gone"}, vpgs).vpg == "gone"


def test_schedules(built):
    deps, specs = built
    by_name = {f"{s.load_flow().name}/{s.name}": s for s in specs}
    rep = deps["replicate/erp"]
    assert [s.interval.total_seconds() for s in by_name["replicate/erp"].schedules] == [serve.REPLICATE_RUN_SECONDS]
    assert rep.parameters["interval_seconds"] == 10 and rep.parameters["vpg"] == "erp"
    # a run goes on past the next one's due time, until that one takes over (flows/replicate.HandOff)
    assert rep.parameters["for_seconds"] > serve.REPLICATE_RUN_SECONDS
    # two at once: the next run starts while the last still cycles, and takes over from it
    assert rep.concurrency_limit == 2 and rep.concurrency_options.collision_strategy.value == "ENQUEUE"
    # the monitor: one long run of a pass a minute, the next run as it ends (back to back)
    mon = deps["monitor/every-minute"]
    assert mon.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert mon.parameters["interval_seconds"] == 60
    assert mon.parameters["lifetime_seconds"] == serve.MONITOR_RUN_SECONDS - 60
    assert serve.schedule_text(by_name["monitor/every-minute"]) == "a pass every 1 min, in runs of 30 min"
    assert serve.schedule_text(by_name["compliance-report/monthly"]) == "monthly, 1st 06:00 UTC"
    assert deps["compliance-report/monthly"].parameters["period"] == "previous-month"
    dr = by_name["dr-test/dr-test"].schedules
    assert [s.parameters for s in dr] == [{"vpg": "erp"}, {"vpg": "crm"}]  # 'lab' has testing off
    assert serve.schedule_text(by_name["dr-test/dr-test"]) == \
        "every 3 months, 1st 02:00 UTC (erp); every 9 months, 1st 03:00 UTC (crm)"
    for name in ("failover/live-failover", "move/planned-move", "commit/commit", "rollback/rollback"):
        assert not by_name[name].schedules
    # retention every 5 minutes (journal.retention_interval_seconds); a run still going cancels the next
    ret = deps["retention/b"]
    assert [s.interval.total_seconds() for s in by_name["retention/b"].schedules] == [300.0]
    assert serve.schedule_text(by_name["retention/b"]) == "every 5 min"
    assert ret.concurrency_limit == 1 and ret.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_dr_test_rrule_runs_on_the_test_interval():
    now = datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc)
    rule = rrulestr(serve.dr_test_rrule(9, 1, now))
    dates = [rule[i] for i in range(3)]
    assert [d.isoformat() for d in dates] == ["2026-12-01T03:00:00+00:00", "2027-09-01T03:00:00+00:00",
                                              "2028-06-01T03:00:00+00:00"]
    assert serve.replicate_interval(60) == 10 and serve.replicate_interval(20) == 5
    assert serve.replicate_interval(3600) == 60


def test_alert_automation_runs_notify_with_the_event():
    import uuid

    dep_id = uuid.uuid4()
    auto = alert_email_automation(dep_id)
    assert auto.name == AUTOMATION_NAME and auto.enabled
    assert auto.trigger.expect == {EVENT}
    assert auto.trigger.match.model_dump() == {"prefect.resource.id": "vmrep.vpg.*"}
    (action,) = auto.actions
    assert action.type == "run-deployment" and action.deployment_id == dep_id
    assert action.parameters == NOTIFY_PARAMETERS
    assert set(NOTIFY_PARAMETERS) <= set(P.NotifyParams.model_fields)
