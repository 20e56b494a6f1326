"""The model registry: models, their versions and aliases.

Revision ID: 0001
Revises:
Created: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_models"),
    )
    op.create_table(
        "model_versions",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_name", sa.String(255), nullable=False),
        sa.Column("schema", _JSON, nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("metrics", _JSON, nullable=False),
        sa.Column("tags", _JSON, nullable=False),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model"], ["models.name"], name="fk_model_versions_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model", "version", name="pk_model_versions"),
    )
    op.create_table(
        "model_aliases",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("alias", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model", "version"],
            ["model_versions.model", "model_versions.version"],
            name="fk_model_aliases_model_versions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model", "alias", name="pk_model_aliases"),
    )


def downgrade() -> None:
    op.drop_table("model_aliases")
    op.drop_table("model_versions")
    op.drop_table("models")
