"""Schedules that really fire: every deployment served (`python -m deployments.serve`,
schedules on) against a real Prefect server on loopback, with the replication and
monitor runs shortened to seconds through the environment (VMREP_REPLICATE_RUN_SECONDS,
VMREP_MONITOR_RUN_SECONDS). Nobody triggers a run: the scheduler must create a
replicate/erp and a monitor/every-minute run, and they must complete. The DR-test
schedule, computed from each VPG's `test_interval_months`, is read back from the API as
the scheduled runs the server made of it.

The runs are looked for by deployment through the API, so the test holds whether serve()
executes them or a worker of a pool does.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from dateutil.rrule import rrulestr

import serving
from serving import wait_for
from vmrep.replication import engine



@pytest.fixture
def served(lab, tmp_path):
    """erp synced (replication needs it), then a Prefect server and `serve` with schedules on."""
    rt = lab.runtime()
    engine.initial_sync(rt, rt.config.vpg("erp"))
    rt.store.update_runtime("erp", initial_sync_done=True)
    env = {"VMREP_REPLICATE_RUN_SECONDS": "20", "VMREP_MONITOR_RUN_SECONDS": "15"}
    with serving.served(lab.config_path, tmp_path, args=("--no-automations",), env=env) as stack:
        yield {**stack, "started": datetime.now(timezone.utc)}


def first_of_month_after(now: datetime, months: int = 1) -> datetime:
    y, m = divmod(now.month - 1 + months, 12)
    return datetime(now.year + y, m + 1, 1, tzinfo=timezone.utc)


@pytest.mark.timeout(900)
def test_replication_and_monitor_runs_start_by_themselves_and_dr_test_runs_are_scheduled(lab, served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def tail() -> str:
        return served["log"].read_text(errors="replace")[-3000:]

    with temporary_settings(updates={PREFECT_API_URL: served["srv"].api_url}), \
            get_client(sync_client=True) as client:
        def deployment(name: str):
            try:
                return client.read_deployment_by_name(name)
            except Exception:  # noqa: BLE001 - not registered yet
                assert served["proc"].poll() is None, f"serve exited:\n{tail()}"
                return None

        names = ("replicate/erp", "monitor/every-minute", "dr-test/dr-test")
        rep, mon, dr = wait_for("the deployments", lambda: (found := [deployment(n) for n in names])
                                and all(found) and found, 180)
        assert all(s.active for s in rep.schedules + mon.schedules + dr.schedules)

        def runs(dep, **kw):
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50, **kw)

        def completed(dep):
            assert served["proc"].poll() is None, f"serve exited:\n{tail()}"
            done = [r for r in runs(dep) if r.state is not None and r.state.is_final()]
            failed = [r for r in done if not r.state.is_completed()]
            assert not failed, f"{dep.name}: {failed[0].state.type} {failed[0].state.message}\n{tail()}"
            return done

        # Nobody asked for these runs: the scheduler made them, and they ran to the end.
        for dep in (mon, rep):
            [first, *_] = wait_for(f"a scheduled {dep.name} run to complete", lambda dep=dep: completed(dep), 600,
                                   every=2)
            assert first.auto_scheduled, first
            assert first.state.is_completed()
            assert first.start_time >= served["started"] - timedelta(seconds=1)
        # the monitor run made its pass: a sample of every VPG, written after serving began
        import pandas as pd

        samples = lab.runtime().store.frame("samples")
        fresh = samples[pd.to_datetime(samples["at"], utc=True) >= pd.Timestamp(served["started"])]
        assert set(fresh["vpg"]) >= {"erp", "files"}
        # the replicate run took a checkpoint of its own
        assert lab.runtime().journal.checkpoints("erp")[-1].time >= served["started"]

        # DR tests: every `test_interval_months` months on the 1st, 02:00 UTC for the first
        # VPG, 03:00 for the second; the server holds the next runs as Scheduled.
        vpgs = lab.runtime().config.vpgs
        now = datetime.now(timezone.utc)
        scheduled = wait_for("the scheduled DR tests", lambda: [
            r for r in runs(dr) if r.state and r.state.is_scheduled()], 60)
        assert {v.name for v in vpgs if v.test_interval_months != "off"} == {"erp", "files"}
        for index, v in enumerate(vpgs):
            if v.test_interval_months == "off":
                continue
            hour, months = 2 + index, int(v.test_interval_months)
            # the next run, as the server scheduled it
            times = sorted(r.expected_start_time for r in scheduled if r.parameters.get("vpg") == v.name)
            assert times and times[0] == first_of_month_after(now).replace(hour=hour), (v.name, times)
            # and the ones after it, from the schedule as the server holds it
            [sched] = [s for s in dr.schedules if (s.parameters or {}).get("vpg") == v.name]
            occurrences = [t.astimezone(timezone.utc) for t in rrulestr(sched.schedule.rrule)[:2]]
            assert occurrences == [times[0], first_of_month_after(now, 1 + months).replace(hour=hour)], \
                (v.name, months, sched.schedule.rrule)
