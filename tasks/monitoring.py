"""The monitor's tasks and its Prefect events: the engine (`vmrep.monitor`,
`vmrep.health`) judges each VPG and records the transitions; this module, on the
control plane, turns each transition into a Prefect event so an automation can act.

Events, all on resource ``vmrep.vpg.<vpg>`` (name ``<vpg>``):

    vmrep.alert.raised / vmrep.alert.cleared   code, level, text, vm, subject, alert_id
    vmrep.vpg.status-changed                   status, substatus, previous_status,
                                               previous_substatus, detail
"""

from __future__ import annotations

from typing import Any, Iterable

from prefect import task
from prefect.events import Event, emit_event

from tasks.common import step_options
from vmrep.health import Transition
from vmrep.monitor import VpgHealth, monitor_pass
from vmrep.runtime import get_runtime


def event_of(t: Transition) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The event name, resource and payload of one transition."""
    resource = {"prefect.resource.id": f"vmrep.vpg.{t.vpg}", "prefect.resource.name": t.vpg}
    if t.kind == "status":
        return "vmrep.vpg.status-changed", resource, {
            "status": t.status,
            "substatus": t.substatus,
            "previous_status": t.previous_status,
            "previous_substatus": t.previous_substatus,
            "detail": t.detail,
        }
    return f"vmrep.alert.{t.kind}", resource, {"code": t.code, "level": t.level, "text": t.text, "vm": t.vm,
                                               "subject": t.subject, "alert_id": t.alert_id}  # fmt: skip


def emit_events(transitions: Iterable[Transition]) -> list[Event | None]:
    """One Prefect event per transition, at the transition's time. Returns the events
    (None where Prefect dropped one).

    Call it inside a flow or task, or with PREFECT_API_URL set: outside of both, Prefect
    starts a temporary server (~10 s) to receive the events.
    """
    events = []
    for t in transitions:
        name, resource, payload = event_of(t)
        events.append(emit_event(event=name, resource=resource, payload=payload, occurred=t.at))
    return events


@task(name="monitor-pass", **step_options(retries=2))
def run_pass(config: str, vpgs: list[str] | None = None) -> list[VpgHealth]:
    return monitor_pass(get_runtime(config), vpgs=vpgs)


@task(name="emit-events", **step_options(retries=2))
def emit(results: list[VpgHealth]) -> int:
    return len(emit_events(t for r in results for t in r.transitions))
