"""Statements whose spelling differs between SQLite and PostgreSQL.

Both dialects support ``INSERT … ON CONFLICT``; SQLAlchemy exposes it per dialect, so
these helpers pick the construct from the connection they will run on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

__all__ = ["insert_or_ignore", "upsert"]


def _insert(conn: Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no INSERT … ON CONFLICT for dialect {name}")


def insert_or_ignore(
    conn: Connection, table: sa.Table, values: Mapping[str, Any]
) -> sa.CursorResult[Any]:
    """Insert a row unless one with the same key exists; never raises on the conflict."""
    stmt = _insert(conn, table).values(dict(values)).on_conflict_do_nothing()
    return conn.execute(stmt)


def upsert(
    conn: Connection,
    table: sa.Table,
    values: Mapping[str, Any],
    *,
    keys: Sequence[str],
) -> sa.CursorResult[Any]:
    """Insert a row, or update every non-key column of the row with the same ``keys``."""
    stmt = _insert(conn, table).values(dict(values))
    updates = {col: stmt.excluded[col] for col in values if col not in keys}
    return conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates))
