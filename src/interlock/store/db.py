"""The metadata database: one SQLAlchemy engine, used from worker threads.

A :class:`Database` is built from a URL:

- ``sqlite:///path/to/file.db``: the parent directory is created; every connection runs
  in WAL mode with a busy timeout and foreign keys on. Transactions that write start
  with ``BEGIN IMMEDIATE`` so that concurrent writers queue on the busy timeout instead
  of failing when they upgrade a read lock; read-only ones start deferred and never wait.
  ``sqlite://`` (no path) is a private in-memory database on one connection.
- ``postgresql://…``, ``postgresql+psycopg://…`` (or ``postgres://…``): psycopg 3, with
  a pre-ping on checkout. A ``?options=-csearch_path%3D<schema>`` query keeps every
  table, including Alembic's, in that schema.

The engine is synchronous; :meth:`Database.run` runs a function inside one transaction
on a bounded pool of worker threads, so the event loop never waits on the database.
Errors from SQLAlchemy and the driver become :class:`~interlock.errors.StoreError`
here, naming the database with its password masked.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from interlock.errors import ConfigError, InterlockError, StoreError
from interlock.settings import mask_url

__all__ = ["Database"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key that serialises migrations across processes ("intlkmig").
_MIGRATION_LOCK_KEY: Final = 0x696E746C6B6D6967
# Alembic keeps its running context in module globals: one migration per process at a time.
_ALEMBIC_LOCK = threading.Lock()
_BEGIN_OPTION: Final = "interlock_sqlite_begin"


class Database:
    """The metadata database behind a URL; an async context manager that disposes it.

    ``max_threads`` bounds both the worker threads and the connection pool.
    """

    def __init__(self, url: str, *, max_threads: int = 8, busy_timeout_ms: int = 30_000) -> None:
        if max_threads < 1:
            raise ConfigError("max_threads must be at least 1")
        self._masked = mask_url(url)
        try:
            sa_url = make_url(url)
        except ArgumentError as exc:
            raise ConfigError(f"cannot parse database URL {self._masked!r}") from exc
        backend, _, driver = sa_url.drivername.partition("+")
        if backend == "sqlite" and driver in ("", "pysqlite"):
            self._engine, max_threads = _sqlite_engine(sa_url, max_threads, busy_timeout_ms)
        elif backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
            self._engine = _postgres_engine(sa_url, max_threads, self._masked)
        else:
            raise ConfigError(
                f"unsupported database URL {self._masked!r}:"
                " use sqlite:///PATH or postgresql+psycopg://…"
            )
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="interlock-db")

    @property
    def url(self) -> str:
        """The URL with its password masked, for messages and logs."""
        return self._masked

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @property
    def engine(self) -> Engine:
        """The synchronous engine; use it only from worker threads."""
        return self._engine

    async def run(self, fn: Callable[[Connection], T], *, readonly: bool = False) -> T:
        """Run ``fn(connection)`` inside one transaction on a worker thread.

        The transaction commits when ``fn`` returns and rolls back when it raises.
        ``readonly`` marks a transaction that only reads: on SQLite it then starts
        deferred, so it never waits for a writer. Interlock errors raised by ``fn``
        propagate as they are; database failures become :class:`StoreError`.
        """
        loop = asyncio.get_running_loop()
        call = functools.partial(self.run_sync, fn, readonly=readonly)
        context = contextvars.copy_context()
        try:
            future = loop.run_in_executor(self._executor, context.run, call)
        except RuntimeError as exc:  # the executor was shut down by dispose()
            raise StoreError(f"database {self._masked} is closed") from exc
        return await future

    def run_sync(self, fn: Callable[[Connection], T], *, readonly: bool = False) -> T:
        """:meth:`run`, blocking the calling thread; for worker threads and scripts."""
        with self._translate(), self._engine.connect() as conn:
            if readonly:
                conn = conn.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
            with conn.begin():
                return fn(conn)

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision; blocking and idempotent.

        Safe when several processes start at once: on PostgreSQL the upgrade holds a
        transaction-scoped advisory lock, on SQLite its ``BEGIN IMMEDIATE`` write lock.
        """
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("path_separator", "os")
        with _ALEMBIC_LOCK, self._translate(), self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
            except CommandError as exc:
                raise StoreError(f"database {self._masked}: migration failed: {exc}") from exc
        logger.debug("database schema is current", extra={"database": self._masked})

    def dispose(self) -> None:
        """Wait for running transactions, then close every pooled connection."""
        self._executor.shutdown(wait=True)
        self._engine.dispose()

    async def aclose(self) -> None:
        """:meth:`dispose` without blocking the event loop."""
        await asyncio.to_thread(self.dispose)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Database({self._masked!r})"

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn SQLAlchemy and driver errors into :class:`StoreError`."""
        try:
            yield
        except InterlockError:
            raise
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None)
            reason = str(orig if orig is not None else exc).strip().splitlines()
            detail = reason[0] if reason else type(exc).__name__
            raise StoreError(f"database {self._masked}: {detail}") from exc


def _sqlite_engine(url: sa.URL, max_threads: int, busy_timeout_ms: int) -> tuple[Engine, int]:
    database = url.database or ""
    in_memory = database in ("", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if in_memory:
        # One shared connection: it is the whole database. One thread may use it.
        kwargs["poolclass"] = StaticPool
        max_threads = 1
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["pool_size"] = max_threads
        kwargs["max_overflow"] = 1
    engine = sa.create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver: BEGIN is emitted below.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine, max_threads


def _postgres_engine(url: sa.URL, max_threads: int, masked: str) -> Engine:
    url = url.set(drivername="postgresql+psycopg")
    query = dict(url.query)
    query.setdefault("connect_timeout", "10")
    url = url.set(query=query)
    try:
        return sa.create_engine(url, pool_pre_ping=True, pool_size=max_threads, max_overflow=1)
    except ImportError as exc:
        raise ConfigError(
            f"database {masked} needs psycopg 3: pip install 'interlock[postgres]' ({exc})"
        ) from exc
