"""The monitor, scheduled every minute: one pass over every VPG, each alert and status
transition recorded and emitted as a Prefect event (resource `vmrep.vpg.<name>`), so a
Prefect automation can notify someone."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from tasks.common import step_options
from vmrep.health import emit_events
from vmrep.monitor import monitor_pass
from vmrep.runtime import get_runtime


@task(name="monitor-pass", **step_options(retries=2))
def run_pass(config: str, vpgs: list[str] | None = None) -> list[Any]:
    return monitor_pass(get_runtime(config), vpgs=vpgs)


@task(name="emit-events", **step_options(retries=2))
def emit(results: list[Any]) -> int:
    return len(emit_events(t for r in results for t in r.transitions))


@flow(name="monitor")
def monitor(config: str = "vmrep.yaml", vpgs: list[str] | None = None) -> list[dict[str, Any]]:
    """Judge every VPG: RPO, journal history, tests, configuration; raise and clear alerts."""
    results = run_pass(config, vpgs)
    emit(results)
    return [{"vpg": r.vpg, "status": r.evaluation.status, "substatus": r.evaluation.substatus,
             "rpo_seconds": r.evaluation.rpo_seconds, "alerts": sorted(r.evaluation.codes),
             "transitions": len(r.transitions)} for r in results]
