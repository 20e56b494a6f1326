"""Event worker idempotency records: an answer per requestId until it expires.

Revision ID: 0004
Revises: 0003
Created: 2025-01-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_dedupe",
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("answer", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_event_dedupe"),
    )
    op.create_index("ix_event_dedupe_expires_at", "event_dedupe", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_event_dedupe_expires_at", table_name="event_dedupe")
    op.drop_table("event_dedupe")
