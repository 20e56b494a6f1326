"""Alembic environment for the interlock metadata database.

:meth:`interlock.store.db.Database.migrate` runs it with an open connection in
``config.attributes["connection"]``, already inside the transaction (and, on
PostgreSQL, the advisory lock) that the upgrade runs in. Developers may also run the
``alembic`` command against the settings' database (``database_url``: ``interlock.toml``,
``INTERLOCK_DATABASE_URL``, else ``<home>/interlock.db``; ``sqlalchemy.url`` in the alembic
config overrides it) to autogenerate a new revision from ``interlock.store.tables``.
"""

from __future__ import annotations

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
    from interlock.settings import load_settings
    from interlock.store.db import Database

    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        url = load_settings().effective_database_url
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
