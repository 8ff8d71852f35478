"""The parameters of every deployment, as pydantic models: typed, validated, and described
in words a DR engineer uses. They are what the Prefect UI shows in a deployment's
"Custom run" form.

Each model's fields are exactly parameters of the flow it deploys (a test checks it);
`config` (the vmrep.yaml the server was started with) is never in a form: it is a
deployment default, so nobody points a run at another file from the UI.

`parameter_schema(model, vpgs)` turns a model into the deployment's parameter schema,
with the VPG fields as a drop-down of the configured VPGs. The Prefect server validates
every run's parameters against it (enforce_parameter_schema), so a mistyped VPG or a
negative keep time is refused before a run exists; `validate(model, params, vpgs)`
applies the same rules in Python (the demo and the tests use it).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VPG_FIELDS = ("vpg",)
VPG_LIST_FIELDS = ("vpgs",)

CHECKPOINT_HELP = (
    "Which recovery point to use: 'latest' (the newest checkpoint), 'latest-tagged' (the "
    "newest checkpoint with a tag, e.g. one taken 'before upgrade'), 'latest-clean' (the "
    "newest checkpoint before suspected encryption: ransomware recovery), a checkpoint id as "
    "`vmrep checkpoints <vpg>` lists it, or a time (ISO 8601, UTC if no zone: the newest "
    "checkpoint at or before it)."
)
PERIOD_PATTERN = r"^(previous-month|this-month|\d{4}-\d{2}|\d+(\.\d+)?[wdhm])$"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VpgChoice(Params):
    vpg: str = Field(title="VPG", description="The protection group (VPG) to act on.")

    @field_validator("vpg")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("choose a VPG")
        return v


# --------------------------------------------------------------------------------------
# Replication and monitoring


class InitialSyncParams(VpgChoice):
    """Initial sync: validate the VPG, copy every disk in full into the journal (resuming
    where a broken run stopped), take the first checkpoint. Run it once per new VPG,
    before replication and before any test or failover."""


class ReplicateSiteParams(Params):
    """Continuous replication of every VPG protected at one site by one run (many VPGs per
    site): each VPG on its own interval, a bounded number of cycles at once. The schedule
    starts the next run while this one still cycles; it takes over between checkpoints."""

    site: str = Field(title="Site", description="The protected site whose VPGs this run replicates.")
    for_seconds: float | None = Field(
        default=None, gt=0, le=24 * 3600, title="Run for (seconds)",
        description="The longest this run keeps taking checkpoints; a later run of the deployment takes over "
                    "sooner.")
    interval_seconds: float | None = Field(
        default=None, ge=1, le=3600, title="Seconds between checkpoints",
        description="The same for every VPG; leave empty for each VPG's own (its RPO target / 6, 5-60 s).")
    max_parallel: int = Field(
        default=8, ge=1, le=64, title="Cycles at once",
        description="At most this many VPG cycles run at the same time in this run.")
    cycles: int | None = Field(
        default=None, ge=1, le=100_000, title="Checkpoints per VPG",
        description="Stop after this many checkpoints of each VPG instead (leave empty to run for the time above).")


class ReplicateParams(VpgChoice):
    """Continuous replication of one VPG for a bounded time; the schedule starts the next
    run while this one still cycles and it takes over between two checkpoints, so
    checkpoints keep coming back to back."""

    for_seconds: float | None = Field(
        default=None, gt=0, le=24 * 3600, title="Run for (seconds)",
        description="The longest this run keeps taking checkpoints; a later run of the deployment takes over "
                    "sooner.")
    interval_seconds: float = Field(
        default=10.0, ge=1, le=3600, title="Seconds between checkpoints",
        description="A new checkpoint is started this often (keep it well under the VPG's RPO target).")
    cycles: int | None = Field(
        default=None, ge=1, le=100_000, title="Number of checkpoints",
        description="Stop after this many checkpoints instead (leave empty to run for the time above).")


class MonitorParams(Params):
    """One monitor pass: RPO, journal history, tests due, configuration; raises and clears
    alerts and emits them as events (which automations can notify someone about)."""

    vpgs: list[str] | None = Field(
        default=None, title="VPGs", description="Only these VPGs (leave empty for all).")
    lifetime_seconds: float = Field(
        default=0, ge=0, le=86400, title="Lifetime (s)",
        description="Keep making passes for this long (0: one pass). The scheduled run lives 30 minutes.")
    interval_seconds: float = Field(
        default=60, gt=0, le=3600, title="Interval (s)", description="Seconds between two passes.")


class RetentionParams(Params):
    """The journal's retention at this recovery site: the history window, the hard limit and
    the locks (retention_lock_hours, the last clean checkpoint while encryption is
    suspected) of every VPG recovered here. Scheduled every few minutes."""

    vpgs: list[str] | None = Field(
        default=None, title="VPGs", description="Only these VPGs (leave empty for every VPG recovered at this site).")


# --------------------------------------------------------------------------------------
# Reports and notifications


class DrTestReportParams(Params):
    """Issue the report of a DR test again: written to disk, published in Prefect, emailed."""

    operation_id: str | None = Field(
        default=None, title="DR test (operation id)",
        description="The test's operation id (in the DR-test run's result and logs); empty for the latest test.")
    send_email: bool = Field(default=True, title="Email it",
                             description="Also email it to the VPG's email_to and notifications.default_to.")


class ComplianceParams(Params):
    """The compliance report: for each VPG, was its RPO met, was its journal history kept,
    was it tested and is its test not overdue, over the period."""

    period: str = Field(
        default="previous-month", pattern=PERIOD_PATTERN, title="Period",
        description="'previous-month' (the whole calendar month before today), 'this-month', a month "
                    "as YYYY-MM, or a span back from now such as 30d, 12h or 2w.")
    vpgs: list[str] | None = Field(default=None, title="VPGs",
                                   description="Only these VPGs (leave empty for all).")
    send_email: bool = Field(default=True, title="Email it",
                             description="Email it to every VPG's email_to and notifications.default_to.")


class NotifyParams(Params):
    """Email the VPG's owners about an event (the alert automation fills these in)."""

    restrict_vpgs: ClassVar[bool] = False  # an event may name a VPG no longer configured

    vpg: str = Field(default="", title="VPG", description="The VPG the event is about.")
    subject: str = Field(default="vmrep alert", max_length=300, title="Subject")
    text: str = Field(default="", max_length=20_000, title="Text")
    event: str | None = Field(default=None, title="Event name")
    occurred: str | None = Field(default=None, title="When it happened")
    alert_id: int | None = Field(default=None, title="Alert id")


# --------------------------------------------------------------------------------------
# Recovery: DR test, failover, commit, rollback, move


WHO_HELP = "Your name or login, recorded as who started it and printed in the report (Prefect's UI does not say)."
APPROVAL_TIMEOUT_HELP = (
    "Only for a VPG with 'approval: required': how long this run waits, paused, for someone to approve it "
    "(the run's Resume button) before it fails with nothing changed.")


class _Confirmed(VpgChoice):
    confirm: str = Field(title="Confirm: type the VPG's name again",
                         description="A live operation changes production: type the VPG's name again to confirm.")

    @model_validator(mode="after")
    def _confirmed(self) -> "_Confirmed":
        if self.confirm != self.vpg:
            raise ValueError(f"confirm must repeat the VPG's name ({self.vpg!r}) exactly")
        return self


class DrTestParams(VpgChoice):
    """DR test (test failover): recover a checkpoint into the isolated test network as new
    VMs named '<vm> - testing recovery', verify them, keep them for the time given, then
    remove them. Production keeps running and replicating; the report is emailed."""

    checkpoint: str = Field(default="latest", min_length=1, title="Checkpoint", description=CHECKPOINT_HELP)
    keep_minutes: float = Field(
        default=0.0, ge=0, le=7 * 24 * 60, title="Keep the test VMs for (minutes)",
        description="How long the verified test VMs stay up for manual checks before they are removed "
                    "(0: remove them right after verification).")
    notes: str | None = Field(default=None, max_length=4000, title="Notes",
                              description="Recorded with the test result and printed in the report.")
    who: str | None = Field(default=None, max_length=200, title="Started by", description=WHO_HELP)


class DrTestStartParams(VpgChoice):
    """Start a DR test and leave the test VMs running for people to check; end it with
    dr-test-stop, recording whether it succeeded. The report is sent when it is stopped."""

    checkpoint: str = Field(default="latest", min_length=1, title="Checkpoint", description=CHECKPOINT_HELP)
    notes: str | None = Field(default=None, max_length=4000, title="Notes")
    who: str | None = Field(default=None, max_length=200, title="Started by", description=WHO_HELP)


class DrTestStopParams(VpgChoice):
    """Stop the VPG's running DR test: record whether it succeeded and your notes, remove
    the test VMs and scratch copies, and send the report."""

    success: bool = Field(title="Test succeeded",
                          description="Did the applications work in the test VMs? Recorded as the test's result.")
    notes: str | None = Field(default=None, max_length=4000, title="Notes",
                              description="What was checked and what was found; printed in the report.")
    who: str | None = Field(default=None, max_length=200, title="Stopped by", description=WHO_HELP)


class FailoverParams(_Confirmed):
    """LIVE failover: recover the VPG into the PRODUCTION network at the recovery site,
    for when the protected site is lost. The recovered VMs then wait for commit (by hand
    or by the commit policy) and can be rolled back until then."""

    checkpoint: str = Field(default="latest", min_length=1, title="Checkpoint", description=CHECKPOINT_HELP)
    shutdown: Literal["none", "graceful", "force"] | None = Field(
        default=None, title="Shut down the protected VMs",
        description="If the protected site still answers: 'none' (leave them running), 'graceful' (guest "
                    "shutdown), 'force' (power off). Empty: the VPG's shutdown_policy.")
    commit_policy: Literal["none", "commit", "rollback"] | None = Field(
        default=None, title="Commit policy",
        description="After the failover: 'none' (wait for a person), 'commit' or 'rollback' automatically "
                    "after the time below. Empty: the VPG's commit_policy.")
    commit_after_minutes: float | None = Field(
        default=None, gt=0, le=7 * 24 * 60, title="Commit policy applies after (minutes)",
        description="Empty: the VPG's commit_policy timeout.")
    who: str | None = Field(default=None, max_length=200, title="Started by", description=WHO_HELP)
    approval_timeout_minutes: float = Field(default=60.0, gt=0, le=7 * 24 * 60, title="Wait for approval (minutes)",
                                            description=APPROVAL_TIMEOUT_HELP)


class MoveParams(_Confirmed):
    """Planned move: shut the protected VMs down, take a final checkpoint (no data lost),
    fail over to it, commit, and by default protect the recovered VMs back to the
    original site (failback is a move of that reverse VPG)."""

    shutdown: Literal["graceful", "force"] = Field(
        default="graceful", title="Shut down the protected VMs",
        description="'graceful' (guest shutdown, the usual) or 'force' (power off, for VMs that hang).")
    reverse_protection: bool = Field(
        default=True, title="Reverse protection",
        description="After the commit, replicate the recovered VMs back to the original site (for failback).")
    keep_source_vms: bool = Field(
        default=False, title="Keep the source VMs",
        description="Leave the powered-off source VMs in the inventory instead of removing them.")
    who: str | None = Field(default=None, max_length=200, title="Started by", description=WHO_HELP)
    approval_timeout_minutes: float = Field(default=60.0, gt=0, le=7 * 24 * 60, title="Wait for approval (minutes)",
                                            description=APPROVAL_TIMEOUT_HELP)


class CommitParams(VpgChoice):
    """Commit a live failover or move that waits for it: the recovered VMs stay."""

    reverse_protection: bool = Field(
        default=False, title="Reverse protection",
        description="Replicate the recovered VMs back to the original site from now on.")
    who: str | None = Field(default=None, max_length=200, title="Committed by", description=WHO_HELP)


class RollbackParams(VpgChoice):
    """Roll back a live failover or move that waits for commit: the recovered VMs are
    removed and the protected VMs are powered back on as they were."""

    who: str | None = Field(default=None, max_length=200, title="Rolled back by", description=WHO_HELP)


# --------------------------------------------------------------------------------------
# Schemas for Prefect


def parameter_schema(model: type[BaseModel], vpgs: list[str] | None = None,
                     *, title: str = "Parameters") -> dict[str, Any]:
    """The model as a Prefect deployment parameter schema (OpenAPI style, `definitions`,
    a `position` per field), with VPG fields restricted to `vpgs` when given."""
    raw = model.model_json_schema(ref_template="#/definitions/{model}")
    defs = raw.pop("$defs", {})
    props = copy.deepcopy(raw.get("properties", {}))
    if not getattr(model, "restrict_vpgs", True):
        vpgs = None
    for i, name in enumerate(model.model_fields):
        p = props[name]
        p["position"] = i
        p.setdefault("title", name)
        if vpgs and name in VPG_FIELDS:
            _restrict(p, vpgs, many=False)
        if vpgs and name in VPG_LIST_FIELDS:
            _restrict(p, vpgs, many=True)
    schema = {"title": title, "type": "object", "properties": props,
              "required": list(raw.get("required", [])), "definitions": defs}
    if model.__doc__:
        schema["description"] = " ".join(model.__doc__.split())
    return schema


def _restrict(p: dict[str, Any], vpgs: list[str], *, many: bool) -> None:
    choices = sorted(dict.fromkeys(vpgs))
    if many:
        item = {"type": "string", "enum": choices}
        for alt in p.get("anyOf", []):
            if alt.get("type") == "array":
                alt["items"] = item
        if p.get("type") == "array":
            p["items"] = item
        return
    if "anyOf" in p:
        for alt in p["anyOf"]:
            if alt.get("type") == "string":
                alt["enum"] = choices
                alt.pop("minLength", None)
        return
    p["enum"] = choices
    p.pop("minLength", None)


def validate(model: type[BaseModel], params: dict[str, Any], vpgs: list[str] | None = None) -> BaseModel:
    """Validate `params` as the model, and VPG names against `vpgs`; raises ValueError
    with every problem named."""
    try:
        obj = model.model_validate(params)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(x) for x in e['loc']) or 'parameters'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(lines)) from None
    if vpgs is not None and getattr(model, "restrict_vpgs", True):
        known = set(vpgs)
        for name in VPG_FIELDS:
            v = getattr(obj, name, None)
            if isinstance(v, str) and v and v not in known:
                raise ValueError(f"{name}: no VPG named {v!r} (known: {', '.join(sorted(known)) or 'none'})")
        for name in VPG_LIST_FIELDS:
            for v in getattr(obj, name, None) or []:
                if v not in known:
                    raise ValueError(f"{name}: no VPG named {v!r} (known: {', '.join(sorted(known)) or 'none'})")
    return obj


__all__ = [
    "CommitParams",
    "ComplianceParams",
    "DrTestParams",
    "DrTestReportParams",
    "DrTestStartParams",
    "DrTestStopParams",
    "FailoverParams",
    "InitialSyncParams",
    "MonitorParams",
    "MoveParams",
    "NotifyParams",
    "ReplicateParams",
    "RollbackParams",
    "parameter_schema",
    "validate",
]
