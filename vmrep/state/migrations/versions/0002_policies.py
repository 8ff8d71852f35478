"""commit policy deadlines, the event outbox, the RTO objective beside each test result

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "commit_policy_deadlines",
        sa.Column("operation_id", sa.String(36), nullable=False),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("policy", sa.String(20), nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("applied_at", TS),
        sa.Column("applied_operation_id", sa.String(36)),
        sa.Column("outcome", sa.String(40)),
        sa.Column("last_error", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("operation_id", name="pk_commit_policy_deadlines"),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
            name="fk_commit_policy_deadlines_operation_id_operations",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_commit_policy_deadlines_due_at", "commit_policy_deadlines", ["due_at"])
    op.create_index("ix_commit_policy_deadlines_vpg", "commit_policy_deadlines", ["vpg"])
    op.create_table(
        "event_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("vpg", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("emitted_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_event_outbox"),
    )
    op.create_index("ix_event_outbox_emitted_at_id", "event_outbox", ["emitted_at", "id"])
    with op.batch_alter_table("test_results") as batch:
        batch.add_column(sa.Column("rto_seconds", sa.Float()))
        batch.add_column(sa.Column("rto_target_seconds", sa.Float()))
        batch.add_column(sa.Column("rto_met", sa.Boolean()))


def downgrade() -> None:
    with op.batch_alter_table("test_results") as batch:
        batch.drop_column("rto_met")
        batch.drop_column("rto_target_seconds")
        batch.drop_column("rto_seconds")
    op.drop_index("ix_event_outbox_emitted_at_id", table_name="event_outbox")
    op.drop_table("event_outbox")
    op.drop_index("ix_commit_policy_deadlines_vpg", table_name="commit_policy_deadlines")
    op.drop_index("ix_commit_policy_deadlines_due_at", table_name="commit_policy_deadlines")
    op.drop_table("commit_policy_deadlines")
