"""Helpers the flows share: the flow run's id, waiting on futures so none fails unseen
(who started a run is `vmrep.stamps.started_by`, as everywhere), handing a run to its
site's deployment, and emitting what a run recorded as Prefect events when it ends."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tasks.common import wait_all  # re-exported: the flows wait as the tasks do
from tasks.monitoring import emit_outbox, emit_recorded
from vmrep.errors import VmrepError

__all__ = ["cancel_handed_over", "drain_events", "emitting", "flow_run_id", "hand_off", "problem_lines",
           "wait_all"]

log = logging.getLogger(__name__)


@contextmanager
def emitting(config: str, *, as_task: bool = True) -> Iterator[None]:
    """Around the body of every flow that changes alerts or statuses (tests, failovers,
    moves, commits, rollbacks, syncs, replication): when it ends, passed or failed, the
    transitions recorded meanwhile (the state store's event outbox) go out as Prefect
    events, so an automation hears of e.g. TEST_OVERDUE cleared by a test now, not at
    the next monitor pass. One task run (`emit-events`) whose failure never hides the
    run's own outcome; after a cancel or crash no task may start, so the flows' hooks
    drain instead (`drain_events`). `as_task` False: drained in the flow's own code, no
    task run (replication: a task run at the end of each run would widen the RPO gap
    where one run hands over to the next, which waits for it to end)."""

    def drain() -> None:
        if as_task:
            emit_recorded(config, return_state=True)
        else:
            drain_events(config)

    try:
        yield
    except Exception:
        drain()
        raise
    except BaseException:
        raise  # cancelled or crashed: the on_cancellation / on_crashed hook drains
    drain()


def drain_events(config: str) -> None:
    """The outbox emitted now, without a task run: for the flows' cancel and crash hooks,
    where the run's orchestration is over. Never raises (the monitor drains what is left)."""
    try:
        from vmrep.runtime import get_runtime

        emit_outbox(get_runtime(config).store)
    except Exception as exc:  # noqa: BLE001 - the next monitor pass sends what is left
        log.warning("events not emitted after the run ended: %s", exc)


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


def cancel_handed_over(flow: Any, flow_run: Any, state: Any) -> list[str]:
    """on_cancellation of every flow that may hand over (`hand_off`): the run a cancelled
    UI entry handed over to (its subflow, on the site's pool) is cancelled too, instead of
    going on unseen. A running child is set Cancelling, so its worker ends its process and
    runs its own cancellation hook (a test's VMs removed, the VPG released); a child not
    started yet is set Cancelled. Returns the ids of the runs cancelled; never raises (a
    child left running still ends by itself, and the monitor cleans up after dead owners)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Cancelled, Cancelling

    done: list[str] = []
    why = f"the run it was handed over from ({flow_run.name}) was cancelled"
    try:
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
            for child in children:
                st = child.state
                if st is None or st.is_final() or st.is_cancelling():
                    continue
                new = Cancelled(message=why) if st.is_scheduled() or st.is_pending() else Cancelling(message=why)
                client.set_flow_run_state(child.id, new, force=True)
                log.warning("flow run %s cancelled: %s", child.name, why)
                done.append(str(child.id))
    except Exception as exc:  # noqa: BLE001 - a hook must not fail the cancellation itself
        log.error("the run(s) %s handed over to were not cancelled: %s", flow_run.name, exc)
    return done
