"""The monitor's tasks and its Prefect events: the engine (`vmrep.monitor`,
`vmrep.health`) judges each VPG and records the transitions; this module, on the
control plane, turns each transition into a Prefect event so an automation can act.

Every alert raised or cleared and every status change, whoever records it (the monitor,
a failover raising AWAITING_COMMIT, a commit, rollback or commit policy clearing it, a
test's clean-up), is written by `StateStore` into the `event_outbox` table in the same
transaction; `emit_recorded` drains it. The monitor flow drains it every pass and every
flow that records transitions when it ends (`flows/_common.emitting`; their cancel and
crash hooks through `emit_outbox`), so an event is sent at once where Prefect runs, and
within a minute where it did not (a `--direct` command).

Events, all on resource ``vmrep.vpg.<vpg>`` (name ``<vpg>``):

    vmrep.alert.raised / vmrep.alert.cleared   code, level, text, vm, subject, alert_id
    vmrep.vpg.status-changed                   status, substatus, previous_status,
                                               previous_substatus, detail
"""

from __future__ import annotations

from typing import Any, Iterable

from prefect import task
from prefect.events import Event, emit_event

from datetime import timedelta

from tasks.common import step_options
from vmrep.health import Transition
from vmrep.monitor import VpgHealth, monitor_pass
from vmrep.runtime import get_runtime
from vmrep.stamps import utcnow
from vmrep.state import EventOutbox, StateStore

# Emitted transitions are kept this long in the outbox (the alerts and status history
# keep the record for good): long enough to see what was sent when something is asked.
OUTBOX_KEEP = timedelta(days=7)


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


def transition_of(row: EventOutbox) -> Transition:
    """The transition an outbox row records (its payload holds `Transition`'s fields)."""
    fields = set(Transition.__dataclass_fields__) - {"kind", "vpg", "at"}
    return Transition(row.kind, row.vpg, row.at, **{k: v for k, v in (row.payload or {}).items()  # type: ignore[arg-type]
                                                    if k in fields})


def emit_outbox(store: StateStore, batch: int = 500) -> int:
    """Emit every recorded transition not emitted yet, oldest first; returns how many.
    Rows are claimed before they are sent (two emitters never send one twice); what
    could not be sent is given back for the next drain."""
    total = 0
    while True:
        rows = store.claim_events(batch)
        if not rows:
            break
        sent: set[int] = set()
        try:
            for row in rows:
                emit_events([transition_of(row)])
                sent.add(row.id)
        finally:
            store.unclaim_events(r.id for r in rows if r.id not in sent)
        total += len(rows)
        if len(rows) < batch:
            break
    store.purge_events(utcnow() - OUTBOX_KEEP)
    return total


@task(name="monitor-pass", **step_options(retries=2))
def run_pass(config: str, vpgs: list[str] | None = None) -> list[VpgHealth]:
    return monitor_pass(get_runtime(config), vpgs=vpgs)


@task(name="emit-events", **step_options(retries=2))
def emit_recorded(config: str) -> int:
    """Every alert and status transition recorded since the last drain, as events."""
    return emit_outbox(get_runtime(config).store)
