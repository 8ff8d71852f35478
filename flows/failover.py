"""Live failover, commit and rollback.

`failover` recovers on the production network and returns once the VMs are up and
verified and the VPG awaits commit; a commit or rollback policy leaves its deadline in
the state database, where the monitor pass applies it (vmrep.recovery.policy), whether
or not this run still exists. `commit` and `rollback` end a failover or move awaiting
commit. Each flow ends by emitting the alert and status transitions it recorded
(AWAITING_COMMIT raised, cleared) as Prefect events. The confirmation parameter must
repeat the VPG's name, so a stray click in the UI cannot start a failover; a VPG with
`approval: required` also waits for a second person's approval in the UI
(flows/approval.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import emitting, flow_run_id, hand_off
from flows.approval import DEFAULT_TIMEOUT_MINUTES, gate
from flows.dr_test import interrupted
from tasks.recovery import PrefectRunner
from vmrep.recovery import operations as ops
from vmrep.stamps import started_by


@flow(name="failover", task_runner=ThreadPoolTaskRunner(max_workers=8),
      on_cancellation=[interrupted], on_crashed=[interrupted])
def failover(vpg: str, confirm: str, config: str = "vmrep.yaml", checkpoint: str = "latest",
             shutdown: str | None = None, commit_policy: str | None = None,
             commit_after_minutes: float | None = None, who: str | None = None,
             verify_timeout: float = 600.0, shutdown_timeout: float = 300.0,
             approval_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> dict[str, Any]:
    """Live failover of a VPG (confirm: the VPG's name again); waits for approval in the
    UI first when the VPG says `approval: required`."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    logger = get_run_logger()
    requested_by = started_by(who, fallback="prefect")
    approval = gate(config, vpg, "failover", confirm, requested_by, approval_timeout_minutes)
    with emitting(config):
        return ops.run_failover(config, vpg, confirm=confirm, checkpoint=checkpoint, shutdown=shutdown,
                                commit_policy=commit_policy, commit_after_minutes=commit_after_minutes,
                                who=requested_by, flow_run_id=flow_run_id(),
                                runner=PrefectRunner(), verify_timeout=verify_timeout,
                                shutdown_timeout=shutdown_timeout, notify=logger.warning, approval=approval)


@flow(name="commit", task_runner=ThreadPoolTaskRunner(max_workers=8),
      on_cancellation=[interrupted], on_crashed=[interrupted])
def commit(vpg: str, config: str = "vmrep.yaml", reverse_protection: bool = False,
           who: str | None = None) -> dict[str, Any]:
    """Commit the failover awaiting commit; with reverse protection, protect back."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    with emitting(config):
        return ops.commit(config, vpg, reverse_protection=reverse_protection,
                          who=started_by(who, fallback="prefect"), flow_run_id=flow_run_id(), runner=PrefectRunner())


@flow(name="rollback", task_runner=ThreadPoolTaskRunner(max_workers=8),
      on_cancellation=[interrupted], on_crashed=[interrupted])
def rollback(vpg: str, config: str = "vmrep.yaml", who: str | None = None) -> dict[str, Any]:
    """Roll back the failover awaiting commit: recovered VMs removed, source back as it was."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    with emitting(config):
        return ops.rollback(config, vpg, who=started_by(who, fallback="prefect"), flow_run_id=flow_run_id(),
                            runner=PrefectRunner())
