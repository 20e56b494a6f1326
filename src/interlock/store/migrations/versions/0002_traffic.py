"""Traffic policies and the events that changed them.

Revision ID: 0002
Revises: 0001
Created: 2025-01-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "traffic_policies",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("policy", _JSON, nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model"], ["models.name"], name="fk_traffic_policies_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model", name="pk_traffic_policies"),
    )
    op.create_table(
        "traffic_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model"], ["models.name"], name="fk_traffic_events_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_traffic_events"),
    )
    op.create_index("ix_traffic_events_model_id", "traffic_events", ["model", "id"])


def downgrade() -> None:
    op.drop_index("ix_traffic_events_model_id", table_name="traffic_events")
    op.drop_table("traffic_events")
    op.drop_table("traffic_policies")
