"""Transitions become Prefect events, read back from the (session-wide) Prefect test server."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from tasks.monitoring import emit_events
from vmrep.config import VPG, VMSpec
from vmrep.health import Facts, apply_transitions, evaluate
from vmrep.state import StateStore, utcnow


def read_events(resource_id: str, since, want: int, timeout: float = 20.0) -> list:
    """Events of one resource, oldest first, once the server has persisted `want` of them."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(
        occurred=EventOccurredFilter(since=since - timedelta(minutes=1), until=utcnow()),
        resource=EventResourceFilter(id=[resource_id]),
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=flt, limit=50).events
            if len(events) >= want or time.monotonic() > deadline:
                return sorted(events, key=lambda e: (e.occurred, e.event))
            time.sleep(0.2)


def test_alert_and_status_transitions_are_emitted_and_read_back(prefect_harness, tmp_path) -> None:
    name = f"erp-{uuid.uuid4().hex[:8]}"  # the harness is shared: a resource of our own
    cfg = VPG(name=name, protected_site="a", recovery_site="b", vms=[VMSpec(name="erp-db")],
              rpo_target_seconds=300, test_interval_months="off")  # fmt: skip
    start = utcnow().replace(microsecond=0) - timedelta(minutes=10)  # the API hides future events

    def facts(minute: int, rpo: int) -> Facts:
        now = start + timedelta(minutes=minute)
        return Facts(now=now, newest_checkpoint_at=now - timedelta(seconds=rpo),
                     oldest_checkpoint_at=now - timedelta(hours=24),
                     first_checkpoint_at=now - timedelta(days=3), initial_sync_done=True)  # fmt: skip

    transitions = []
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        for minute, rpo in ((0, 10), (1, 400), (2, 10)):
            f = facts(minute, rpo)
            transitions += apply_transitions(store, name, evaluate(cfg, f), f.now)
    assert [(t.kind, t.code or t.status) for t in transitions] == [
        ("status", "MeetingSLA"),
        ("status", "RpoNotMeetingSLA"),
        ("raised", "RPO_OVER_TARGET"),
        ("status", "MeetingSLA"),
        ("cleared", "RPO_OVER_TARGET"),
    ]

    emitted = emit_events(transitions)
    # one event per transition, in order, each the one the API hands back below
    assert [(e.event, e.occurred) for e in emitted] == [
        (f"vmrep.{'vpg.status-changed' if t.kind == 'status' else 'alert.' + t.kind}", t.at) for t in transitions]

    events = read_events(f"vmrep.vpg.{name}", start, want=5)
    assert {e.id for e in events} == {e.id for e in emitted}
    got = [(e.event, e.occurred - start) for e in events]
    assert got == [
        ("vmrep.vpg.status-changed", timedelta(0)),
        ("vmrep.alert.raised", timedelta(minutes=1)),
        ("vmrep.vpg.status-changed", timedelta(minutes=1)),
        ("vmrep.alert.cleared", timedelta(minutes=2)),
        ("vmrep.vpg.status-changed", timedelta(minutes=2)),
    ]
    raised = events[1]
    assert raised.resource.id == f"vmrep.vpg.{name}"
    assert raised.resource["prefect.resource.name"] == name
    assert {k: raised.payload[k] for k in ("code", "level", "vm")} == {
        "code": "RPO_OVER_TARGET",
        "level": "warning",
        "vm": None,
    }
    assert raised.payload["text"].startswith(f"VPG {name}: RPO 400 s is over the target")
    assert events[2].payload["status"] == "RpoNotMeetingSLA"
    assert events[2].payload["previous_status"] == "MeetingSLA"
    assert events[0].payload["previous_status"] == "Initializing"
