"""LLM gateway usage: calls summed per second and dimensions, indexed by time and tenant.

Revision ID: 0003
Revises: 0002
Created: 2025-01-15
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "llm_usage",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("deployment", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Double(), nullable=False),
        sa.Column("cache_hit", sa.Boolean(), nullable=False),
        sa.Column("saved_cost_usd", sa.Double(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_llm_usage"),
    )
    op.create_index("ix_llm_usage_at", "llm_usage", ["at"])
    op.create_index("ix_llm_usage_tenant_at", "llm_usage", ["tenant", "at"])


def downgrade() -> None:
    op.drop_index("ix_llm_usage_tenant_at", table_name="llm_usage")
    op.drop_index("ix_llm_usage_at", table_name="llm_usage")
    op.drop_table("llm_usage")
