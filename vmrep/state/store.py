"""The state store: vmrep's own SQL database (SQLite file by default, PostgreSQL by URL).

Where the database is, how it is opened (SQLite's WAL, busy timeout and ``BEGIN
IMMEDIATE``) and migrated: `vmrep.state.db`.

Cross-process guarantees rest on single conditional statements, not on Python locks:
`try_lock` is ``UPDATE vpg_runtime SET lock_holder=… WHERE vpg=… AND lock_holder IS NULL``
and an open alert is unique per (vpg, key) by a partial unique index.

Why one module of ~850 lines: `StateStore` is one class over one engine and one
transaction discipline (`session`, ``BEGIN IMMEDIATE``), and its concerns meet inside
single transactions: `begin_operation` records an operation and takes (or is refused)
the VPG lock in one, `set_status` writes the runtime row and its history row in one.
Splitting runtime/lock from operations/steps would put one transaction's statements in
two modules; the methods are short and grouped by table, so the file reads top to bottom.
"""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from sqlalchemy import Engine, case, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from vmrep.state.db import _alembic_config  # noqa: F401 - re-exported: tests read the migration config here
from vmrep.state.db import default_url, make_engine, migrate
from vmrep.state.models import (
    ALERT_LEVELS,
    OPERATION_KINDS,
    OPERATION_RESULTS,
    STEP_RESULTS,
    TABLES,
    Alert,
    CommitPolicyDeadline,
    EmailDelivery,
    EventOutbox,
    Operation,
    OperationStep,
    Sample,
    StatusHistory,
    TestResult,
    UTCDateTime,
    VpgRuntime,
    utcnow,
)
from vmrep.status import Status

if TYPE_CHECKING:
    import pandas

log = logging.getLogger(__name__)

# The column a table is ordered and filtered by in `frame(since=…, until=…)`.
TIME_COLUMN = {
    "vpg_runtime": "updated_at",
    "vpg_status_history": "at",
    "alerts": "raised_at",
    "samples": "at",
    "operations": "started_at",
    "operation_steps": "started_at",
    "test_results": "started_at",
    "email_deliveries": "attempted_at",
    "commit_policy_deadlines": "due_at",
    "event_outbox": "at",
}


def alert_key(code: str, vm: str | None = None, subject: str | None = None) -> str:
    """What an alert is about: one open alert per (vpg, key)."""
    return "|".join((code, vm or "", subject or ""))


def _check(value: str, allowed: Iterable[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _columns(model: type, fields: dict[str, Any], what: str) -> None:
    unknown = set(fields) - set(model.__table__.columns.keys())  # type: ignore[attr-defined]  # declarative
    if unknown:
        raise TypeError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")


@dataclass
class StepHandle:
    """What the body of `StateStore.step` may fill in: detail, or mark the step skipped."""

    id: int
    detail: dict[str, Any] = field(default_factory=dict)
    result: str | None = None

    def skip(self, reason: str) -> None:
        self.result = "skipped"
        self.detail["reason"] = reason


class StateStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            engine.execution_options(vmrep_readonly=True), expire_on_commit=False
        )
        self._batch = threading.local()  # .session: the open batch() transaction of a thread

    @classmethod
    def open(cls, url: str | None = None, *, migrate_schema: bool = True) -> "StateStore":
        engine = make_engine(url or default_url())
        if migrate_schema:
            try:
                migrate(engine)
            except BaseException:
                engine.dispose()
                raise
        return cls(engine)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A transaction: committed at the end, rolled back on an exception. Inside
        `batch()` (same thread), a savepoint of the batch's transaction instead."""
        batch = getattr(self._batch, "session", None)
        if batch is not None:
            # A savepoint, so a method that catches its own failure (raise_alert's
            # IntegrityError) undoes only its statements, as with a transaction of its own.
            with batch.begin_nested():
                yield batch
            return
        with (self._read_sessions if readonly else self._sessions)() as s, s.begin():
            yield s

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every store call of this thread inside the block shares one write transaction,
        committed at the end (rolled back as a whole on an exception).

        For the monitor: a pass over 500 VPGs made ~2,500 transactions (runtime row,
        status, sample, each its own BEGIN IMMEDIATE and commit); batched, it is one.
        The write lock (SQLite) is held for the block: keep slow reads (vSphere) out of
        it. Nested batches join the outer one."""
        if getattr(self._batch, "session", None) is not None:
            yield
            return
        with self._sessions() as s, s.begin():
            self._batch.session = s
            try:
                yield
            finally:
                self._batch.session = None

    # --- runtime, status, lock -------------------------------------------------------

    def _ensure_runtime(self, s: Session, vpg: str, at: datetime | None = None) -> None:
        if s.get(VpgRuntime, vpg) is not None:
            return
        now = at or utcnow()
        if s.bind.dialect.name == "postgresql":  # type: ignore[union-attr]  # sessions are bound
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        row = dict(vpg=vpg, status=Status.INITIALIZING, paused=False, initial_sync_done=False)
        created = s.execute(
            insert(VpgRuntime)
            .values(**row, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=["vpg"])
            .returning(VpgRuntime.vpg)
        ).first()
        if created is not None:  # we made it (not a concurrent creator)
            s.add(StatusHistory(vpg=vpg, at=now, status=Status.INITIALIZING, detail="VPG created"))

    def runtime(self, vpg: str) -> VpgRuntime:
        """The VPG's runtime row, created (status Initializing) on first use."""
        with self.session() as s:
            self._ensure_runtime(s, vpg)
            return s.get_one(VpgRuntime, vpg)

    def runtimes(self) -> list[VpgRuntime]:
        with self.session(readonly=True) as s:
            return list(s.scalars(select(VpgRuntime).order_by(VpgRuntime.vpg)))

    def update_runtime(self, vpg: str, **fields: Any) -> VpgRuntime:
        """Set runtime fields (paused, initial_sync_done, last_checkpoint_at, …)."""
        _columns(VpgRuntime, fields, "update_runtime")
        with self.session() as s:
            self._ensure_runtime(s, vpg)
            rt = s.get_one(VpgRuntime, vpg)
            for k, v in fields.items():
                setattr(rt, k, v)
            return rt

    def note_checkpoint(self, vpg: str, at: datetime) -> None:
        """A checkpoint was published: last (and, the first time, first) checkpoint time."""
        with self.session() as s:
            self._ensure_runtime(s, vpg)
            rt = s.get_one(VpgRuntime, vpg)
            if rt.first_checkpoint_at is None or at < rt.first_checkpoint_at:
                rt.first_checkpoint_at = at
            if rt.last_checkpoint_at is None or at > rt.last_checkpoint_at:
                rt.last_checkpoint_at = at

    def set_status(
        self,
        vpg: str,
        status: str,
        substatus: str | None = None,
        detail: str | None = None,
        *,
        at: datetime | None = None,
    ) -> tuple[str, str | None] | None:
        """Set the status; a history row is written only when status or substatus change.

        Returns the previous (status, substatus) when it changed, else None. The row is
        read FOR UPDATE (SQLite: under BEGIN IMMEDIATE), so two processes setting the
        same status write one history row between them.
        """
        at = at or utcnow()
        with self.session() as s:
            self._ensure_runtime(s, vpg, at)
            rt = s.execute(
                select(VpgRuntime)
                .where(VpgRuntime.vpg == vpg)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            before = (rt.status, rt.substatus)
            if before == (status, substatus):
                return None
            rt.status, rt.substatus, rt.updated_at = status, substatus, at
            s.add(StatusHistory(vpg=vpg, at=at, status=status, substatus=substatus, detail=detail))
            self._outbox(s, vpg, "status", at, status=status, substatus=substatus, previous_status=before[0],
                         previous_substatus=before[1], detail=detail)
            return before

    def status_history(self, vpg: str) -> list[StatusHistory]:
        with self.session(readonly=True) as s:
            q = select(StatusHistory).where(StatusHistory.vpg == vpg)
            return list(s.scalars(q.order_by(StatusHistory.at, StatusHistory.id)))

    def try_lock(self, vpg: str, operation_id: str, kind: str) -> bool:
        """Take the VPG's operation lock; False if another operation holds it.

        Re-entrant for the same operation id (a retried task may ask again).
        """
        now = literal(utcnow(), UTCDateTime())
        with self.session() as s:
            self._ensure_runtime(s, vpg)
            mine = VpgRuntime.lock_holder == operation_id
            got = s.execute(
                update(VpgRuntime)
                .where(VpgRuntime.vpg == vpg, or_(VpgRuntime.lock_holder.is_(None), mine))
                .values(
                    lock_holder=operation_id,
                    lock_kind=kind,
                    lock_acquired_at=case((mine, VpgRuntime.lock_acquired_at), else_=now),
                )
            ).rowcount
            return bool(got)

    def unlock(self, vpg: str, operation_id: str) -> bool:
        """Release the lock if `operation_id` holds it; returns whether it did."""
        with self.session() as s:
            return bool(
                s.execute(
                    update(VpgRuntime)
                    .where(VpgRuntime.vpg == vpg, VpgRuntime.lock_holder == operation_id)
                    .values(lock_holder=None, lock_kind=None, lock_acquired_at=None)
                ).rowcount
            )

    def force_unlock(self, vpg: str) -> str | None:
        """Release whatever holds the lock (a crashed run); returns the former holder."""
        with self.session() as s:
            rt = s.get(VpgRuntime, vpg)
            if rt is None or rt.lock_holder is None:
                return None
            holder = rt.lock_holder
            rt.lock_holder = rt.lock_kind = rt.lock_acquired_at = None
            log.warning("VPG %s: lock of operation %s released by force", vpg, holder)
            return holder

    def hand_over_lock(self, vpg: str, old: str, new: str, kind: str) -> bool:
        """Hand the VPG's lock from operation `old` to `new` in one conditional UPDATE
        (a commit or rollback takes it from the failover it ends, and gives it back
        when it fails)."""
        with self.session() as s:
            return bool(
                s.execute(
                    update(VpgRuntime)
                    .where(VpgRuntime.vpg == vpg, VpgRuntime.lock_holder == old)
                    .values(lock_holder=new, lock_kind=kind)
                ).rowcount
            )

    def begin_operation(
        self,
        vpg: str,
        kind: str,
        started_by: str | None = None,
        params: dict[str, Any] | None = None,
        flow_run_id: str | None = None,
        *,
        take_from: str | None = None,
    ) -> tuple[str, VpgRuntime | None]:
        """Record a running operation and give it the VPG's lock, in one transaction.

        The lock is taken when free, or with `take_from` handed over from that operation.
        Returns (operation id, None); when another operation holds the VPG the new one is
        recorded as refused (result failed, naming the holder) and the VPG's runtime row
        comes back in place of None. No moment exists where the operation runs unlocked.
        """
        _check(kind, OPERATION_KINDS, "operation kind")
        op_id = str(uuid.uuid4())
        now = utcnow()
        with self.session() as s:
            self._ensure_runtime(s, vpg, now)
            s.add(Operation(id=op_id, vpg=vpg, kind=kind, started_by=started_by, started_at=now,
                            result="running", flow_run_id=flow_run_id, params=params))
            s.flush()
            free = VpgRuntime.lock_holder == take_from if take_from else VpgRuntime.lock_holder.is_(None)
            values: dict[str, Any] = {"lock_holder": op_id, "lock_kind": kind}
            if take_from is None:
                values["lock_acquired_at"] = literal(now, UTCDateTime())
            if s.execute(update(VpgRuntime).where(VpgRuntime.vpg == vpg, free).values(**values)).rowcount:
                return op_id, None
            row = s.execute(
                select(VpgRuntime).where(VpgRuntime.vpg == vpg).execution_options(populate_existing=True)
            ).scalar_one()
            op = s.get_one(Operation, op_id)
            op.result, op.ended_at = "failed", now
            if row.lock_holder:
                op.error = f"VPG {vpg}: {kind} refused: held by {row.lock_kind} operation {row.lock_holder[:8]}"
            else:
                op.error = f"VPG {vpg}: {kind} refused: operation {(take_from or '')[:8]} no longer holds it"
            return op_id, row

    def finish_running(self, operation_id: str, result: str, error: str | None = None) -> bool:
        """End an operation unless it has ended already; returns whether it did."""
        _check(result, OPERATION_RESULTS[1:], "operation result")
        with self.session() as s:
            return bool(
                s.execute(
                    update(Operation)
                    .where(Operation.id == operation_id, Operation.result == "running")
                    .values(result=result, error=error, ended_at=literal(utcnow(), UTCDateTime()))
                ).rowcount
            )

    # --- operations and steps --------------------------------------------------------

    def start_operation(
        self,
        vpg: str,
        kind: str,
        started_by: str | None = None,
        params: dict[str, Any] | None = None,
        flow_run_id: str | None = None,
        *,
        operation_id: str | None = None,
        started_at: datetime | None = None,
        **fields: Any,
    ) -> str:
        """Record a running operation; returns its id (a uuid4 unless given).

        With an `operation_id` that exists already nothing changes (idempotent retry).
        """
        _check(kind, OPERATION_KINDS, "operation kind")
        _columns(Operation, fields, "start_operation")
        op_id = operation_id or str(uuid.uuid4())
        with self.session() as s:
            if operation_id and s.get(Operation, operation_id) is not None:
                return operation_id
            s.add(
                Operation(
                    id=op_id,
                    vpg=vpg,
                    kind=kind,
                    started_by=started_by,
                    started_at=started_at or utcnow(),
                    result="running",
                    flow_run_id=flow_run_id,
                    params=params,
                    **fields,
                )
            )
        return op_id

    def finish_operation(
        self,
        operation_id: str,
        result: str,
        error: str | None = None,
        *,
        ended_at: datetime | None = None,
        **fields: Any,
    ) -> Operation:
        """End an operation: result, error, and any other column (rto_seconds, checkpoint_id…)."""
        _check(result, OPERATION_RESULTS[1:], "operation result")
        _columns(Operation, fields, "finish_operation")
        with self.session() as s:
            op = s.get(Operation, operation_id)
            if op is None:
                raise ValueError(f"no operation {operation_id}")
            op.result, op.error, op.ended_at = result, error, ended_at or utcnow()
            for k, v in fields.items():
                setattr(op, k, v)
            return op

    def operation(self, operation_id: str) -> Operation | None:
        with self.session(readonly=True) as s:
            return s.get(Operation, operation_id)

    def operations(
        self, vpg: str | None = None, kind: str | None = None, result: str | None = None
    ) -> list[Operation]:
        """Operations, newest first."""
        q = select(Operation)
        if vpg is not None:
            q = q.where(Operation.vpg == vpg)
        if kind is not None:
            q = q.where(Operation.kind == kind)
        if result is not None:
            q = q.where(Operation.result == result)
        with self.session(readonly=True) as s:
            return list(s.scalars(q.order_by(Operation.started_at.desc(), Operation.id)))

    def record_step(
        self,
        operation_id: str,
        vm: str | None,
        step: str,
        result: str = "ok",
        *,
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """Record one step (vm None = VPG-wide); a finished one gets ended_at = now."""
        _check(result, STEP_RESULTS, "step result")
        now = utcnow()
        if result != "running" and ended_at is None:
            ended_at = now
        with self.session() as s:
            row = OperationStep(
                operation_id=operation_id,
                vm=vm,
                step=step,
                started_at=started_at or now,
                ended_at=ended_at,
                result=result,
                error=error,
                detail=detail,
            )
            s.add(row)
            s.flush()
            return row.id

    def _end_step(self, step_id: int, result: str, error: str | None, detail: dict) -> None:
        with self.session() as s:
            row = s.get_one(OperationStep, step_id)
            row.result, row.error, row.ended_at = result, error, utcnow()
            row.detail = detail or None

    @contextmanager
    def step(
        self, operation_id: str, vm: str | None, step: str, *, detail: dict[str, Any] | None = None
    ) -> Iterator[StepHandle]:
        """Record a step around a block: running → ok | skipped | failed (with the error).

        The exception (also a cancellation) is re-raised after it has been recorded.
        """
        handle = StepHandle(self.record_step(operation_id, vm, step, "running", detail=detail))
        handle.detail.update(detail or {})
        try:
            yield handle
        except BaseException as exc:
            kind = "" if isinstance(exc, Exception) else "cancelled: "
            error = f"{kind}{type(exc).__name__}: {exc}".rstrip(": ")
            try:
                self._end_step(handle.id, "failed", error, handle.detail)
            except Exception:  # never hide the step's own error behind ours
                log.exception("could not record the failure of step %s/%s", step, vm)
            raise
        self._end_step(handle.id, handle.result or "ok", None, handle.detail)

    def steps(self, operation_id: str) -> list[OperationStep]:
        with self.session(readonly=True) as s:
            q = select(OperationStep).where(OperationStep.operation_id == operation_id)
            return list(s.scalars(q.order_by(OperationStep.started_at, OperationStep.id)))

    # --- tests, samples, alerts, emails -----------------------------------------------

    def add_test_result(
        self,
        operation_id: str | None,
        vpg: str,
        *,
        started_at: datetime,
        success: bool,
        ended_at: datetime | None = None,
        checkpoint_id: str | None = None,
        checkpoint_time: datetime | None = None,
        verification_ok: bool | None = None,
        cleanup_ok: bool | None = None,
        notes: str | None = None,
        tested_by: str | None = None,
        rto_seconds: float | None = None,
        rto_target_seconds: float | None = None,
        rto_met: bool | None = None,
    ) -> int:
        """Record a DR test; the runtime row keeps the newest one (`last_test_at` = its start,
        `last_test_success`). The test-overdue clock runs from the newest test that passed
        (`vmrep.health.gather_facts`): a failed one proves nothing.
        """
        with self.session() as s:
            row = TestResult(
                operation_id=operation_id,
                vpg=vpg,
                checkpoint_id=checkpoint_id,
                checkpoint_time=checkpoint_time,
                started_at=started_at,
                ended_at=ended_at or utcnow(),
                success=success,
                verification_ok=verification_ok,
                cleanup_ok=cleanup_ok,
                notes=notes,
                tested_by=tested_by,
                rto_seconds=rto_seconds,
                rto_target_seconds=rto_target_seconds,
                rto_met=rto_met,
            )
            s.add(row)
            self._ensure_runtime(s, vpg)
            rt = s.get_one(VpgRuntime, vpg)
            if rt.last_test_at is None or started_at >= rt.last_test_at:
                rt.last_test_at, rt.last_test_success = started_at, success
            s.flush()
            return row.id

    def test_results(self, vpg: str | None = None) -> list[TestResult]:
        """Test results, newest first."""
        q = select(TestResult)
        if vpg is not None:
            q = q.where(TestResult.vpg == vpg)
        with self.session(readonly=True) as s:
            return list(s.scalars(q.order_by(TestResult.started_at.desc(), TestResult.id.desc())))

    def add_sample(
        self,
        vpg: str,
        *,
        at: datetime | None = None,
        rpo_seconds: float | None,
        rpo_target_seconds: float,
        history_seconds: float | None,
        history_target_seconds: float,
        journal_bytes: int | None = None,
        journal_limit_bytes: int | None = None,
        status: str | None = None,
        substatus: str | None = None,
    ) -> int:
        with self.session() as s:
            row = Sample(
                vpg=vpg,
                at=at or utcnow(),
                rpo_seconds=rpo_seconds,
                rpo_target_seconds=rpo_target_seconds,
                history_seconds=history_seconds,
                history_target_seconds=history_target_seconds,
                journal_bytes=journal_bytes,
                journal_limit_bytes=journal_limit_bytes,
                status=status,
                substatus=substatus,
            )
            s.add(row)
            s.flush()
            return row.id

    def add_samples(self, samples: Iterable[tuple[str, dict[str, Any]]], *, at: datetime | None = None) -> int:
        """Many samples (vpg, fields as `add_sample` takes them) in one INSERT of many rows:
        the monitor's samples of a pass. Returns how many."""
        from sqlalchemy import insert

        when = at or utcnow()
        rows = [{"vpg": vpg, **{"at": when, "journal_bytes": None, "journal_limit_bytes": None, "status": None,
                                "substatus": None}, **fields} for vpg, fields in samples]
        if not rows:
            return 0
        with self.session() as s:
            s.execute(insert(Sample), rows)
        return len(rows)

    def open_alerts(self, vpg: str | None = None) -> list[Alert]:
        q = select(Alert).where(Alert.cleared_at.is_(None))
        if vpg is not None:
            q = q.where(Alert.vpg == vpg)
        with self.session(readonly=True) as s:
            return list(s.scalars(q.order_by(Alert.raised_at, Alert.id)))

    def raise_alert(
        self,
        vpg: str,
        code: str,
        level: str,
        text: str,
        *,
        vm: str | None = None,
        subject: str | None = None,
        data: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> Alert | None:
        """Open an alert; None if the same one (vpg, code, vm, subject) is open already.

        `subject` tells apart alerts of one code and VM (e.g. the missing network); it is
        kept in `data["subject"]`.
        """
        _check(level, ALERT_LEVELS, "alert level")
        if subject is not None:
            data = {"subject": subject, **(data or {})}
        row = Alert(
            vpg=vpg,
            vm=vm,
            code=code,
            level=level,
            text=text,
            raised_at=at or utcnow(),
            data=data,
            key=alert_key(code, vm, subject),
        )
        try:
            with self.session() as s:
                s.add(row)
                s.flush()
                self._outbox(s, vpg, "raised", row.raised_at, code=code, level=level, text=text, vm=vm,
                             subject=subject, alert_id=row.id)
        except IntegrityError:
            return None
        return row

    def clear_alert(self, alert_id: int, *, at: datetime | None = None) -> bool:
        """Close an open alert; False if it was closed already."""
        at = at or utcnow()
        with self.session() as s:
            done = bool(
                s.execute(
                    update(Alert)
                    .where(Alert.id == alert_id, Alert.cleared_at.is_(None))
                    .values(cleared_at=at)
                ).rowcount
            )
            if done:
                a = s.get_one(Alert, alert_id)
                self._outbox(s, a.vpg, "cleared", at, code=a.code, level=a.level, text=a.text, vm=a.vm,
                             subject=(a.data or {}).get("subject"), alert_id=a.id)
            return done

    # --- the event outbox (alert and status transitions, drained by the control plane) ---

    def _outbox(self, s: Session, vpg: str, kind: str, at: datetime, **payload: Any) -> None:
        """One transition to be emitted as a Prefect event, in the caller's transaction:
        recorded exactly when the change it describes is."""
        s.add(EventOutbox(at=at, vpg=vpg, kind=kind, payload=payload, emitted_at=None))

    def claim_events(self, limit: int = 500) -> list[EventOutbox]:
        """Take the oldest transitions not emitted yet (marked emitted in the same
        transaction, so two emitters never send one twice); `unclaim_events` gives back
        those that could not be sent."""
        now = literal(utcnow(), UTCDateTime())
        with self.session() as s:
            ids = list(s.scalars(select(EventOutbox.id).where(EventOutbox.emitted_at.is_(None))
                                 .order_by(EventOutbox.id).limit(limit)))
            if not ids:
                return []
            s.execute(update(EventOutbox).where(EventOutbox.id.in_(ids), EventOutbox.emitted_at.is_(None))
                      .values(emitted_at=now))
            return list(s.scalars(select(EventOutbox).where(EventOutbox.id.in_(ids)).order_by(EventOutbox.id)))

    def unclaim_events(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if ids:
            with self.session() as s:
                s.execute(update(EventOutbox).where(EventOutbox.id.in_(ids)).values(emitted_at=None))

    def pending_events(self, vpg: str | None = None) -> list[EventOutbox]:
        q = select(EventOutbox).where(EventOutbox.emitted_at.is_(None))
        if vpg is not None:
            q = q.where(EventOutbox.vpg == vpg)
        with self.session(readonly=True) as s:
            return list(s.scalars(q.order_by(EventOutbox.id)))

    def purge_events(self, before: datetime) -> int:
        """Forget emitted transitions older than `before` (the alerts and status history
        keep the record; the outbox is only a queue)."""
        with self.session() as s:
            return int(s.execute(EventOutbox.__table__.delete().where(  # type: ignore[attr-defined]
                EventOutbox.emitted_at.is_not(None), EventOutbox.emitted_at < before)).rowcount)

    # --- commit policy deadlines -------------------------------------------------------

    def set_policy_deadline(self, operation_id: str, vpg: str, policy: str, due_at: datetime) -> None:
        """The failover `operation_id` awaits commit: its policy acts at `due_at`."""
        _check(policy, ("commit", "rollback"), "commit policy")
        with self.session() as s:
            s.merge(CommitPolicyDeadline(operation_id=operation_id, vpg=vpg, policy=policy, due_at=due_at,
                                         created_at=utcnow(), attempts=0))

    def policy_deadline(self, operation_id: str) -> CommitPolicyDeadline | None:
        with self.session(readonly=True) as s:
            return s.get(CommitPolicyDeadline, operation_id)

    def due_policies(self, now: datetime, vpg: str | None = None) -> list[CommitPolicyDeadline]:
        """Deadlines passed and not applied yet, oldest first."""
        q = select(CommitPolicyDeadline).where(CommitPolicyDeadline.applied_at.is_(None),
                                               CommitPolicyDeadline.due_at <= now)
        if vpg is not None:
            q = q.where(CommitPolicyDeadline.vpg == vpg)
        with self.session(readonly=True) as s:
            return list(s.scalars(q.order_by(CommitPolicyDeadline.due_at)))

    def policy_attempted(self, operation_id: str, error: str | None) -> None:
        with self.session() as s:
            row = s.get_one(CommitPolicyDeadline, operation_id)
            row.attempts = (row.attempts or 0) + 1
            row.last_error = error

    def policy_done(self, operation_id: str, outcome: str, applied_operation_id: str | None = None) -> bool:
        """Mark the deadline dealt with (once: False if it was already)."""
        with self.session() as s:
            return bool(s.execute(
                update(CommitPolicyDeadline)
                .where(CommitPolicyDeadline.operation_id == operation_id, CommitPolicyDeadline.applied_at.is_(None))
                .values(applied_at=literal(utcnow(), UTCDateTime()), outcome=outcome,
                        applied_operation_id=applied_operation_id)).rowcount)

    def update_test_result(self, operation_id: str, **fields: Any) -> bool:
        """Change the result of the test `operation_id` (a clean-up retried later)."""
        _columns(TestResult, fields, "update_test_result")
        with self.session() as s:
            return bool(s.execute(update(TestResult).where(TestResult.operation_id == operation_id)
                                  .values(**fields)).rowcount)

    def record_email(
        self,
        kind: str,
        ref: str | None,
        recipients: str | Iterable[str],
        subject: str | None,
        ok: bool,
        *,
        error: str | None = None,
        attempts: int = 1,
        attempted_at: datetime | None = None,
        report_path: str | Path | None = None,
    ) -> int:
        if not isinstance(recipients, str):
            recipients = ", ".join(recipients)
        with self.session() as s:
            row = EmailDelivery(
                kind=kind,
                ref=ref,
                recipients=recipients,
                subject=subject,
                attempted_at=attempted_at or utcnow(),
                attempts=attempts,
                ok=ok,
                error=error,
                report_path=str(report_path) if report_path is not None else None,
            )
            s.add(row)
            s.flush()
            return row.id

    # --- pandas ------------------------------------------------------------------------

    def frame(
        self,
        table: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        **filters: Any,
    ) -> "pandas.DataFrame":
        """A table as a DataFrame, oldest first; times as datetime64[ns, UTC].

        `filters` are column = value (a list/tuple/set means IN, None means IS NULL);
        `since`/`until` bound the table's time column (TIME_COLUMN) as [since, until).
        """
        import pandas as pd

        if table not in TABLES:
            raise ValueError(f"no table {table!r} (tables: {', '.join(TABLES)})")
        t = TABLES[table].__table__
        q = select(t)
        for name, value in filters.items():
            if name not in t.c:
                raise ValueError(f"table {table} has no column {name!r}")
            col = t.c[name]
            if isinstance(value, (list, tuple, set, frozenset)):
                q = q.where(col.in_(list(value)))
            else:
                q = q.where(col.is_(None) if value is None else col == value)
        tcol = t.c[TIME_COLUMN[table]]
        if since is not None:
            q = q.where(tcol >= since)
        if until is not None:
            q = q.where(tcol < until)
        q = q.order_by(tcol, *t.primary_key.columns)
        with self.engine.connect().execution_options(vmrep_readonly=True) as conn:
            df = pd.read_sql(q, conn)
        for col in t.columns:
            if isinstance(col.type, UTCDateTime):
                df[col.name] = pd.to_datetime(df[col.name], utc=True)
        return df
