"""The alert automation: when the monitor raises an alert, email the VPG's owners.

The monitor emits an event `vmrep.alert.raised` for every alert it raises, on the
resource `vmrep.vpg.<vpg>` (payload: code, level, text, vm, alert_id). Prefect's
open-source server has no SMTP notification block, so the automation runs the
`notify/notify` deployment (flows/reports.py), which sends the email through the same
mailer as the reports (retried, recorded in email_deliveries).

    python -m deployments.automations          # create or update it (serve does this too)

Created by code so that it is the same everywhere; it also shows in the UI under
Automations, where it can be paused or copied (e.g. only `level: error`, or a Slack
webhook action instead).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

AUTOMATION_NAME = "vmrep alert email"
NOTIFY_DEPLOYMENT = "notify/notify"
EVENT = "vmrep.alert.raised"
RESOURCE = "vmrep.vpg.*"

# Jinja templates rendered by the server with the triggering event.
NOTIFY_PARAMETERS = {
    "vpg": "{{ event.resource.name }}",
    "subject": "VPG {{ event.resource.name }}: {{ event.payload.level }} {{ event.payload.code }}",
    "text": "{{ event.payload.text }}",
    "event": "{{ event.event }}",
    "occurred": "{{ event.occurred | string }}",
    "alert_id": "{{ event.payload.alert_id }}",
}


def alert_email_automation(notify_deployment_id: Any) -> Any:
    """The automation object (not yet created): EventTrigger on vmrep.alert.raised for any
    VPG -> RunDeployment of notify with the event's fields as parameters."""
    from prefect.automations import Automation, EventTrigger, RunDeployment
    from prefect.events.schemas.automations import Posture

    trigger = EventTrigger(
        expect={EVENT},
        match={"prefect.resource.id": RESOURCE},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )
    action = RunDeployment(source="selected", deployment_id=notify_deployment_id,
                           parameters=dict(NOTIFY_PARAMETERS))
    return Automation(
        name=AUTOMATION_NAME,
        description="When the vmrep monitor raises an alert on a VPG (RPO over target, journal history short, "
                    "test overdue, awaiting commit, ...), email the VPG's email_to and notifications.default_to "
                    "by running the notify deployment.",
        trigger=trigger,
        actions=[action],
        enabled=True,
    )


def ensure_alert_email(notify_deployment: str = NOTIFY_DEPLOYMENT) -> Any:
    """Create the automation, or replace an existing one of the same name (so a changed
    definition or a re-created notify deployment is picked up). Returns it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(notify_deployment)
        for old in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(old.id)
    return alert_email_automation(dep.id).create()


def main() -> int:
    auto = ensure_alert_email()
    print(f"automation {auto.name!r} ({auto.id}): {EVENT} on {RESOURCE} -> run {NOTIFY_DEPLOYMENT}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
