"""Work pools per site, for real: a Prefect server on PostgreSQL (vmrep's own state in
another database of the same PostgreSQL server), `python -m deployments.serve` creating
the pools `vmrep-siteA` and `vmrep-siteB`, the vCenter limits and the deployments, and
running one process worker per pool; every one of these is a process of its own.

- A replication run executes on vmrep-siteA (the protected site's pool) and applies no
  retention; `retention/siteB` executes on vmrep-siteB (the recovery site's); a DR test started
  from the UI entry `dr-test/dr-test` (as the UI's "Run" does) is handed over to
  `dr-test/siteB` and executes on vmrep-siteB: read back from the API. Its report email
  reaches an SMTP server (aiosmtpd) and its artifacts are in Prefect.
- The deployments' forms refuse what they would not allow, and an alert event goes
  through the alert automation and notify/notify to an email to the VPG's owners.
- With `vcenter_slots: 1` at siteA and every CreateSnapshot delayed 1.5 s by the lab, two
  VPGs replicating at once never hold siteA's vCenter slot together: the overlap of the
  held intervals the snapshot steps log is 0, while both runs were running.
"""

from __future__ import annotations

import email
import json
import re
import uuid
from email import policy
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving import served, wait_for
from test_mail import smtp_server

HELD = re.compile(r"vcenter slot (\S+) held ([0-9.]+) ([0-9.]+)")

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def stack(lab, pg_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("pools")
    tag = uuid.uuid4().hex[:8]
    prefect_db = pg_server.create_database(f"prefect_{tag}")
    state_db = pg_server.create_database(f"vmrep_{tag}")
    cfg = yaml.safe_load(lab.config_path.read_text())
    cfg["database_url"] = state_db  # vmrep's state: another database of the same server
    cfg["journal"]["path"] = str(tmp / "journal")
    cfg["sites"]["siteA"]["vcenter_slots"] = 1
    ctl, sink = smtp_server()
    cfg["notifications"] = {"smtp_host": "127.0.0.1", "smtp_port": ctl.port, "sender": "vmrep@dr.example.test",
                            "default_to": ["dr-audit@example.test"]}
    config = tmp / "vmrep.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "VMREP_HOME": str(tmp / "home"), "VMREP_USER": "e2e-tester"}
    # serve stops its workers (and their runs) on SIGINT; automations on, schedules off
    try:
        with served(config, tmp, args=("--no-schedules",), env=env, database_url=prefect_db) as stack:
            yield {**stack, "config": config, "lab": lab, "workers": tmp / "prefect-client" / "workers",
                   "sink": sink}
    finally:
        ctl.stop()


def messages(sink: Any) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(e.content, policy=policy.default) for e in sink.envelopes]


@pytest.fixture(scope="module")
def api(stack):  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack["srv"].api_url}), get_client(sync_client=True) as c:
        yield c


def _tail(stack: dict[str, Any]) -> str:
    out = stack["log"].read_text(errors="replace")[-2000:]
    for p in sorted(Path(stack["workers"]).glob("*.log")):
        out += f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2500:]
    return out


def _deployment(api: Any, stack: dict[str, Any], name: str) -> Any:
    def read() -> Any:
        try:
            return api.read_deployment_by_name(name)
        except Exception:  # noqa: BLE001 - not registered yet
            assert stack["proc"].poll() is None, f"serve exited:\n{_tail(stack)}"
            return None

    return wait_for(name, read, 240)


def _start(api: Any, stack: dict[str, Any], name: str, parameters: dict[str, Any]) -> Any:
    return api.create_flow_run_from_deployment(_deployment(api, stack, name).id, parameters=parameters)


def _finish(api: Any, stack: dict[str, Any], fr: Any, timeout: float) -> Any:
    final = wait_for(f"{fr.name}", lambda: (r := api.read_flow_run(fr.id)).state.is_final() and r, timeout, 1.0)
    assert final.state.is_completed(), f"{fr.name}: {final.state.type} {final.state.message}\n{_tail(stack)}"
    return final


def _task_names(api: Any, fr: Any) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return [t.name for t in api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))]


def _child(api: Any, parent: Any) -> Any:
    """The run a UI entry handed over to (a subflow of it)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    [child] = api.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
    return child


def test_runs_execute_on_the_pool_of_their_site(stack, api) -> None:  # type: ignore[no-untyped-def]
    # The server is on PostgreSQL: its database holds Prefect's tables.
    import psycopg

    for name in ("vmrep-siteA", "vmrep-siteB"):
        pool = wait_for(name, lambda n=name: _pool(api, n), 240)
        assert pool.type == "process"
    wait_for("one worker per pool", lambda: all(
        len([w for w in api.read_workers_for_work_pool(p) if str(w.status).upper().endswith("ONLINE")]) == 1
        for p in ("vmrep-siteA", "vmrep-siteB")), 180, 1.0)

    sync = _finish(api, stack, _start(api, stack, "initial-sync/initial-sync", {"vpg": "erp"}), 600)
    child = _child(api, sync)
    assert (child.work_pool_name, sync.work_pool_name) == ("vmrep-siteA", "vmrep-siteB")  # home: siteB
    assert child.state.is_completed()

    rep = _finish(api, stack, _start(api, stack, "replicate/erp", {"vpg": "erp", "cycles": 2,
                                                                  "interval_seconds": 1}), 600)
    assert rep.work_pool_name == "vmrep-siteA"
    # Served, the cycles applied no retention: that is the recovery site's retention run's.
    rep_tasks = _task_names(api, rep)
    assert any(n.startswith("commit-checkpoint") for n in rep_tasks)
    assert not any(n.startswith("apply-retention") for n in rep_tasks), rep_tasks
    ret = _finish(api, stack, _start(api, stack, "retention/siteB", {}), 600)
    assert ret.work_pool_name == "vmrep-siteB" and ret.parameters["site"] == "siteB"
    assert [n.split("-")[:2] for n in _task_names(api, ret) if n.startswith("journal-retention")] == \
        [["journal", "retention"]]  # erp, the one VPG recovered at siteB

    dr = _finish(api, stack, _start(api, stack, "dr-test/dr-test", {"vpg": "erp", "notes": "pools test"}), 900)
    test = _child(api, dr)
    assert test.work_pool_name == "vmrep-siteB" and test.state.is_completed()
    assert api.read_deployment(test.deployment_id).name == "siteB"
    _report_was_emailed_and_published(api, stack, test)
    # Each ran in a process a worker started, not in the serving process.
    pids = {r.infrastructure_pid for r in (child, rep, test, ret)}
    assert None not in pids and len(pids) == 4

    cfg = yaml.safe_load(stack["config"].read_text())
    db = cfg["database_url"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(db) as conn:  # vmrep's state went to its own database on the same server
        ops = conn.execute("select kind from operations where vpg = 'erp'").fetchall()
        assert {"initial_sync", "test"} <= {k for (k,) in ops}
        prefect_db = db.rsplit("/", 1)[0] + "/" + db.rsplit("/", 1)[1].replace("vmrep_", "prefect_")
    with psycopg.connect(prefect_db) as conn:
        n = conn.execute("select count(*) from flow_run").fetchone()
        assert n is not None and n[0] >= 5


def _report_was_emailed_and_published(api: Any, stack: dict[str, Any], test: Any) -> None:
    """The DR test's report email, at the VPG's owners and default_to with the CSVs
    attached, and the artifacts of the run that did the test: table, link to the HTML on
    disk, summary, email outcome."""
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId

    msg = wait_for("the report email", lambda: next(
        (m for m in messages(stack["sink"]) if "DR test" in m["Subject"]), None), 60)
    assert msg["Subject"].startswith("[vmrep] DR test PASS: VPG erp")
    assert {"dr-team@example.test", "dr-audit@example.test"} <= {a.strip() for a in msg["To"].split(",")}
    names = {p.get_filename() for p in msg.iter_attachments()}
    assert any(n and n.endswith("-steps.csv") for n in names)
    assert "e2e-tester" in msg.get_body(("plain",)).get_content()

    arts = api.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[test.id])),
                              artifact_filter=ArtifactFilter())
    by_key = {a.key: a for a in arts}
    assert {"dr-test-erp", "dr-test-erp-html", "dr-test-erp-summary", "dr-test-erp-email"} <= set(by_key)
    table = by_key["dr-test-erp"].data
    table = json.loads(table) if isinstance(table, str) else table
    figures = {r["figure"]: r["value"] for r in table}
    assert figures["verdict"] == "PASS" and figures["flow_run_id"] == str(test.id)
    html = Path(by_key["dr-test-erp-html"].data.rsplit("(file://", 1)[1].rstrip(")"))
    assert html.exists() and html.parent == stack["reports"]
    assert "Emailed" in by_key["dr-test-erp-email"].data


def test_the_forms_refuse_bad_input_and_an_alert_event_is_emailed(stack, api) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient
    from prefect.exceptions import PrefectHTTPStatusError

    dr = _deployment(api, stack, "dr-test/dr-test")
    assert "isolated test network" in dr.description
    assert dr.parameter_openapi_schema["properties"]["vpg"]["enum"] == ["erp", "files"]
    assert all(not s.active for s in dr.schedules) and len(dr.schedules) == 2  # --no-schedules
    # The server refuses what the form would not allow.
    with pytest.raises(PrefectHTTPStatusError):
        api.create_flow_run_from_deployment(dr.id, parameters={"vpg": "no-such-vpg"})

    # The alert automation: an alert event -> notify/notify -> an email to the VPG's owners.
    # Sent with a client of this server's own: the process-wide EventsWorker may still be
    # bound to another API (an earlier test's Prefect harness), as it is a singleton.
    wait_for("the automation", lambda: api.read_automations_by_name("vmrep alert email"), 120)

    async def send() -> None:
        async with PrefectEventsClient(api_url=stack["srv"].api_url) as events:
            await events.emit(Event(
                event="vmrep.alert.raised",
                resource={"prefect.resource.id": "vmrep.vpg.erp", "prefect.resource.name": "erp"},
                payload={"code": "RPO_OVER_TARGET", "level": "warning",
                         "text": "RPO 95 s is over the target 60 s", "vm": None, "alert_id": 7}))

    asyncio.run(send())
    alert = wait_for("the alert email", lambda: next(
        (m for m in messages(stack["sink"]) if "RPO_OVER_TARGET" in m["Subject"]), None), 180)
    assert alert["Subject"] == "[vmrep] VPG erp: warning RPO_OVER_TARGET"
    assert "RPO 95 s is over the target 60 s" in alert.get_body(("plain",)).get_content()
    assert "dr-team@example.test" in alert["To"]


def _limit(api: Any, name: str) -> Any:
    try:
        return api.read_global_concurrency_limit_by_name(name)
    except Exception:  # noqa: BLE001 - not created yet
        return None


def _pool(api: Any, name: str) -> Any:
    try:
        return api.read_work_pool(name)
    except Exception:  # noqa: BLE001 - not created yet
        return None


def test_one_vcenter_slot_serialises_two_vpgs_snapshot_steps(stack, api) -> None:  # type: ignore[no-untyped-def]
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    limit = wait_for("the limit", lambda: _limit(api, "vcenter-siteA"), 240)
    assert limit.limit == 1 and limit.active
    assert api.read_global_concurrency_limit_by_name("vcenter-siteB").limit == 4  # the default
    _finish(api, stack, _start(api, stack, "initial-sync/initial-sync", {"vpg": "files"}), 600)
    try:
        _finish(api, stack, _start(api, stack, "initial-sync/initial-sync", {"vpg": "erp"}), 600)
    except AssertionError:  # erp is synced already when the other test ran first
        pass

    ctl = stack["lab"].control("siteA")
    # The first consistency point is held long: the other run's process, started by the
    # worker at the same time but slow to start on a loaded machine, then surely meets the
    # slot taken (once it started only after the first run had ended, and the check below
    # that the runs interleaved failed). Then a slow vCenter: long slots.
    ctl.fault("CreateSnapshot_Task", "delay", count=1, delay_ms=15000)
    ctl.fault("CreateSnapshot_Task", "delay", count=0, delay_ms=1500)
    try:
        runs = [_start(api, stack, f"replicate/{v}", {"vpg": v, "cycles": 2, "interval_seconds": 1})
                for v in ("erp", "files")]
        done = [_finish(api, stack, r, 900) for r in runs]
    finally:
        ctl.clear_faults()

    held: dict[str, list[tuple[float, float]]] = {}
    for r in done:
        def read(r: Any = r) -> list[tuple[float, float]]:
            logs = api.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))
            return [(float(m[2]), float(m[3])) for lg in logs if (m := HELD.search(lg.message))
                    and m[1] == "vcenter-siteA"]
        # 2 cycles: a clean-up, a consistency point and a release each
        held[str(r.id)] = wait_for("the slot logs", lambda read=read: len(x := read()) >= 6 and x, 60, 1.0)
    a, b = held.values()
    assert max(t1 - t0 for t0, t1 in a + b) >= 1.4  # the consistency points waited for the slow vCenter
    # Both runs were running while the slot was in use (else this would prove nothing):
    # each had started before either released the slot for the last time. Not that their
    # holds alternate: a run denied the slot retries after the Retry-After Prefect's server
    # gives (about the limit's mean occupancy, jittered), while the holder takes it again
    # at once, so one run may hold it cycle after cycle while the other waits ...
    starts = [r.start_time.timestamp() for r in done]
    assert max(starts) < min(max(t1 for _, t1 in a), max(t1 for _, t1 in b)), (starts, a, b)
    # ... and never held its one slot together.
    overlap = sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in a for b0, b1 in b)
    assert overlap == 0.0, f"overlap {overlap:.3f}s"


def test_cancelling_a_ui_entry_cancels_the_run_it_handed_over_to(stack, api) -> None:  # type: ignore[no-untyped-def]
    """`dr-test/dr-test` cancelled through the API while the test it handed over to
    `dr-test/siteB` waits for its VMs to boot: the child is cancelled by the parent's
    cancellation hook (its state says so, naming the parent: not Prefect's own clean-up of
    subflows, which acts only once the parent is Cancelled, every 20 s), its test VMs
    are removed and the VPG is released."""
    from prefect.states import Cancelling

    from test_recovery import recovery_site_state
    from vmrep.state import StateStore

    try:
        _finish(api, stack, _start(api, stack, "initial-sync/initial-sync", {"vpg": "erp"}), 600)
    except AssertionError:  # erp is synced already when another test ran first
        pass
    lab = stack["lab"]
    store = StateStore.open(yaml.safe_load(stack["config"].read_text())["database_url"])
    lab.control("siteB").boot_delay(120_000)  # the test waits for its VMs: long enough to cancel it
    try:
        parent = _start(api, stack, "dr-test/dr-test", {"vpg": "erp", "notes": "cancelled by the test"})

        def child_holds_the_vpg() -> Any:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

            kids = api.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
            holder = store.runtime("erp").lock_holder
            op = store.operation(holder) if holder else None
            return kids and op is not None and op.kind == "test" and op.flow_run_id == str(kids[0].id) and kids[0]

        child = wait_for("the handed-over test holding erp", child_holds_the_vpg, 600, 1.0)
        api.set_flow_run_state(parent.id, Cancelling(message="cancelled by the test"), force=True)
        ended = wait_for("the handed-over run to end", lambda: (r := api.read_flow_run(child.id)).state.is_final()
                         and r, 300, 1.0)
        assert ended.state.is_cancelled(), f"{ended.state.type} {ended.state.message}\n{_tail(stack)}"
        messages = [s.message or "" for s in api.read_flow_run_states(child.id)]
        assert any(f"handed over from ({parent.name})" in m for m in messages), messages
        assert wait_for("the parent cancelled", lambda: (r := api.read_flow_run(parent.id)).state.is_final()
                        and r, 120, 1.0).state.is_cancelled()
        wait_for("erp released", lambda: store.runtime("erp").lock_holder is None, 120, 1.0)
        tests = [o for o in store.operations("erp", kind="test") if o.flow_run_id == str(child.id)]
        assert [o.result for o in tests] == ["cancelled"]
        assert recovery_site_state(lab.runtime()) == ([], [])
    finally:
        lab.control("siteB").boot_delay(100)
