"""RPO across the hand-off from one replicate run to the next, through served deployments.

    .venv/bin/python bench/bench_handoff.py [--handoffs 20] [--period 30] [--interval 5]
                                            [--modes handoff,sequential,site]
    .venv/bin/python -m pytest -m slow bench/bench_handoff.py     # the same, asserted (slow: not in the default run)

The lab, a local Prefect server, and `python -m deployments.serve` (pools, vCenter limits,
one process worker per site) as `make server` runs them. The VPG `files` (1 VM) replicates
with a checkpoint every `--interval` seconds; a new run of `replicate/files` is created
every `--period` seconds as its schedule would (a shorter period than the 5 minutes of
the real schedule, so that 20 hand-offs fit in ~10 minutes).

- `handoff` (what the deployments do now): two runs may be active; the next run starts up
  while the last still cycles and takes over (flows/replicate.HandOff).
- `sequential` (before, for the side-by-side figure): each run ends before the next is
  due and the next starts when it has ended (the old concurrency limit of 1).
- `site`: the same hand-off as `handoff`, by runs of `replicate-site/siteA`
  (flows/replicate_site.py: every VPG of the site in one run; here the one VPG `files`).

Gaps are the differences between consecutive checkpoint times in the journal (the time a
checkpoint's consistency point was asked for); a hand-off gap is the one that spans the
end of a run. Printed per mode: hand-offs seen, median gap, largest hand-off gap, largest
gap; the JSON goes to bench/out/handoff.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VPG = "files"


def _wait(what: str, fn: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := fn()):
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def _client(api_url: str) -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def run_mode(mode: str, api: Any, dep_id: Any, rt: Any, handoffs: int, period: float, interval: float) -> dict:
    runs = []
    extra = {"site": "siteA"} if mode == "site" else {"vpg": VPG}
    first = rt.journal.checkpoints(VPG)[-1].time if rt.journal.checkpoints(VPG) else None
    for i in range(handoffs + 1):
        last = i == handoffs
        if mode in ("handoff", "site"):
            # the last run only needs to take over and take a few checkpoints
            secs = 3 * interval + 1 if last else period + 120
            runs.append(api.create_flow_run_from_deployment(dep_id, parameters={
                **extra, "for_seconds": secs, "interval_seconds": interval}))
            if not last:
                time.sleep(period)
        else:
            secs = 3 * interval + 1 if last else period - 5
            fr = api.create_flow_run_from_deployment(dep_id, parameters={
                "vpg": VPG, "for_seconds": secs, "interval_seconds": interval})
            runs.append(fr)
            _wait("the run", lambda fr=fr: api.read_flow_run(fr.id).state.is_final(), period + 300, 0.2)
    final = [_wait("the runs to end", lambda r=r: (x := api.read_flow_run(r.id)).state.is_final() and x,
                   period + 600, 1.0) for r in runs]
    bad = [f"{r.name}: {r.state.type} {r.state.message}" for r in final if not r.state.is_completed()]
    times = [c.time for c in rt.journal.checkpoints(VPG) if first is None or c.time > first]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    ends = [r.end_time for r in final[:-1]]  # each of these ended at a hand-off
    handoff_gaps = []
    for e in ends:
        for a, b in zip(times, times[1:], strict=False):
            if a <= e <= b:
                handoff_gaps.append((b - a).total_seconds())
                break
    return {"mode": mode, "runs": len(final), "failed": bad, "checkpoints": len(times),
            "handoffs": len(handoff_gaps), "median_gap": round(statistics.median(gaps), 2) if gaps else None,
            "max_handoff_gap": round(max(handoff_gaps), 2) if handoff_gaps else None,
            "max_gap": round(max(gaps), 2) if gaps else None,
            "handoff_gaps": [round(g, 2) for g in handoff_gaps], "interval": interval, "period": period}


def bench(handoffs: int = 20, period: float = 30.0, interval: float = 5.0,
          modes: tuple[str, ...] = ("handoff", "sequential"), out: Path | None = None) -> list[dict]:
    from deployments import server as srvmod
    from lab import manage
    from vmrep.replication import engine
    from vmrep.runtime import forget_runtime, get_runtime

    base = Path(tempfile.mkdtemp(prefix="vmrep-handoff-"))
    config = base / "vmrep.yaml"
    manage.up(base=base / "lab", config_path=config, boot_delay="200ms",
              database_url=f"sqlite:///{base / 'state.db'}")
    srv = proc = None
    results = []
    try:
        cfg = yaml.safe_load(config.read_text())
        cfg["vpgs"] = [v for v in cfg["vpgs"] if v["name"] == VPG]
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rt = get_runtime(config)
        engine.initial_sync(rt, rt.config.vpg(VPG), who="bench")
        srv = srvmod.start(base / "prefect", port=srvmod.free_port())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(srv.env(), PREFECT_HOME=str(base / "prefect-client"), VMREP_HOME=str(base / "home"),
                   PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="10")
        log = open(base / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--config", str(config),
                                 "--no-schedules", "--no-automations"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: srv.api_url}), _client(srv.api_url) as api:
            def dep(name: str) -> Any:
                try:
                    return api.read_deployment_by_name(name)
                except Exception:  # noqa: BLE001 - not yet registered
                    return None

            dep_id = _wait("the deployment", lambda: dep(f"replicate/{VPG}"), 300).id
            site_id = _wait("the site deployment", lambda: dep("replicate-site/siteA"), 300).id
            for mode in modes:
                r = run_mode(mode, api, site_id if mode == "site" else dep_id, rt, handoffs, period, interval)
                print(json.dumps({k: v for k, v in r.items() if k != "handoff_gaps"}), flush=True)
                results.append(r)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if srv is not None:
            srvmod.stop(srv)
        forget_runtime(config)
        manage.down(base=base / "lab")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "handoff.json").write_text(json.dumps(results, indent=2, default=str))
    return results


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_handoff_keeps_the_largest_gap_under_twice_the_interval() -> None:
    [r] = bench(handoffs=20, modes=("handoff",))
    assert not r["failed"] and r["handoffs"] >= 20
    assert r["max_handoff_gap"] < 2 * r["interval"], r  # the target; see bench/README.md for what we measured


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_site_run_handoff_keeps_the_largest_gap_under_twice_the_interval() -> None:
    [r] = bench(handoffs=20, modes=("site",))
    assert not r["failed"] and r["handoffs"] >= 20
    assert r["max_handoff_gap"] < 2 * r["interval"], r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handoffs", type=int, default=20)
    ap.add_argument("--period", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--modes", default="handoff,sequential", help="of handoff, sequential, site")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    a = ap.parse_args()
    bench(a.handoffs, a.period, a.interval, tuple(a.modes.split(",")), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
