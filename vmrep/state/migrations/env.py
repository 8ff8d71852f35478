"""Alembic environment of the state database.

`vmrep.state.store.migrate()` runs `upgrade head` programmatically and hands over an
open connection (inside the transaction that holds the migration lock) in
`config.attributes["connection"]`. For hand use (new revisions) see alembic.ini here.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from vmrep.state.models import Base

target_metadata = Base.metadata


def _run(connection) -> None:  # noqa: ANN001  # Alembic hands in a Connection
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
