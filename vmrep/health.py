"""VPG status and alerts: pure evaluation, then the transitions it causes.

    facts = gather_facts(store, "erp", now, newest_checkpoint_at=…, oldest_checkpoint_at=…,
                         journal_bytes=…)
    ev = evaluate(cfg.vpg("erp"), facts)          # status, substatus, alerts that should be open
    transitions = apply_transitions(store, "erp", ev, now)   # raise / clear / status history
    store.add_sample("erp", **ev.sample())

`evaluate` knows nothing of vSphere, Prefect or the database: it maps facts to the names
users know from Zerto (docs/concepts.md, "States and alerts"). Every transition, made here
or by an operation through the same `StateStore` calls, is queued in the state database's
event outbox with the change itself; the control plane emits it as a Prefect event
(`tasks.monitoring.emit_recorded`): the engine imports no Prefect.

Status, first rule that applies:

    Deleting                      a delete is running
    FailingOver / Moving          a live failover / move: FailingOverBeforeCommit or
                                  MovingBeforeCommit while awaiting commit,
                                  FailingOverCommitting, FailingOverRollingBack
    Recovered                     committed; NeedsConfiguration until reverse protection
    Error / NeedsConfiguration    a VM is no longer protectable or a recovery network is
                                  missing (Error alone for `facts.error`)
    Initializing / InitialSync    before the first checkpoint of the initial sync
    Paused                        replication paused by the user
    MeetingSLA, RpoNotMeetingSLA, HistoryNotMeetingSLA, NotMeetingSLA (both)
                                  substatus DeltaSync while a full compare runs

RPO (now − newest checkpoint) is judged against the target: above it the warning
RPO_OVER_TARGET, above twice the target the error RPO_OVER_2X_TARGET instead (never both).
The RPO of a paused VPG keeps growing and is still reported: the alert is true.

Journal history covered is now − oldest kept checkpoint. Choice for new VPGs (the way
Zerto treats them): history is judged against what the VPG *could* have by now, i.e.
``min(configured, now − first checkpoint)``. So a VPG younger than `journal_history`
that kept everything since its first checkpoint is MeetingSLA; once it has existed for
the whole window it is judged against the full window; and a young VPG that lost part
of its short history anyway (hard limit) is still flagged. Under 85 % of that expectation:
HistoryNotMeetingSLA and HISTORY_UNDER_85 (warning); under 75 %: HISTORY_UNDER_75 (error)
instead. Without a known first checkpoint, the oldest kept one stands in for it.

RPO and history are not judged while initialising, failing over, moving, recovered or
deleting (replication is not expected to run then). TEST_OVERDUE counts `test_interval`
calendar months from the newest test that passed (a failed or cancelled one does not
count), or when none passed from the first checkpoint (else from when the VPG was first
seen); never with ``test_interval: off``.

`apply_transitions` manages only the codes in `ALERT_CODES`: alerts that flows raise
under other codes are left alone.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from vmrep.state.store import alert_key
from vmrep.status import Status, Substatus  # re-exported: health's callers name them from here

if TYPE_CHECKING:
    from vmrep.config import VPG
    from vmrep.state import StateStore, VpgRuntime


# The statuses under which a replication cycle's DeltaSync mark is read back as a fact.
_DELTA_SYNC_STATUSES = (Status.MEETING_SLA, Status.RPO_NOT_MEETING_SLA, Status.HISTORY_NOT_MEETING_SLA,
                        Status.NOT_MEETING_SLA)

WARNING, ERROR = "warning", "error"
ALERT_LEVEL = {
    "RPO_OVER_TARGET": WARNING,
    "RPO_OVER_2X_TARGET": ERROR,
    "HISTORY_UNDER_85": WARNING,
    "HISTORY_UNDER_75": ERROR,
    "TEST_OVERDUE": WARNING,
    "AWAITING_COMMIT": WARNING,
    "REPLICATION_PAUSED": WARNING,
    "JOURNAL_NEAR_LIMIT": WARNING,
    "RECOVERY_NETWORK_MISSING": ERROR,
    "VM_NOT_PROTECTED": ERROR,
    "TEST_CLEANUP_FAILED": ERROR,
    # Raised at medium suspicion as a warning, at high as an error (EncryptionSuspicion.level)
    "ENCRYPTION_SUSPECTED": ERROR,
    # A source VM running while its recovered twin runs (vmrep.splitbrain): a warning while
    # the failover awaits commit, an error once committed (the level each alert carries).
    "SPLIT_BRAIN": ERROR,
}
ALERT_CODES = frozenset(ALERT_LEVEL)

HISTORY_WARNING_RATIO = 0.85
HISTORY_ERROR_RATIO = 0.75

UNPROTECTED_REASONS = {
    "deleted": "was deleted or can no longer be found",
    "rdm": "gained a raw device mapping (RDM) disk",
    "multi_writer": "gained a multi-writer disk",
    "shared_bus": "gained a shared SCSI bus (cluster member)",
    "domain_controller": "is marked as a domain controller",
}


@dataclass(frozen=True)
class UnprotectedVM:
    """A VM of the VPG that can no longer be protected, and why (`UNPROTECTED_REASONS`
    key or free text)."""

    name: str
    reason: str
    detail: str | None = None

    def describe(self) -> str:
        text = UNPROTECTED_REASONS.get(self.reason, self.reason)
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class EncryptionSuspicion:
    """An open ransomware suspicion on one disk (vmrep.ransomware, docs/ransomware.md)."""

    vm: str
    disk: str
    level: str  # medium | high
    began_checkpoint: str
    began_at: datetime
    share: float  # encrypted share of the changed bytes where it began
    baseline: float
    last_clean_checkpoint: str | None = None
    last_clean_at: datetime | None = None


def encryption_alerts(vpg: str, suspicions: Iterable[EncryptionSuspicion]) -> list["DesiredAlert"]:
    """One ENCRYPTION_SUSPECTED per suspect disk (the disk is the alert's subject).
    Used by `evaluate` and by the replication cycle, which raises it as soon as the
    checkpoint that shows it is published (`vmrep.ransomware.service`)."""
    out = []
    for s in suspicions:
        clean = (f"last clean checkpoint {s.last_clean_checkpoint} ({s.last_clean_at:%Y-%m-%d %H:%M:%S} UTC)"
                 if s.last_clean_checkpoint and s.last_clean_at else "no clean checkpoint kept")
        text = (f"VPG {vpg}: encryption suspected on VM {s.vm} disk {s.disk} since checkpoint "
                f"{s.began_checkpoint} ({s.began_at:%Y-%m-%d %H:%M:%S} UTC): {100 * s.share:.0f} % of its "
                f"changed bytes look encrypted (baseline {100 * s.baseline:.0f} %); {clean}")
        out.append(DesiredAlert(
            "ENCRYPTION_SUSPECTED", ERROR if s.level == "high" else WARNING, text, vm=s.vm, subject=s.disk,
            data={"disk": s.disk, "suspicion": s.level, "began_checkpoint": s.began_checkpoint,
                  "began_at": s.began_at.isoformat(), "encrypted_share": round(s.share, 4),
                  "baseline": round(s.baseline, 4), "last_clean_checkpoint": s.last_clean_checkpoint,
                  "last_clean_at": s.last_clean_at.isoformat() if s.last_clean_at else None}))
    return out


@dataclass(frozen=True)
class Facts:
    """What is known about a VPG at `now`. Times are aware UTC datetimes."""

    now: datetime
    newest_checkpoint_at: datetime | None = None
    oldest_checkpoint_at: datetime | None = None
    first_checkpoint_at: datetime | None = None  # first ever (start of the history clock)
    created_at: datetime | None = None  # when vmrep first saw the VPG
    journal_bytes: int = 0
    initial_sync_done: bool = False
    paused: bool = False
    # Kind of the operation in progress (the lock's kind): initial_sync, replicate, test,
    # failover, move, commit, rollback, reverse_protect, delete.
    operation_kind: str | None = None
    # Which live recovery a pending commit / running commit or rollback belongs to.
    live_recovery_kind: Literal["failover", "move"] | None = None
    awaiting_commit_since: datetime | None = None
    committed: bool = False  # recovered and committed (this VPG no longer replicates)
    delta_sync: bool = False  # a cycle compares every block (CBT reset, after a pause)
    # Start of the newest DR test that passed: the test-overdue clock runs from there. A
    # failed or cancelled test proved nothing about recoverability, so it does not reset it.
    last_test_at: datetime | None = None
    test_cleanup_failed: str | bool | None = None  # what was left behind, or True
    recovery_networks_missing: Sequence[str] = ()
    unprotected_vms: Sequence[UnprotectedVM] = ()
    error: str | None = None  # replication failing for a reason of its own
    encryption_suspected: Sequence[EncryptionSuspicion] = ()  # open ransomware suspicions
    split_brain: Sequence[Any] = ()  # vmrep.splitbrain.SplitBrainVM, judged by the monitor

    @classmethod
    def from_runtime(cls, rt: "VpgRuntime", now: datetime, **facts: Any) -> "Facts":
        """Facts of the runtime row (sync done, paused, lock kind, test and checkpoint
        times); keyword arguments add to or override them."""
        base: dict[str, Any] = dict(
            newest_checkpoint_at=rt.last_checkpoint_at,
            first_checkpoint_at=rt.first_checkpoint_at,
            created_at=rt.created_at,
            initial_sync_done=rt.initial_sync_done,
            paused=rt.paused,
            operation_kind=rt.lock_kind,
            last_test_at=rt.last_test_at if rt.last_test_success else None,  # the row keeps the newest test
            # set by a replication cycle while a CBT fallback compares whole disks
            # (vmrep.replication.engine.mark_delta_sync), cleared when the cycle ends
            delta_sync=rt.substatus == Substatus.DELTA_SYNC and rt.status in _DELTA_SYNC_STATUSES,
        )
        base.update(facts)
        return cls(now=now, **base)


@dataclass(frozen=True)
class DesiredAlert:
    code: str
    level: str
    text: str
    vm: str | None = None
    subject: str | None = None  # e.g. the missing network
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return alert_key(self.code, self.vm, self.subject)


@dataclass(frozen=True)
class Evaluation:
    vpg: str
    at: datetime
    status: str
    substatus: str | None
    detail: str | None
    alerts: tuple[DesiredAlert, ...]
    rpo_seconds: float | None
    rpo_target_seconds: float
    history_seconds: float | None
    history_target_seconds: float
    journal_bytes: int
    journal_limit_bytes: int

    @property
    def codes(self) -> set[str]:
        return {a.code for a in self.alerts}

    def sample(self) -> dict[str, Any]:
        """Keyword arguments for `StateStore.add_sample(vpg, **ev.sample())`."""
        return dict(
            at=self.at,
            rpo_seconds=self.rpo_seconds,
            rpo_target_seconds=self.rpo_target_seconds,
            history_seconds=self.history_seconds,
            history_target_seconds=self.history_target_seconds,
            journal_bytes=self.journal_bytes,
            journal_limit_bytes=self.journal_limit_bytes,
            status=self.status,
            substatus=self.substatus,
        )


def add_months(t: datetime, months: int) -> datetime:
    """Calendar months later; the day is clamped to the month's end (Aug 31 + 6 = Feb 28)."""
    y, m = divmod(t.month - 1 + months, 12)
    year, month = t.year + y, m + 1
    return t.replace(year=year, month=month, day=min(t.day, calendar.monthrange(year, month)[1]))


def _secs(seconds: float) -> str:
    if seconds < 600:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _live_state(f: Facts) -> tuple[str, str | None] | None:
    """Status of a live failover / move / commit / rollback, or None."""
    op = f.operation_kind
    moving = (f.live_recovery_kind or op) == "move"
    if op == "commit":
        return (Status.MOVING, None) if moving else (Status.FAILING_OVER, Substatus.FAILING_OVER_COMMITTING)
    if op == "rollback":
        return (Status.MOVING, None) if moving else (Status.FAILING_OVER, Substatus.FAILING_OVER_ROLLING_BACK)
    if f.awaiting_commit_since is not None:
        if moving:
            return Status.MOVING, Substatus.MOVING_BEFORE_COMMIT
        return Status.FAILING_OVER, Substatus.FAILING_OVER_BEFORE_COMMIT
    if op in ("failover", "move"):
        return (Status.MOVING if op == "move" else Status.FAILING_OVER), None
    return None


def evaluate(cfg: "VPG", f: Facts) -> Evaluation:
    """The status and the set of alerts that should be open for VPG `cfg` given `f`."""
    vpg, now = cfg.name, f.now
    alerts: list[DesiredAlert] = []

    def alert(code: str, text: str, **kw: Any) -> None:
        alerts.append(DesiredAlert(code, ALERT_LEVEL[code], f"VPG {vpg}: {text}", **kw))

    # --- which status family (operations and configuration come before the SLA) -----
    live = _live_state(f)
    config_problem = bool(f.unprotected_vms or f.recovery_networks_missing)
    initializing = not f.initial_sync_done or f.operation_kind == "initial_sync"
    if f.operation_kind == "delete":
        status, substatus, detail = Status.DELETING, None, None
    elif live is not None:
        (status, substatus), detail = live, None
    elif f.committed:
        status, detail = Status.RECOVERED, "committed"
        substatus = None if f.operation_kind == "reverse_protect" else Substatus.NEEDS_CONFIGURATION
    elif config_problem or f.error:
        status = Status.ERROR
        substatus = Substatus.NEEDS_CONFIGURATION if config_problem else None
        parts = [f"VM {u.name} {u.describe()}" for u in f.unprotected_vms]
        parts += [f"recovery network {n} missing" for n in f.recovery_networks_missing]
        detail = "; ".join(parts + ([f.error] if f.error else []))
    elif initializing:
        status, substatus, detail = Status.INITIALIZING, Substatus.INITIAL_SYNC, None
    elif f.paused:
        status, substatus, detail = Status.PAUSED, None, None
    else:
        status, substatus, detail = Status.MEETING_SLA, None, None  # refined below
    judge_sla = status in (Status.MEETING_SLA, Status.PAUSED, Status.ERROR) and not initializing

    # --- RPO ------------------------------------------------------------------------
    target = cfg.rpo_target_seconds
    rpo = (now - f.newest_checkpoint_at).total_seconds() if f.newest_checkpoint_at else None
    rpo_bad = False
    if judge_sla:
        if rpo is None:
            rpo_bad = True
            alert("RPO_OVER_2X_TARGET", f"no checkpoint yet (target {_secs(target)})")
        elif rpo > 2 * target:
            rpo_bad = True
            alert("RPO_OVER_2X_TARGET", f"RPO {_secs(rpo)} is over twice the target {_secs(target)}")
        elif rpo > target:
            rpo_bad = True
            alert("RPO_OVER_TARGET", f"RPO {_secs(rpo)} is over the target {_secs(target)}")

    # --- journal history --------------------------------------------------------------
    hist_target = cfg.history_seconds
    hist_in_force = hist_target  # what a sample is judged against: the window, or the VPG's age if younger
    covered = (now - f.oldest_checkpoint_at).total_seconds() if f.oldest_checkpoint_at else None
    hist_bad = False
    if judge_sla and covered is not None:
        start = f.first_checkpoint_at or f.oldest_checkpoint_at
        assert start is not None  # covered is set only when oldest_checkpoint_at is
        expected = min(hist_target, max((now - start).total_seconds(), 0.0))
        hist_in_force = expected
        ratio = covered / expected if expected > 0 else 1.0
        what = f"journal history {_secs(covered)} is under {{}} % of the {_secs(expected)} expected"
        if ratio < HISTORY_ERROR_RATIO:
            hist_bad = True
            alert("HISTORY_UNDER_75", what.format(75), data={"ratio": round(ratio, 4)})
        elif ratio < HISTORY_WARNING_RATIO:
            hist_bad = True
            alert("HISTORY_UNDER_85", what.format(85), data={"ratio": round(ratio, 4)})

    if status == Status.MEETING_SLA:
        status = {
            (False, False): Status.MEETING_SLA,
            (True, False): Status.RPO_NOT_MEETING_SLA,
            (False, True): Status.HISTORY_NOT_MEETING_SLA,
            (True, True): Status.NOT_MEETING_SLA,
        }[(rpo_bad, hist_bad)]
        substatus = Substatus.DELTA_SYNC if f.delta_sync else None
        detail = "; ".join(a.text.removeprefix(f"VPG {vpg}: ") for a in alerts) or None

    # --- the rest -----------------------------------------------------------------------
    gone = status in (Status.DELETING, Status.RECOVERED)
    interval = cfg.test_interval_months
    since = f.last_test_at or f.first_checkpoint_at or f.created_at
    if interval != "off" and since is not None and not gone and not initializing:
        due = add_months(since, int(interval))
        if now > due:
            last = f"last passed test {f.last_test_at:%Y-%m-%d}" if f.last_test_at else "never tested successfully"
            alert("TEST_OVERDUE", f"DR test overdue since {due:%Y-%m-%d} ({last}, every {interval} months)")
    if f.awaiting_commit_since is not None:
        kind = "move" if (f.live_recovery_kind or f.operation_kind) == "move" else "failover"
        alert("AWAITING_COMMIT",
              f"{kind} awaiting commit or rollback since {f.awaiting_commit_since:%Y-%m-%d %H:%M} UTC")
    if f.paused and not gone and live is None:
        # A live failover or move pauses replication as part of the operation; its own
        # AWAITING_COMMIT alert says what to do, a second one would only be noise.
        alert("REPLICATION_PAUSED", "replication is paused")
    limit = cfg.hard_limit_bytes
    if limit > 0 and not gone and f.journal_bytes >= limit * cfg.journal_warning_percent / 100:
        pct = 100 * f.journal_bytes / limit
        alert("JOURNAL_NEAR_LIMIT", f"journal {_gib(f.journal_bytes)} is {pct:.0f} % of its hard limit {_gib(limit)}")
    if f.operation_kind != "delete":
        for net in f.recovery_networks_missing:
            alert("RECOVERY_NETWORK_MISSING", f"recovery network {net} not found", subject=net, data={"network": net})
        for u in f.unprotected_vms:
            alert("VM_NOT_PROTECTED", f"VM {u.name} is no longer protected: it {u.describe()}", vm=u.name,
                  data={"reason": u.reason, "detail": u.detail})  # fmt: skip
    if f.test_cleanup_failed:
        left = f": {f.test_cleanup_failed}" if isinstance(f.test_cleanup_failed, str) else ""
        alert("TEST_CLEANUP_FAILED", f"test clean-up failed, test VMs or scratch data left{left}")
    if f.operation_kind != "delete":
        alerts.extend(encryption_alerts(vpg, f.encryption_suspected))
    for sb in f.split_brain:
        # The phase is the subject: committing turns the warning into an error (a new alert).
        alerts.append(DesiredAlert("SPLIT_BRAIN", sb.level, f"VPG {vpg}: {sb.text(vpg)}", vm=sb.vm,
                                   subject=sb.phase, data={"phase": sb.phase, "twin": sb.twin}))

    return Evaluation(
        vpg=vpg,
        at=now,
        status=status,
        substatus=substatus,
        detail=detail,
        alerts=tuple(alerts),
        rpo_seconds=rpo,
        rpo_target_seconds=target,
        history_seconds=covered,
        history_target_seconds=hist_in_force,
        journal_bytes=f.journal_bytes,
        journal_limit_bytes=limit,
    )


def gather_facts(store: "StateStore", vpg: str, now: datetime, **facts: Any) -> Facts:
    """Facts from the store (runtime row; the newest passed test; whether the latest test
    left things behind), completed by the caller's own: checkpoint times, journal bytes,
    vSphere findings."""
    tests = store.test_results(vpg)  # newest first
    if tests and tests[0].cleanup_ok is False:
        facts.setdefault("test_cleanup_failed", tests[0].notes or True)
    if tests:
        facts.setdefault("last_test_at", next((t.started_at for t in tests if t.success), None))
    return Facts.from_runtime(store.runtime(vpg), now, **facts)


# --- transitions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    kind: Literal["raised", "cleared", "status"]
    vpg: str
    at: datetime
    code: str | None = None
    level: str | None = None
    text: str | None = None
    vm: str | None = None
    subject: str | None = None
    alert_id: int | None = None
    status: str | None = None
    substatus: str | None = None
    previous_status: str | None = None
    previous_substatus: str | None = None
    detail: str | None = None


def apply_transitions(
    store: "StateStore",
    vpg: str,
    desired: Evaluation | Iterable[DesiredAlert],
    now: datetime,
    codes: frozenset[str] = ALERT_CODES,
) -> list[Transition]:
    """Make the store match `desired`: status (when an Evaluation), then clear the alerts
    (of `codes`, by default all of `ALERT_CODES`) no longer desired, then raise the new
    ones. Returns what changed, in that order; nothing when everything is as desired
    already. A narrower `codes` lets one concern (a replication cycle's
    ENCRYPTION_SUSPECTED) be brought up to date without judging the others."""
    out: list[Transition] = []
    if isinstance(desired, Evaluation):
        before = store.set_status(vpg, desired.status, desired.substatus, desired.detail, at=now)
        if before is not None:
            out.append(
                Transition("status", vpg, now, status=desired.status, substatus=desired.substatus,
                           previous_status=before[0], previous_substatus=before[1],
                           detail=desired.detail)  # fmt: skip
            )
        wanted = {a.key: a for a in desired.alerts}
    else:
        wanted = {a.key: a for a in desired}
    open_now = {a.key: a for a in store.open_alerts(vpg) if a.code in codes}
    for key, row in open_now.items():
        if key not in wanted and store.clear_alert(row.id, at=now):
            out.append(
                Transition("cleared", vpg, now, code=row.code, level=row.level, text=row.text,
                           vm=row.vm, subject=(row.data or {}).get("subject"), alert_id=row.id)  # fmt: skip
            )
    for key, a in wanted.items():
        if key in open_now:
            continue
        row = store.raise_alert(
            vpg, a.code, a.level, a.text, vm=a.vm, subject=a.subject, data=a.data or None, at=now
        )
        if row is not None:  # None: another evaluator raised it a moment ago
            out.append(
                Transition("raised", vpg, now, code=a.code, level=a.level, text=a.text, vm=a.vm,
                           subject=a.subject, alert_id=row.id)  # fmt: skip
            )
    return out
