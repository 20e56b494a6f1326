"""Serving nodes report the traffic policy revisions they apply; events keep the policy.

Revision ID: 0005
Revises: 0004
Created: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "traffic_nodes",
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("node", name="pk_traffic_nodes"),
    )
    with op.batch_alter_table("traffic_events") as batch:
        batch.add_column(sa.Column("policy", _JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("traffic_events") as batch:
        batch.drop_column("policy")
    op.drop_table("traffic_nodes")
