"""Continuous replication: cycles back to back for a bounded time or count, so a
deployment can run it again right after. Each cycle's Prefect overhead (wall time of
the cycle minus the time spent inside its steps on the critical path) is measured and
returned with the cycle."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import wait_all
from tasks import replication as t
from vmrep.replication import engine
from vmrep.runtime import get_runtime


def run_cycle(config: str, vpg: str, tag: str | None = None) -> dict[str, Any]:
    rt = get_runtime(config)
    t0 = time.monotonic()
    vms = t.read_vpg_inventory(config, vpg)
    t.release_consistency_points(config, vpg)  # what a crashed cycle may have left
    previous = engine.latest_checkpoint_id(rt, vpg)
    committed = None
    try:
        at = t.consistency_point(config, vpg, vms)
        futures = [t.transfer_vm.submit(config, vpg, vm, previous) for vm in vms.values()]
        stats = wait_all(futures)
        committed = t.commit_checkpoint(config, vpg, at, tag, {"kind": "cycle", "previous": previous})
    finally:
        if committed is None:
            engine.close_writer(rt, vpg, commit=False)
        t.release_consistency_points(config, vpg)
    t.apply_retention(config, vpg)
    wall = time.monotonic() - t0
    return {"vpg": vpg, "checkpoint": committed["id"], "time": committed["time"].isoformat(),
            "bytes_read": sum(s["bytes_read"] for s in stats),
            "bytes_stored": sum(s["bytes_stored"] for s in stats),
            "blocks_changed": sum(s["blocks_changed"] for s in stats),
            "seconds": round(wall, 3),
            # the slowest VM's transfer: the cycle's own work on its critical path
            "transfer_seconds": round(max((s["seconds"] for s in stats), default=0.0), 3)}


@flow(name="replicate", task_runner=ThreadPoolTaskRunner(max_workers=4))
def replicate(vpg: str, config: str = "vmrep.yaml", cycles: int | None = None,
              for_seconds: float | None = None, interval_seconds: float = 10.0) -> list[dict[str, Any]]:
    """Replicate a VPG: cycles every `interval_seconds`, `cycles` times or for `for_seconds`."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    engine.ensure_replicable(rt, v)
    if cycles is None and for_seconds is None:
        cycles = 1
    log = get_run_logger()
    start = time.monotonic()
    out: list[dict[str, Any]] = []
    while True:
        c0 = time.monotonic()
        out.append(run_cycle(config, vpg))
        log.info("VPG %s: checkpoint %s, %d blocks changed, %.2fs", vpg, out[-1]["checkpoint"],
                 out[-1]["blocks_changed"], out[-1]["seconds"])
        if cycles is not None and len(out) >= cycles:
            break
        if for_seconds is not None and time.monotonic() - start + interval_seconds > for_seconds:
            break
        time.sleep(max(0.0, interval_seconds - (time.monotonic() - c0)))
    return out
