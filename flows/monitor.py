"""The monitor, scheduled every minute: one pass over every VPG, each alert and status
transition recorded and emitted as a Prefect event (resource `vmrep.vpg.<name>`, see
tasks.monitoring), so a Prefect automation can notify someone."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.monitoring import emit, run_pass


@flow(name="monitor")
def monitor(config: str = "vmrep.yaml", vpgs: list[str] | None = None) -> list[dict[str, Any]]:
    """Judge every VPG: RPO, journal history, tests, configuration; raise and clear alerts."""
    results = run_pass(config, vpgs)
    emit(results)
    return [{"vpg": r.vpg, "status": r.evaluation.status, "substatus": r.evaluation.substatus,
             "rpo_seconds": r.evaluation.rpo_seconds, "alerts": sorted(r.evaluation.codes),
             "transitions": len(r.transitions)} for r in results]
