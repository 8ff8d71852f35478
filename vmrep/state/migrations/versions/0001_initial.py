"""initial schema: runtime, status history, alerts, samples, operations, steps, tests, emails

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
OPEN = sa.text("cleared_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "vpg_runtime",
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("substatus", sa.String(40)),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("lock_holder", sa.String(64)),
        sa.Column("lock_kind", sa.String(40)),
        sa.Column("lock_acquired_at", TS),
        sa.Column("initial_sync_done", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("first_checkpoint_at", TS),
        sa.Column("last_checkpoint_at", TS),
        sa.Column("last_test_at", TS),
        sa.Column("last_test_success", sa.Boolean()),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("vpg", name="pk_vpg_runtime"),
    )
    op.create_table(
        "vpg_status_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("substatus", sa.String(40)),
        sa.Column("detail", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_vpg_status_history"),
    )
    op.create_index("ix_vpg_status_history_vpg_at", "vpg_status_history", ["vpg", "at"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("vm", sa.String(200)),
        sa.Column("code", sa.String(60), nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("raised_at", TS, nullable=False),
        sa.Column("cleared_at", TS),
        sa.Column("data", JSON),
        sa.Column("key", sa.String(500), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_vpg_raised_at", "alerts", ["vpg", "raised_at"])
    op.create_index(
        "uq_alerts_open_key",
        "alerts",
        ["vpg", "key"],
        unique=True,
        sqlite_where=OPEN,
        postgresql_where=OPEN,
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("rpo_seconds", sa.Float()),
        sa.Column("rpo_target_seconds", sa.Float(), nullable=False),
        sa.Column("history_seconds", sa.Float()),
        sa.Column("history_target_seconds", sa.Float(), nullable=False),
        sa.Column("journal_bytes", sa.BigInteger()),
        sa.Column("journal_limit_bytes", sa.BigInteger()),
        sa.Column("status", sa.String(40)),
        sa.Column("substatus", sa.String(40)),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
    )
    op.create_index("ix_samples_vpg_at", "samples", ["vpg", "at"])
    op.create_table(
        "operations",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("started_by", sa.String(200)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("result", sa.String(20), nullable=False),
        sa.Column("checkpoint_id", sa.String(100)),
        sa.Column("checkpoint_time", TS),
        sa.Column("checkpoint_age_seconds", sa.Float()),
        sa.Column("rto_seconds", sa.Float()),
        sa.Column("rto_target_seconds", sa.Float()),
        sa.Column("flow_run_id", sa.String(64)),
        sa.Column("params", JSON),
        sa.Column("error", sa.Text()),
        sa.Column("notes", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_operations"),
    )
    op.create_index("ix_operations_vpg_started_at", "operations", ["vpg", "started_at"])
    op.create_table(
        "operation_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("operation_id", sa.String(36), nullable=False),
        sa.Column("vm", sa.String(200)),
        sa.Column("step", sa.String(60), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("result", sa.String(20), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("detail", JSON),
        sa.PrimaryKeyConstraint("id", name="pk_operation_steps"),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
            name="fk_operation_steps_operation_id_operations",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_operation_steps_operation_id", "operation_steps", ["operation_id"])
    op.create_table(
        "test_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("operation_id", sa.String(36)),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("checkpoint_id", sa.String(100)),
        sa.Column("checkpoint_time", TS),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("verification_ok", sa.Boolean()),
        sa.Column("cleanup_ok", sa.Boolean()),
        sa.Column("notes", sa.Text()),
        sa.Column("tested_by", sa.String(200)),
        sa.PrimaryKeyConstraint("id", name="pk_test_results"),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["operations.id"], name="fk_test_results_operation_id_operations"
        ),
    )
    op.create_index("ix_test_results_operation_id", "test_results", ["operation_id"])
    op.create_index("ix_test_results_vpg", "test_results", ["vpg"])
    op.create_table(
        "email_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("ref", sa.String(200)),
        sa.Column("recipients", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text()),
        sa.Column("attempted_at", TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("report_path", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_email_deliveries"),
    )


def downgrade() -> None:
    for table in (
        "email_deliveries",
        "test_results",
        "operation_steps",
        "operations",
        "samples",
        "alerts",
        "vpg_status_history",
        "vpg_runtime",
    ):
        op.drop_table(table)
