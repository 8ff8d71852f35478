"""Approval of live operations started from a deployment (VPG setting `approval: required`).

The flow run pauses through Prefect's pause/resume with a typed input form: the Prefect
UI shows it behind the paused run's "Resume" button, and `resume_flow_run(id,
run_input=...)` answers it through the API. The open-source server knows no users, so
the approver types their name; they type the VPG's name again (as the requester did in
`confirm`) and a reason.

The VPG name is checked by the server itself: the form's schema allows only that name
(a JSON-schema `pattern`), so a resume with another name is refused with the reason
shown, and the run stays paused for a correct answer until the approval times out (the
run then fails with one line; nothing was changed). Refusing an operation is cancelling
its run (the UI's Cancel): nothing has started yet.

CLI-started operations are not gated: the operator at the CLI typed `--confirm`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger, pause_flow_run
from prefect.input import RunInput
from pydantic import Field, create_model

from vmrep.errors import Refused
from vmrep.recovery import operations as ops
from vmrep.runtime import get_runtime

# How often the paused run asks the server whether it was resumed: the approver waits
# at most this long after pressing Resume (one small request to a local server).
POLL_SECONDS = 2
DEFAULT_TIMEOUT_MINUTES = 60.0

# JSON-schema patterns are matched by Python's `re` on the server and by the browser's
# RegExp in the UI: escape only what both treat as special.
_SPECIAL = set("\\^$.|?*+()[]{}")


def exact(text: str) -> str:
    """A regular expression matching exactly `text`."""
    return "^" + "".join("\\" + c if c in _SPECIAL else c for c in text) + "$"


def approval_form(vpg: str, operation: str, requested_by: str) -> type[RunInput]:
    """The typed resume form for one VPG: the VPG field accepts only that VPG's name."""
    form = create_model(
        "Approval",
        __base__=RunInput,
        approver=(str, Field(min_length=1, max_length=200, title="Approver",
                             description="Your name: recorded as who approved it (the server knows no users).")),
        vpg=(str, Field(pattern=exact(vpg), title="VPG (type its name again)",
                        description=f"Type '{vpg}' to approve the {operation} of this VPG.")),
        reason=(str, Field(min_length=1, max_length=2000, title="Reason",
                           description="Why this is approved (a ticket, the incident): kept in the record.")),
    )
    # the description is shown above the form in the UI's Resume dialog (Markdown)
    return form.with_initial_data(
        description=(f"**LIVE {operation} of VPG {vpg}**, requested by {requested_by}. Approve by typing your "
                     "name, the VPG's name again and a reason; to refuse, cancel this run."))


def approve(vpg: Any, operation: str, requested_by: str,
            timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> dict[str, Any] | None:
    """Wait for approval when the VPG requires it; the approval record, or None when the
    VPG does not require one. Raises Refused (one line) when nobody approves in time."""
    if vpg.approval != "required":
        return None
    from prefect.exceptions import FlowPauseTimeout

    logger = get_run_logger()
    requested_at = datetime.now(timezone.utc)
    form = approval_form(vpg.name, operation, requested_by)
    logger.warning("VPG %s: %s requested by %s waits for approval: open this run in the Prefect UI and "
                   "press Resume (approver, the VPG's name again, a reason), or cancel it to refuse",
                   vpg.name, operation, requested_by)
    while True:
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=int(timeout_minutes * 60),
                                    poll_interval=POLL_SECONDS)
        except FlowPauseTimeout:
            # The server has already failed the run at the pause's expiry ("never resumed");
            # the run's log says why in vmrep's words.
            line = f"VPG {vpg.name}: {operation} not approved within {timeout_minutes:g} min; nothing was changed"
            logger.error("%s", line)
            raise Refused(line) from None
        # The server already refused any other name (the form's pattern); checked again
        # here so that no path around the form can approve another VPG.
        if answer.vpg == vpg.name:
            break
        logger.error("VPG %s: approval refused: the VPG name typed was %r; waiting again", vpg.name, answer.vpg)
    approved_at = datetime.now(timezone.utc)
    logger.warning("VPG %s: %s approved by %s at %s: %s", vpg.name, operation, answer.approver,
                   approved_at.isoformat(timespec="seconds"), answer.reason)
    return {"requested_by": requested_by, "requested_at": requested_at.isoformat(),
            "approved_by": answer.approver, "approved_at": approved_at.isoformat(), "reason": answer.reason}


def from_deployment() -> bool:
    """Was this flow run created from a deployment (UI, API, schedule, automation)? The
    CLI runs the flow in its own process, without one."""
    from prefect.runtime import deployment

    return deployment.id is not None


def gate(config: str, vpg: str, operation: str, confirm: str, requested_by: str,
         timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> dict[str, Any] | None:
    """The approval record when the VPG requires one (None otherwise). What would refuse
    the operation anyway (confirm, initial sync, a committed recovery) refuses it before
    anyone is asked; the VPG is not held while the run waits. Only runs of a deployment
are gated: `vmrep failover/move` (the same flow, run by the CLI) was confirmed there."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    if v.approval != "required" or not from_deployment():
        return None
    ops.preflight(rt, v, operation, confirm=confirm, check_lock=False)
    return approve(v, operation, requested_by, timeout_minutes)
