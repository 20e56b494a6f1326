"""Alembic environment for the interlock metadata database.

:meth:`interlock.store.db.Database.migrate` runs it with an open connection in
``config.attributes["connection"]``, already inside the transaction (and, on
PostgreSQL, the advisory lock) that the upgrade runs in. Developers may also run the
``alembic`` command against ``INTERLOCK_DATABASE_URL`` (``sqlalchemy.url`` in the
config overrides it) to autogenerate a new revision from ``interlock.store.tables``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Connection

from interlock.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    from interlock.store.db import Database

    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get(
        "INTERLOCK_DATABASE_URL"
    )
    if not url:
        raise SystemExit("set sqlalchemy.url or INTERLOCK_DATABASE_URL")
    database = Database(url, max_threads=1)
    try:
        with database.engine.begin() as conn:
            _run(conn)
    finally:
        database.dispose()


if context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    _run_online()
