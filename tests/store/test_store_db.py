"""The metadata database: transactions, migrations, pragmas and error translation."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from interlock.errors import ConfigError, ModelNotFoundError, StoreError
from interlock.store import Database
from interlock.store.tables import metadata, models

TABLES = {
    "alembic_version",
    "event_dedupe",
    "llm_usage",
    "model_aliases",
    "model_versions",
    "models",
    "traffic_events",
    "traffic_nodes",
    "traffic_policies",
}


def _tables(conn: Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


def _head(conn: Connection) -> list[str]:
    return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


async def test_migrate_creates_the_tables_and_is_idempotent(database_url: str) -> None:
    async with Database(database_url) as db:
        db.migrate()
        assert await db.run(_tables, readonly=True) == TABLES
        db.migrate()
        assert await db.run(_head) == ["0005"]


async def test_migrated_schema_matches_tables_module(db: Database) -> None:
    def diff(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    assert await db.run(diff, readonly=True) == []


async def test_postgres_tables_land_in_the_search_path_schema(postgres_url: str) -> None:
    schema = postgres_url.rsplit("%3D", 1)[1]
    async with Database(postgres_url) as db:
        db.migrate()

        def placed(conn: Connection) -> set[tuple[str, str]]:
            rows = conn.execute(
                sa.text(
                    "SELECT table_schema, table_name FROM information_schema.tables"
                    " WHERE table_name = ANY(:names) AND table_schema IN (:schema, 'public')"
                ),
                {"names": sorted(TABLES), "schema": schema},
            )
            return {(s, t) for s, t in rows}

        assert await db.run(placed) == {(schema, t) for t in TABLES}


async def test_concurrent_migrations_in_one_process(database_url: str) -> None:
    first, second = Database(database_url), Database(database_url)
    try:
        await asyncio.gather(asyncio.to_thread(first.migrate), asyncio.to_thread(second.migrate))
        assert await first.run(_head) == ["0005"]
    finally:
        first.dispose()
        second.dispose()


_MIGRATE = """
import sys
from interlock.store import Database
db = Database(sys.argv[1])
sys.stdin.readline()  # start together: the parent releases every process at once
db.migrate()
db.dispose()
"""


@pytest.mark.parametrize("processes", [4])
async def test_concurrent_migrations_in_separate_processes(
    database_url: str, processes: int
) -> None:
    """Several servers starting at once against an empty database all come up."""

    def run_all() -> list[tuple[int, str]]:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _MIGRATE, database_url],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            results.append((proc.returncode, err))
        return results

    results = await asyncio.to_thread(run_all)
    assert [(code, err) for code, err in results if code != 0] == []
    async with Database(database_url) as db:
        assert await db.run(_head) == ["0005"]


async def test_run_commits_or_rolls_back(db: Database) -> None:
    now = datetime.now(UTC)

    def insert(conn: Connection) -> None:
        conn.execute(sa.insert(models).values(name="kept", created_at=now))

    def insert_then_fail(conn: Connection) -> None:
        conn.execute(sa.insert(models).values(name="dropped", created_at=now))
        raise ModelNotFoundError("raised inside the transaction")

    await db.run(insert)
    with pytest.raises(ModelNotFoundError, match="raised inside the transaction"):
        await db.run(insert_then_fail)

    names = await db.run(lambda c: list(c.execute(sa.select(models.c.name)).scalars()))
    assert names == ["kept"]


async def test_timestamps_come_back_aware_utc(db: Database) -> None:
    local = datetime(2025, 6, 1, 12, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=2)))
    await db.run(lambda c: c.execute(sa.insert(models).values(name="m", created_at=local)))
    stored = await db.run(lambda c: c.execute(sa.select(models.c.created_at)).scalar_one())
    assert stored == local
    assert stored.tzinfo is UTC
    assert stored.hour == 10

    naive = datetime(2025, 6, 1, 12, 0, 0)
    with pytest.raises(StoreError, match="naive datetime"):
        await db.run(lambda c: c.execute(sa.insert(models).values(name="n", created_at=naive)))


async def test_constraint_violations_become_store_errors(db: Database) -> None:
    row = {"name": "dup", "created_at": datetime.now(UTC)}
    await db.run(lambda c: c.execute(sa.insert(models).values(row)))
    with pytest.raises(StoreError, match=f"^database {re.escape(db.url)}: ") as caught:
        await db.run(lambda c: c.execute(sa.insert(models).values(row)))
    assert isinstance(caught.value.__cause__, sa.exc.IntegrityError)


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'deep' / 'dir' / 'x.db'}"
    async with Database(url) as db:

        def pragmas(conn: Connection) -> tuple[object, ...]:
            return tuple(
                conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys")
            )

        assert await db.run(pragmas, readonly=True) == ("wal", 30_000, 1)
        assert (tmp_path / "deep" / "dir" / "x.db").is_file()


async def test_sqlite_in_memory() -> None:
    async with Database("sqlite://") as db:
        db.migrate()
        assert await db.run(_tables) == TABLES


async def test_unreachable_postgres_names_the_database_without_its_password() -> None:
    async with Database("postgresql://app:s3cret@127.0.0.1:1/meta") as db:
        with pytest.raises(StoreError) as caught:
            await db.run(lambda c: c.execute(sa.text("SELECT 1")))
    message = str(caught.value)
    assert message.startswith("database postgresql://app:***@127.0.0.1:1/meta: ")
    assert "s3cret" not in message
    assert caught.value.retryable


async def test_migrate_failure_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()  # a directory where the database file should be
    async with Database(f"sqlite:///{tmp_path / 'db'}") as db:
        with pytest.raises(StoreError, match=r"^database sqlite:///.*: unable to open"):
            db.migrate()


@pytest.mark.parametrize(
    "url",
    ["mysql://u@h/db", "postgresql+asyncpg://h/db", "sqlite+aiosqlite:///x.db", "not a url"],
)
def test_unsupported_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        Database(url)


def test_repr_masks_the_password() -> None:
    db = Database("postgresql://app:s3cret@127.0.0.1:5432/meta")
    try:
        assert repr(db) == "Database('postgresql://app:***@127.0.0.1:5432/meta')"
        assert db.dialect == "postgresql"
    finally:
        db.dispose()


async def test_run_after_dispose_is_a_store_error(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    await db.aclose()
    with pytest.raises(StoreError, match=r"^database sqlite:///.* is closed$"):
        await db.run(lambda c: c.execute(sa.text("SELECT 1")))
