"""Move: graceful shutdown (rolled back if it fails and force was not chosen), final
checkpoint, failover to it, commit, reverse protection by default. Failback is a move
of the reverse VPG. A VPG with `approval: required` waits for approval in the UI first
(flows/approval.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import emitting, flow_run_id, hand_off
from flows.approval import DEFAULT_TIMEOUT_MINUTES, gate
from flows.dr_test import interrupted
from tasks.recovery import PrefectRunner
from vmrep.recovery import operations as ops
from vmrep.stamps import started_by


@flow(name="move", task_runner=ThreadPoolTaskRunner(max_workers=8),
      on_cancellation=[interrupted], on_crashed=[interrupted])
def move(vpg: str, confirm: str, config: str = "vmrep.yaml", shutdown: str = "graceful",
         reverse_protection: bool = True, keep_source_vms: bool = False, who: str | None = None,
         verify_timeout: float = 600.0, shutdown_timeout: float = 300.0,
         approval_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> dict[str, Any]:
    """Planned move of a VPG to its recovery site (confirm: the VPG's name again); waits
    for approval in the UI first when the VPG says `approval: required`."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    requested_by = started_by(who, fallback="prefect")
    approval = gate(config, vpg, "move", confirm, requested_by, approval_timeout_minutes)
    with emitting(config):
        return ops.run_move(config, vpg, confirm=confirm, shutdown=shutdown, reverse_protection=reverse_protection,
                            keep_source_vms=keep_source_vms, who=requested_by,
                            flow_run_id=flow_run_id(), runner=PrefectRunner(), verify_timeout=verify_timeout,
                            shutdown_timeout=shutdown_timeout, approval=approval)
