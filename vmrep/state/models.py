"""Tables of vmrep's state database (SQLAlchemy 2 typed declarative models).

Table and column names are an interface: the reports read them with pandas. Every
time is stored as UTC and comes back timezone-aware (`UTCDateTime`): PostgreSQL keeps
`timestamptz`; SQLite has no time zone type, so it keeps the naive UTC text
``YYYY-MM-DD HH:MM:SS.ffffff`` (read it with ``pd.to_datetime(col, utc=True)`` when
not going through `StateStore.frame`, which does that already).

A schema change is a new Alembic revision in `vmrep/state/migrations/versions/`;
`tests/test_state.py` fails when these models and the migrations disagree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from vmrep.stamps import utcnow
from vmrep.status import Status

# Constraint names the same on every backend, so that later migrations can name them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

OPERATION_KINDS = (
    "initial_sync",
    "replicate",
    "test",
    "failover",
    "move",
    "commit",
    "rollback",
    "reverse_protect",
    "cleanup",  # a failed test clean-up tried again by the monitor (vmrep.recovery.policy)
)
OPERATION_RESULTS = ("running", "succeeded", "failed", "cancelled")
STEP_RESULTS = ("running", "ok", "failed", "skipped")
ALERT_LEVELS = ("warning", "error")


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime, stored in UTC. A naive datetime is refused: it is a bug."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: give a timezone-aware time (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class VpgRuntime(Base):
    """One row per VPG: what it is doing now. `lock_holder` serialises operations."""

    __tablename__ = "vpg_runtime"

    vpg: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(40), default=Status.INITIALIZING)
    substatus: Mapped[str | None] = mapped_column(String(40))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    lock_holder: Mapped[str | None] = mapped_column(String(64))
    lock_kind: Mapped[str | None] = mapped_column(String(40))
    lock_acquired_at: Mapped[datetime | None]
    initial_sync_done: Mapped[bool] = mapped_column(Boolean, default=False)
    # When vmrep first saw the VPG, and its first checkpoint ever: the clocks of
    # "test overdue" and of the journal-history judgement start there.
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    first_checkpoint_at: Mapped[datetime | None]
    last_checkpoint_at: Mapped[datetime | None]
    last_test_at: Mapped[datetime | None]
    last_test_success: Mapped[bool | None] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class StatusHistory(Base):
    __tablename__ = "vpg_status_history"
    __table_args__ = (Index("ix_vpg_status_history_vpg_at", "vpg", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vpg: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(40))
    substatus: Mapped[str | None] = mapped_column(String(40))
    detail: Mapped[str | None] = mapped_column(Text)


class Alert(Base):
    """An alert is open while `cleared_at` is null.

    `key` identifies what the alert is about (code, VM, subject such as a network);
    a partial unique index keeps at most one open alert per (vpg, key), so two
    evaluators racing cannot raise the same alert twice.
    """

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_vpg_raised_at", "vpg", "raised_at"),
        Index(
            "uq_alerts_open_key",
            "vpg",
            "key",
            unique=True,
            sqlite_where=text("cleared_at IS NULL"),
            postgresql_where=text("cleared_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vpg: Mapped[str] = mapped_column(String(200))
    vm: Mapped[str | None] = mapped_column(String(200))
    code: Mapped[str] = mapped_column(String(60))
    level: Mapped[str] = mapped_column(String(10))
    text: Mapped[str] = mapped_column(Text)
    raised_at: Mapped[datetime]
    cleared_at: Mapped[datetime | None]
    data: Mapped[dict[str, Any] | None]
    key: Mapped[str] = mapped_column(String(500))


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (Index("ix_samples_vpg_at", "vpg", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vpg: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime]
    rpo_seconds: Mapped[float | None] = mapped_column(Float)
    rpo_target_seconds: Mapped[float] = mapped_column(Float)
    history_seconds: Mapped[float | None] = mapped_column(Float)
    history_target_seconds: Mapped[float] = mapped_column(Float)
    journal_bytes: Mapped[int | None] = mapped_column(BigInteger)
    journal_limit_bytes: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str | None] = mapped_column(String(40))
    substatus: Mapped[str | None] = mapped_column(String(40))


class Operation(Base):
    __tablename__ = "operations"
    __table_args__ = (Index("ix_operations_vpg_started_at", "vpg", "started_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    vpg: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(40))
    started_by: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    result: Mapped[str] = mapped_column(String(20), default="running")
    checkpoint_id: Mapped[str | None] = mapped_column(String(100))
    checkpoint_time: Mapped[datetime | None]
    checkpoint_age_seconds: Mapped[float | None] = mapped_column(Float)
    rto_seconds: Mapped[float | None] = mapped_column(Float)
    rto_target_seconds: Mapped[float | None] = mapped_column(Float)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str | None] = mapped_column(Text)


class OperationStep(Base):
    __tablename__ = "operation_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operation_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("operations.id", ondelete="CASCADE"), index=True
    )
    vm: Mapped[str | None] = mapped_column(String(200))
    step: Mapped[str] = mapped_column(String(60))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    result: Mapped[str] = mapped_column(String(20), default="running")
    error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None]


class TestResult(Base):
    __tablename__ = "test_results"
    __test__ = False  # not a pytest class

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No cascade: a test result is audit evidence, it is not deleted with its operation.
    operation_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("operations.id"), index=True
    )
    vpg: Mapped[str] = mapped_column(String(200), index=True)
    checkpoint_id: Mapped[str | None] = mapped_column(String(100))
    checkpoint_time: Mapped[datetime | None]
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    success: Mapped[bool] = mapped_column(Boolean)
    verification_ok: Mapped[bool | None] = mapped_column(Boolean)
    cleanup_ok: Mapped[bool | None] = mapped_column(Boolean)
    notes: Mapped[str | None] = mapped_column(Text)
    tested_by: Mapped[str | None] = mapped_column(String(200))
    # The RTO objective beside the result: a test whose verification passed is a success
    # even when it missed the target (rto_met false); the compliance report counts the miss.
    rto_seconds: Mapped[float | None] = mapped_column(Float)
    rto_target_seconds: Mapped[float | None] = mapped_column(Float)
    rto_met: Mapped[bool | None] = mapped_column(Boolean)


class EmailDelivery(Base):
    __tablename__ = "email_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    ref: Mapped[str | None] = mapped_column(String(200))
    recipients: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    attempted_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    ok: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    report_path: Mapped[str | None] = mapped_column(Text)


class CommitPolicyDeadline(Base):
    """When the commit policy of a failover awaiting commit acts (vmrep.recovery.policy).

    Kept here, not in the process that ran the failover, so that whichever process runs
    the next monitor pass (or the next command on the VPG) applies it. `applied_at` is
    set once the policy's commit or rollback succeeded (`applied_operation_id`), or when
    someone ended the failover by hand first (`outcome` "by hand").
    """

    __tablename__ = "commit_policy_deadlines"
    __table_args__ = (Index("ix_commit_policy_deadlines_due_at", "due_at"),)

    operation_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("operations.id", ondelete="CASCADE"), primary_key=True
    )
    vpg: Mapped[str] = mapped_column(String(200), index=True)
    policy: Mapped[str] = mapped_column(String(20))
    due_at: Mapped[datetime]
    created_at: Mapped[datetime]
    applied_at: Mapped[datetime | None]
    applied_operation_id: Mapped[str | None] = mapped_column(String(36))
    outcome: Mapped[str | None] = mapped_column(String(40))
    last_error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class EventOutbox(Base):
    """Alert and status transitions waiting to become Prefect events.

    `StateStore` writes a row in the same transaction as the alert or status change it
    describes (whoever makes it: the monitor, a failover, a commit); the control plane
    drains the table (`tasks.monitoring.emit_recorded`), so no transition goes unheard
    because the process that made it has no Prefect client. `emitted_at` is null until
    an emitter claimed the row."""

    __tablename__ = "event_outbox"
    __table_args__ = (Index("ix_event_outbox_emitted_at_id", "emitted_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime]
    vpg: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # raised, cleared, status
    payload: Mapped[dict[str, Any]]
    emitted_at: Mapped[datetime | None]


TABLES: dict[str, type[Base]] = {
    m.__tablename__: m
    for m in (
        VpgRuntime,
        StatusHistory,
        Alert,
        Sample,
        Operation,
        OperationStep,
        TestResult,
        EmailDelivery,
        CommitPolicyDeadline,
        EventOutbox,
    )
}
