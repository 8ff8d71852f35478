"""One run replicates every VPG of a site (flows/replicate_site.py), in-process under a
Prefect test server, against the two-site lab:

- the two VPGs of siteA (erp every 5 s, files every 10 s: their RPO targets / 6) both get
  checkpoints, each at its own interval, by one flow run, one `vpg-cycle` task run per cycle;
- no two cycles of one VPG ever overlap (the task runs' times, read from the API);
- a VPG whose snapshots fail (the lab refuses erp's CreateSnapshot) fails its cycles with
  one line in its task's log, and files goes on cycling.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def site_config(lab, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from vmrep.replication import engine
    from vmrep.runtime import get_runtime

    tmp = tmp_path_factory.mktemp("site")
    cfg = yaml.safe_load(lab.config_path.read_text())
    cfg["database_url"] = f"sqlite:///{tmp / 'state.db'}"
    cfg["journal"] = {"path": str(tmp / "journal")}  # local journal: no service needed here
    for v in cfg["vpgs"]:
        v["recovery_site"] = "siteA" if v["name"] == "files" else v["recovery_site"]
        v["rpo_target_seconds"] = {"erp": 30, "files": 60}[v["name"]]
    path = tmp / "vmrep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rt = get_runtime(path)
    for v in rt.config.vpgs:
        engine.initial_sync(rt, v, who="test")
    return path


def _cycle_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if r.name.startswith("vpg-cycle-")]


def _eventually(fn: Any, n: int, timeout: float = 30.0) -> Any:
    """fn() once it returns at least n items (or what it returns at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if len(got) >= n or time.monotonic() > deadline:
            assert len(got) == n, got
            return got
        time.sleep(0.5)


def _logs(task_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as c:
        return [log.message for log in c.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
            any_=[task_run_id])))]


def test_one_run_cycles_each_vpg_at_its_interval_without_two_writers(site_config, prefect_harness) -> None:  # type: ignore[no-untyped-def]
    from flows.replicate_site import replicate_site
    from vmrep.runtime import get_runtime

    rt = get_runtime(site_config)
    before = {v: {c.id for c in rt.journal.checkpoints(v)} for v in ("erp", "files")}
    state = replicate_site("siteA", str(site_config), for_seconds=26, return_state=True)
    done = state.result()
    assert done["erp"]["failed"] == 0 and done["files"]["failed"] == 0, done
    for v in ("erp", "files"):
        new = [c for c in rt.journal.checkpoints(v) if c.id not in before[v]]
        assert len(new) == done[v]["cycles"] >= 2, (v, len(new), done)
    # One task run per cycle, and never two cycles of one VPG at once; each VPG's next
    # cycle starts at its own interval after the last one started, or when the last one
    # ended if it overran that. Judged from the task runs' own times, not from how long the
    # cycles took (a loaded machine makes them slower, and then a mean of the checkpoint
    # gaps failed without anything being wrong). A task run starts a moment after the loop
    # submits it, and that moment varies: hence the slack either side.
    runs = _eventually(lambda: [r for r in _cycle_runs(state.state_details.flow_run_id) if r.end_time is not None],
                       done["erp"]["cycles"] + done["files"]["cycles"])
    for v, every in (("erp", 5.0), ("files", 10.0)):
        mine = sorted((r.start_time, r.end_time) for r in runs if r.name == f"vpg-cycle-{v}")
        assert len(mine) == done[v]["cycles"]
        for (s0, e0), (s1, _) in zip(mine, mine[1:], strict=False):
            assert e0 <= s1, (v, mine)  # never two writers
            since_start = (s1 - s0).total_seconds()
            late = since_start - max(every, (e0 - s0).total_seconds())
            # Not early (erp's 5 s is not files' interval, nor back to back), and not waiting
            # longer than its own interval (files' 10 s is not erp's).
            assert since_start >= every - 1.5, (v, since_start, mine)
            assert late <= 4.0, (v, late, mine)


def test_a_failing_vpg_does_not_stop_the_other(site_config, lab, prefect_harness) -> None:  # type: ignore[no-untyped-def]
    from flows.replicate_site import replicate_site
    from vmrep.replication.points import snapshot_label
    from vmrep.runtime import get_runtime

    rt = get_runtime(site_config)
    before = {v: len(rt.journal.checkpoints(v)) for v in ("erp", "files")}
    ctl = lab.control("siteA")
    ctl.fault("CreateSnapshot_Task", "fault", "InvalidArgument", count=0, match=snapshot_label("erp"))
    try:
        state = replicate_site("siteA", str(site_config), cycles=3, interval_seconds=1, return_state=True)
    finally:
        ctl.clear_faults()
    done = state.result()
    assert done["files"] == {"cycles": 3, "failed": 0, "last_error": None}, done
    assert done["erp"]["cycles"] == 0 and done["erp"]["failed"] == 3, done
    assert len(rt.journal.checkpoints("files")) == before["files"] + 3
    assert len(rt.journal.checkpoints("erp")) == before["erp"]
    # task runs and their logs reach the API as events and log batches: a moment later
    failed = _eventually(lambda: [r for r in _cycle_runs(state.state_details.flow_run_id)
                                  if r.name == "vpg-cycle-erp" and r.state is not None and r.state.is_failed()], 3)
    lines = _eventually(lambda: [m for m in _logs(failed[0].id) if m.startswith("VPG erp: cycle failed: ")], 1)
    assert len(lines) == 1 and "\n" not in lines[0], _logs(failed[0].id)


def test_the_named_read_gives_what_the_site_read_gives(site_config, lab) -> None:  # type: ignore[no-untyped-def]
    """engine.vpg_vms reads only the VPG's VMs by id; it must give what the whole-site read
    gives, and follow a VM renamed after its id was cached."""
    from vmrep.errors import NotFound
    from vmrep.replication import engine
    from vmrep.runtime import get_runtime
    from vmrep.vsphere.task import run_task

    rt = get_runtime(site_config)
    for v in rt.config.vpgs:
        whole = rt.inventory(v.protected_site).vms_by_name()
        named = engine.vpg_vms(rt, v)
        assert list(named) == [vm.name for vm in v.vms]
        for n in named:
            a, b = whole[n], named[n]
            assert (a.ref._moId, a.disks, a.nics, a.snapshots, a.power_state, a.ip) == \
                   (b.ref._moId, b.disks, b.nics, b.snapshots, b.power_state, b.ip), n
    files = rt.config.vpg("files")

    def naming(name: str) -> Any:
        return files.model_copy(update={"vms": [files.vms[0].model_copy(update={"name": name})]})

    with pytest.raises(NotFound, match=r"^VPG files: VM no-such-vm not found at protected site siteA$"):
        engine.vpg_vms(rt, naming("no-such-vm"))
    # the id map is cached now; a rename must be followed, not served from the stale map
    client = rt.client(files.protected_site)
    old = files.vms[0].name
    ref = engine.vpg_vms(rt, files)[old].ref
    run_task(client, "rename", ref.Rename_Task, newName=f"{old}-renamed")
    try:
        with pytest.raises(NotFound, match=f"VM {old} not found"):
            engine.vpg_vms(rt, files)
        assert engine.vpg_vms(rt, naming(f"{old}-renamed"))[f"{old}-renamed"].ref._moId == ref._moId
    finally:
        run_task(client, "rename back", ref.Rename_Task, newName=old)
    assert engine.vpg_vms(rt, files)[old].ref._moId == ref._moId
