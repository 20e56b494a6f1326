"""The metadata tables, in SQLAlchemy Core.

Migrations in ``store/migrations/versions`` create and change these tables; a test
checks that the migrated database matches this module. Every timestamp is stored and
returned as a timezone-aware UTC ``datetime`` (:class:`UTCDateTime`).

- ``models``: one row per model name.
- ``model_versions``: the immutable versions of a model, numbered from 1.
- ``model_aliases``: movable names (``champion``, ``challenger``…) for versions.
- ``traffic_policies``: a model's traffic policy as JSON (weights, shadow, canary,
  fallback) with a revision that every change bumps.
- ``traffic_events``: what changed a model's traffic, and why, newest last, with the
  policy the change left (``NULL`` when it left none, or changed none).
- ``traffic_nodes``: one row per serving node (heartbeat): its host, pid, start and last
  refresh, and per model the policy revision it applies.
- ``llm_usage``: LLM gateway calls (tokens, cost, cache savings), one row per second
  and combination of tenant, model, deployment, kind, status and cache hit, with the
  number of calls it sums; written in batches by :class:`interlock.llm.usage.UsageRecorder`.
- ``event_dedupe``: the event worker's idempotency records, the answer published for a
  requestId until ``expires_at``; kept by :class:`interlock.serving.dedupe.DatabaseDedupe`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

__all__ = [
    "UTCDateTime",
    "event_dedupe",
    "llm_usage",
    "metadata",
    "model_aliases",
    "model_versions",
    "models",
    "traffic_events",
    "traffic_nodes",
    "traffic_policies",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# JSON everywhere, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as an aware UTC ``datetime``.

    SQLite keeps no offset, so the value is stored as naive UTC there; PostgreSQL
    keeps ``timestamptz`` and returns it in the session's zone, converted back here.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: interlock stores aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column(
        "model",
        sa.String(128),
        sa.ForeignKey("models.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("artifact_name", sa.String(255), nullable=False),
    sa.Column("schema", JSONType, nullable=False),
    sa.Column("task", sa.String(32), nullable=False),
    sa.Column("metrics", JSONType, nullable=False),
    sa.Column("tags", JSONType, nullable=False),
    sa.Column("trusted", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

model_aliases = sa.Table(
    "model_aliases",
    metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(
        ["model", "version"],
        ["model_versions.model", "model_versions.version"],
        ondelete="CASCADE",
    ),
)

traffic_policies = sa.Table(
    "traffic_policies",
    metadata,
    sa.Column(
        "model",
        sa.String(128),
        sa.ForeignKey("models.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("policy", JSONType, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

traffic_events = sa.Table(
    "traffic_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "model",
        sa.String(128),
        sa.ForeignKey("models.name", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("policy", JSONType, nullable=True),  # the policy this event left, if any
    sa.Index("ix_traffic_events_model_id", "model", "id"),
)

traffic_nodes = sa.Table(
    "traffic_nodes",
    metadata,
    sa.Column("node", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("last_seen", UTCDateTime(), nullable=False),
    sa.Column("applied", JSONType, nullable=False),  # model -> policy revision it applies
)

llm_usage = sa.Table(
    "llm_usage",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("at", UTCDateTime(), nullable=False),  # the second the calls fall in
    sa.Column("requests", sa.Integer, nullable=False),  # how many calls the row sums
    sa.Column("tenant", sa.String(128), nullable=True),  # NULL: the gateway is open
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("deployment", sa.String(128), nullable=True),  # NULL: no upstream answered
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Double, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False),
    sa.Column("saved_cost_usd", sa.Double, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),  # the sum over the calls
    sa.Index("ix_llm_usage_at", "at"),
    sa.Index("ix_llm_usage_tenant_at", "tenant", "at"),
)

event_dedupe = sa.Table(
    "event_dedupe",
    metadata,
    sa.Column("request_id", sa.String(200), primary_key=True),
    sa.Column("answer", sa.LargeBinary, nullable=False),  # the completion as published
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Index("ix_event_dedupe_expires_at", "expires_at"),
)
