"""pandas frames read from vmrep's state database.

Every function takes a SQLAlchemy Engine or Connection (or any object with an `.engine`,
such as the StateStore) and reads the store's own tables (`vmrep.state.models`), so the
column types (UTC times, Boolean, JSON) convert the values on SQLite and on PostgreSQL
alike. Results are normalised: time columns are UTC `datetime64`, flags are
nullable booleans, JSON columns are Python objects.

Filtering by time happens in SQL (the samples table grows by one row per VPG and cycle).
Periods are half-open, [since, until), as in `StateStore.frame`: a sample taken at
midnight on 1 November belongs to November.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from vmrep.errors import VmrepError
from vmrep.state.models import TABLES


class ReportError(VmrepError):
    """A report cannot be built (no such operation, no data)."""


TIME_COLUMNS = {
    "vpg_runtime": [
        "lock_acquired_at",
        "created_at",
        "first_checkpoint_at",
        "last_checkpoint_at",
        "last_test_at",
        "updated_at",
    ],
    "vpg_status_history": ["at"],
    "alerts": ["raised_at", "cleared_at"],
    "samples": ["at"],
    "operations": ["started_at", "ended_at", "checkpoint_time"],
    "operation_steps": ["started_at", "ended_at"],
    "test_results": ["checkpoint_time", "started_at", "ended_at"],
    "email_deliveries": ["attempted_at"],
}
BOOL_COLUMNS = {
    "vpg_runtime": ["paused", "initial_sync_done", "last_test_success"],
    "test_results": ["success", "verification_ok", "cleanup_ok", "rto_met"],
    "email_deliveries": ["ok"],
}
JSON_COLUMNS = {
    "alerts": ["data"],
    "operations": ["params"],
    "operation_steps": ["detail"],
}
FLOAT_COLUMNS = {
    "samples": [
        "rpo_seconds",
        "rpo_target_seconds",
        "history_seconds",
        "history_target_seconds",
        "journal_bytes",
        "journal_limit_bytes",
    ],
    "operations": ["checkpoint_age_seconds", "rto_seconds", "rto_target_seconds"],
}


# --------------------------------------------------------------------------- access


def engine_of(db: Any) -> Engine | Connection:
    """Engine or Connection for an Engine, a Connection or an object with `.engine`."""
    if isinstance(db, (Engine, Connection)):
        return db
    eng = getattr(db, "engine", None)
    if isinstance(eng, (Engine, Connection)):
        return eng
    raise TypeError(f"expected a SQLAlchemy Engine or Connection, got {type(db).__name__}")


def tables(db: Any, *names: str) -> dict[str, sa.Table]:
    """The store's tables (the models of vmrep.state: one schema, written by the store)."""
    return {n: TABLES[n].__table__ for n in names}  # type: ignore[attr-defined]


@contextmanager
def connection(db: Any) -> Iterator[Connection]:
    """A read-only connection (on SQLite the store then begins a deferred transaction,
    taking no write lock while a report reads)."""
    bind = engine_of(db)
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect().execution_options(vmrep_readonly=True) as conn:
        yield conn


def utc(value: datetime | str | pd.Timestamp | None) -> datetime | None:
    """An aware UTC datetime (naive input is taken as UTC)."""
    if value is None:
        return None
    ts = pd.Timestamp(value)
    if pd.isna(ts):
        return None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime()


def _bind_time(column: sa.Column, value: datetime | None) -> datetime | None:
    """Times are bound aware (UTC); the store's column type stores them per backend."""
    return utc(value)


def _json(value: Any) -> Any:
    if isinstance(value, (str, bytes, bytearray)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return value


def _bool(value: Any) -> Any:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return pd.NA
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "t", "yes", "y"}
    return bool(value)


def normalise(df: pd.DataFrame, table: str) -> pd.DataFrame:
    for col in TIME_COLUMNS.get(table, []):
        if col in df:
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    for col in BOOL_COLUMNS.get(table, []):
        if col in df:
            df[col] = df[col].map(_bool).astype("boolean")
    for col in JSON_COLUMNS.get(table, []):
        if col in df:
            df[col] = df[col].map(_json).astype(object)
    for col in FLOAT_COLUMNS.get(table, []):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def read(db: Any, stmt: sa.Select, table: str) -> pd.DataFrame:
    with connection(db) as conn:
        df = pd.read_sql(stmt, conn)
    return normalise(df, table)


def _vpg_filter(t: sa.Table, vpgs: Sequence[str] | None) -> list[Any]:
    return [] if vpgs is None else [t.c.vpg.in_(list(vpgs))]


# --------------------------------------------------------------------------- DR test


def operation(db: Any, operation_id: str | None = None, kind: str | None = "test") -> dict[str, Any]:
    """One operation row as a dict: by id, or the latest (by start) of `kind`."""
    t = tables(db, "operations")["operations"]
    stmt = sa.select(t)
    if operation_id is not None:
        stmt = stmt.where(t.c.id == operation_id)
    else:
        if kind is not None:
            stmt = stmt.where(t.c.kind == kind)
        stmt = stmt.order_by(t.c.started_at.desc(), t.c.id.desc()).limit(1)
    df = read(db, stmt, "operations")
    if df.empty:
        if operation_id is not None:
            raise ReportError(f"no operation with id {operation_id!r} in the state database")
        raise ReportError(f"no {kind or ''} operation in the state database".replace("  ", " "))
    row = df.iloc[0].to_dict()
    if operation_id is not None and kind is not None and row["kind"] != kind:
        raise ReportError(f"operation {operation_id} is a {row['kind']}, not a {kind}")
    return row


def operation_steps(db: Any, operation_id: str) -> pd.DataFrame:
    """Steps of an operation, in start order, with duration_seconds."""
    t = tables(db, "operation_steps")["operation_steps"]
    stmt = (
        sa.select(t)
        .where(t.c.operation_id == operation_id)
        .order_by(t.c.started_at, t.c.id)
    )
    df = read(db, stmt, "operation_steps")
    df["duration_seconds"] = (df["ended_at"] - df["started_at"]).dt.total_seconds()
    return df


def test_result(db: Any, operation_id: str) -> dict[str, Any] | None:
    t = tables(db, "test_results")["test_results"]
    stmt = sa.select(t).where(t.c.operation_id == operation_id).order_by(t.c.id.desc()).limit(1)
    df = read(db, stmt, "test_results")
    return None if df.empty else df.iloc[0].to_dict()


# --------------------------------------------------------------------------- periods


SAMPLE_COLUMNS = (
    "vpg", "at", "rpo_seconds", "rpo_target_seconds", "history_seconds", "history_target_seconds",
    "journal_bytes", "journal_limit_bytes", "status",
)


def samples(db: Any, vpgs: Sequence[str] | None, since: datetime, until: datetime) -> pd.DataFrame:
    """Samples taken in [since, until), the columns the reports use (a month is many rows)."""
    t = tables(db, "samples")["samples"]
    stmt = (
        sa.select(*(t.c[c] for c in SAMPLE_COLUMNS))
        .where(
            t.c.at >= _bind_time(t.c.at, since),
            t.c.at < _bind_time(t.c.at, until),
            *_vpg_filter(t, vpgs),
        )
        .order_by(t.c.vpg, t.c.at, t.c.id)
    )
    return read(db, stmt, "samples")


def latest_sample(db: Any, vpg: str, until: datetime | None = None) -> dict[str, Any] | None:
    t = tables(db, "samples")["samples"]
    stmt = sa.select(t).where(t.c.vpg == vpg)
    if until is not None:
        stmt = stmt.where(t.c.at <= _bind_time(t.c.at, until))
    df = read(db, stmt.order_by(t.c.at.desc(), t.c.id.desc()).limit(1), "samples")
    return None if df.empty else df.iloc[0].to_dict()


def alerts(db: Any, vpgs: Sequence[str] | None, since: datetime, until: datetime) -> pd.DataFrame:
    """Alerts open at some time in [since, until): raised before its end, not cleared before its start."""
    t = tables(db, "alerts")["alerts"]
    stmt = (
        sa.select(t)
        .where(
            t.c.raised_at < _bind_time(t.c.raised_at, until),
            sa.or_(t.c.cleared_at.is_(None), t.c.cleared_at >= _bind_time(t.c.cleared_at, since)),
            *_vpg_filter(t, vpgs),
        )
        .order_by(t.c.raised_at, t.c.id)
    )
    return read(db, stmt, "alerts")


def operations(
    db: Any,
    vpgs: Sequence[str] | None,
    since: datetime | None,
    until: datetime,
    kinds: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Operations started in [since, until) (since None: from the beginning)."""
    t = tables(db, "operations")["operations"]
    cond = [t.c.started_at < _bind_time(t.c.started_at, until), *_vpg_filter(t, vpgs)]
    if since is not None:
        cond.append(t.c.started_at >= _bind_time(t.c.started_at, since))
    if kinds is not None:
        cond.append(t.c.kind.in_(list(kinds)))
    stmt = sa.select(t).where(*cond).order_by(t.c.started_at, t.c.id)
    return read(db, stmt, "operations")


def test_results(
    db: Any, vpgs: Sequence[str] | None, since: datetime | None, until: datetime
) -> pd.DataFrame:
    """Test results whose test started in [since, until), with the operation's result and RTO."""
    tt = tables(db, "test_results", "operations")
    t, o = tt["test_results"], tt["operations"]
    cond = [t.c.started_at < _bind_time(t.c.started_at, until), *_vpg_filter(t, vpgs)]
    if since is not None:
        cond.append(t.c.started_at >= _bind_time(t.c.started_at, since))
    own = [c for c in t.c if c.name not in ("rto_seconds", "rto_target_seconds")]
    stmt = (
        sa.select(
            *own,
            o.c.result.label("operation_result"),
            # recorded beside the test result since the RTO objective; older rows: the operation's
            sa.func.coalesce(t.c.rto_seconds, o.c.rto_seconds).label("rto_seconds"),
            sa.func.coalesce(t.c.rto_target_seconds, o.c.rto_target_seconds).label("rto_target_seconds"),
            o.c.checkpoint_age_seconds,
            o.c.started_by,
        )
        .select_from(t.outerjoin(o, o.c.id == t.c.operation_id))
        .where(*cond)
        .order_by(t.c.started_at, t.c.id)
    )
    df = read(db, stmt, "test_results")
    return normalise(df, "operations")


def vpg_names(db: Any) -> list[str]:
    """Every VPG the database knows (runtime rows, samples, operations)."""
    tt = tables(db, "vpg_runtime", "samples", "operations")
    stmt = sa.union(*(sa.select(tab.c.vpg) for tab in tt.values()))
    with connection(db) as conn:
        rows = conn.execute(stmt).scalars().all()
    return sorted({r for r in rows if r})


def first_seen(db: Any, vpg: str) -> datetime | None:
    """When vmrep first saw the VPG: its runtime row's created_at, else its earliest record."""
    tt = tables(db, "vpg_runtime", "samples", "vpg_status_history", "operations")
    parts = [
        sa.select(tt["vpg_runtime"].c.created_at).where(tt["vpg_runtime"].c.vpg == vpg),
        sa.select(sa.func.min(tt["samples"].c.at)).where(tt["samples"].c.vpg == vpg),
        sa.select(sa.func.min(tt["vpg_status_history"].c.at)).where(
            tt["vpg_status_history"].c.vpg == vpg
        ),
        sa.select(sa.func.min(tt["operations"].c.started_at)).where(
            tt["operations"].c.vpg == vpg
        ),
    ]
    with connection(db) as conn:
        values = [conn.execute(p).scalar() for p in parts]
    found = [utc(v) for v in values if v is not None]
    return min(found) if found else None


def vpg_runtime(db: Any, vpg: str) -> dict[str, Any] | None:
    t = tables(db, "vpg_runtime")["vpg_runtime"]
    df = read(db, sa.select(t).where(t.c.vpg == vpg), "vpg_runtime")
    return None if df.empty else df.iloc[0].to_dict()

