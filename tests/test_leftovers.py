"""Replication snapshots of a dead cycle, removed by the next monitor pass (issue 11 §3),
against the two-site lab: a `vmrep replicate` SIGKILLed mid-transfer leaves its
snapshots on the source VMs; one monitor pass removes them and the next cycle works. A
live cycle's snapshots are never removed: neither while it transfers (another process),
nor in the windows before its first transfer and after its commit (in this process: the
writer lock is per open file, so it tells a pass apart from a cycle here too).

The transfer is slowed as in test_cli_signals: the disks read over the datastore's HTTP
interface (no mounts, no CBT: every block read) with a delay on every GET.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from test_recovery import synced
from vmrep.monitor import monitor_pass
from vmrep.replication import engine
from vmrep.replication.steps import STEPS
from vmrep.runner import DirectRunner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(lab, prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """erp synced, and a config reading disks over HTTP without CBT (slowed down by a fault)."""
    synced(lab.runtime(), "erp")
    home = tmp_path_factory.mktemp("home")
    data = yaml.safe_load(lab.config_path.read_text())
    for site in data["sites"].values():
        site.pop("datastore_mounts", None)
    for vpg in data["vpgs"]:
        vpg["change_tracking"] = "off"
    slow = home / "over-http.yaml"
    slow.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VMREP_"))}
    env.update(VMREP_HOME=str(home), PREFECT_HOME=str(home / "prefect-client"), PREFECT_API_URL=prefect_harness,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONPATH=str(REPO))
    yield {"env": env, "slow": str(slow)}
    lab.control("siteA").clear_faults()


def snapshots(lab) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """vmrep's snapshots on each of erp's source VMs (read afresh)."""
    vms = lab.runtime().inventory("siteA").vms_by_name()
    return {s.name: [n for n, _ in vms[s.name].snapshots if n.startswith("vmrep-")]
            for s in lab.config.vpg("erp").vms}


def start_slowed_cycle(lab, setup: dict[str, Any]) -> subprocess.Popen:  # type: ignore[no-untyped-def,type-arg]
    """`vmrep replicate erp --cycles 1` in a process of its own, returned once its transfer
    is well under way (the VMs' snapshots taken, blocks being read)."""
    ctl = lab.control("siteA")
    ctl.clear_faults()
    ctl.fault("DatastoreFile.GET", "delay", delay_ms=300, count=0)
    ctl.reset_calls()
    proc = subprocess.Popen([sys.executable, "-c", "from vmrep.cli import entry; entry()", "replicate", "erp",
                             "--cycles", "1", "-c", setup["slow"]], cwd=REPO, env=setup["env"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while ctl.calls().get("DatastoreFile.GET", 0) < 4:
        if proc.poll() is not None:
            pytest.fail(f"the cycle ended early: {proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, "the transfer did not start"
        time.sleep(0.1)
    return proc


def kill(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no finally, no hook runs
    except ProcessLookupError:
        pass
    proc.wait()


def test_a_killed_cycles_snapshots_are_removed_by_the_next_monitor_pass(lab, setup) -> None:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    before = [c.id for c in rt.journal.checkpoints("erp")]
    proc = start_slowed_cycle(lab, setup)
    try:
        assert all(s == ["vmrep-cp-erp"] for s in snapshots(lab).values()), snapshots(lab)
    finally:
        kill(proc)
    lab.control("siteA").clear_faults()
    assert all(s == ["vmrep-cp-erp"] for s in snapshots(lab).values())  # the crash left them
    assert [c.id for c in rt.journal.checkpoints("erp")] == before
    monitor_pass(rt, vpgs=["erp"])
    assert all(not s for s in snapshots(lab).values()), snapshots(lab)
    r = engine.run_cycle(rt, rt.config.vpg("erp"))  # the next cycle works
    assert [c.id for c in rt.journal.checkpoints("erp")] == [*before, r.checkpoint_id]
    assert all(not s for s in snapshots(lab).values())


def test_a_live_cycles_snapshots_are_left_alone(lab, setup) -> None:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    proc = start_slowed_cycle(lab, setup)
    try:
        monitor_pass(rt, vpgs=["erp"])  # the cycle holds the writer lock: nothing is touched
        assert all(s == ["vmrep-cp-erp"] for s in snapshots(lab).values()), snapshots(lab)
        lab.control("siteA").clear_faults()  # let it finish
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill(proc)
    assert all(not s for s in snapshots(lab).values())


class PassBetweenSteps(DirectRunner):
    """The replication steps, with a monitor pass right after the steps named: where a
    pass would find a cycle's snapshots with no transfer running."""

    def __init__(self, rt: Any, after: set[str]) -> None:
        super().__init__(STEPS)
        self.rt, self.after, self.seen = rt, after, {}  # type: dict[str, dict[str, list[str]]]

    def one(self, step: str, *args: Any) -> Any:
        out = super().one(step, *args)
        if step in self.after:
            monitor_pass(self.rt, vpgs=["erp"])
            vms = self.rt.inventory("siteA").vms_by_name()
            self.seen[step] = {s.name: [n for n, _ in vms[s.name].snapshots if n.startswith("vmrep-")]
                               for s in self.rt.config.vpg("erp").vms}
        return out


def test_a_pass_between_a_cycles_steps_leaves_its_snapshots(lab, setup) -> None:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    runner = PassBetweenSteps(rt, {"consistency-point", "commit-checkpoint"})
    engine.run_cycle(rt, rt.config.vpg("erp"), runner=runner, verify_source=True)
    for step in ("consistency-point", "commit-checkpoint"):
        assert all(s == ["vmrep-cp-erp"] for s in runner.seen[step].values()), (step, runner.seen)
    assert all(not s for s in snapshots(lab).values())
