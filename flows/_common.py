"""Helpers the flows share: the flow run's id, waiting on futures so none fails unseen
(who started a run is `vmrep.stamps.started_by`, as everywhere)."""

from __future__ import annotations

from typing import Any

from tasks.common import wait_all  # re-exported: the flows wait as the tasks do
from vmrep.errors import VmrepError

__all__ = ["flow_run_id", "hand_off", "problem_lines", "wait_all"]


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a run there is no id
        return None


def problem_lines(problems: list[Any]) -> VmrepError:
    lines = [p.line() for p in problems]
    return VmrepError("; ".join(lines), lines=lines)


def hand_off(config: str, vpg: str, role: str) -> dict[str, Any] | None:
    """Run this flow where the VPG's data is: on the work pool of its `role` site
    ("protected" or "recovery").

    A UI entry such as `dr-test/dr-test` serves the VPGs of every site but has one work
    pool; its run hands over here to the per-site deployment `<flow>/<site>` (on pool
    `vmrep-<site>`, see deployments/serve.py) through `run_deployment` with the same
    parameters, waits for it (a subflow in the UI) and returns where it ran. Returns None
    when this run is already where it belongs: outside a deployment (the CLI runs flows in
    its own process) or in the deployment named after the VPG's site. A handed-over run
    that does not complete fails this one with one line naming it."""
    from prefect.runtime import deployment, flow_run

    here = deployment.name
    if not here:
        return None
    from vmrep.runtime import get_runtime

    v = get_runtime(config).config.vpg(vpg)
    site = v.protected_site if role == "protected" else v.recovery_site
    if here == site:
        return None
    from prefect.deployments import run_deployment

    target = f"{flow_run.flow_name}/{site}"
    child = run_deployment(target, parameters=dict(flow_run.parameters or {}), timeout=None, poll_interval=1,
                           tags=[f"handed-over-from:{here}"])
    state = child.state
    out = {"vpg": vpg, "handed_over_to": target, "flow_run": str(child.id), "flow_run_name": child.name,
           "work_pool": child.work_pool_name, "state": state.name if state else None}
    if state is None or not state.is_completed():
        reason = (state.message or state.name) if state else "no state"
        raise VmrepError(f"VPG {vpg}: {target} run {child.name} did not complete: {reason}")
    return out
