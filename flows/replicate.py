"""Continuous replication: cycles back to back for a bounded time or count, so a
deployment can run it again right after. Each cycle is `engine.run_cycle` with its
steps as task runs; the cycle's wall time is returned next to its slowest transfer, so
the Prefect overhead of each cycle is visible."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.replication import PrefectRunner
from vmrep.replication import engine
from vmrep.runtime import get_runtime


def run_cycle(config: str, vpg: str, tag: str | None = None) -> dict[str, Any]:
    rt = get_runtime(config)
    return engine.run_cycle(rt, rt.config.vpg(vpg), tag=tag, runner=PrefectRunner()).summary()


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
