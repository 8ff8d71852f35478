"""Where vmrep's state database is, and how it is opened and migrated.

Where: `StateStore.open(url)`, else the `VMREP_DB_URL` environment variable, else
``sqlite:///<VMREP_HOME>/state.db`` (`VMREP_HOME` defaults to ``.vmrep`` in the current
directory and is created).

Opening migrates to the newest schema (Alembic ``upgrade head``). Several processes may
open the same database at once: on PostgreSQL the migration runs under a transaction-
scoped advisory lock, on SQLite inside ``BEGIN IMMEDIATE`` (the database write lock), and
whoever comes second finds the schema current and does nothing.

SQLite runs in WAL mode (readers never wait for the writer) with a 30 s busy timeout.
Every write transaction starts with ``BEGIN IMMEDIATE`` so that two writers queue on the
busy timeout instead of failing when one of them read first; read-only helpers use a
plain deferred ``BEGIN``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from vmrep.errors import VmrepError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_S = 30.0
PG_MIGRATION_LOCK_KEY = 0x766D726570  # "vmrep"


def default_url() -> str:
    """`VMREP_DB_URL`, else the SQLite file in `VMREP_HOME` (created)."""
    url = os.environ.get("VMREP_DB_URL")
    if url:
        return url
    home = Path(os.environ.get("VMREP_HOME") or ".vmrep")
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(home / 'state.db').resolve()}"


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # Turn off the driver's own transaction handling: `_sqlite_begin` emits BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    readonly = conn.get_execution_options().get("vmrep_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(u, pool_pre_ping=True)


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe to run from several processes."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = _alembic_config()
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    with engine.connect().execution_options(vmrep_readonly=True) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return
    if current is not None and current not in {r.revision for r in script.walk_revisions()}:
        url = engine.url.render_as_string(hide_password=True)
        raise VmrepError(
            f"state database {url} has schema revision {current}, unknown to this vmrep "
            f"(newest known: {head}): it was written by a newer version"
        )
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE = the database write lock
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
