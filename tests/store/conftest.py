"""Fixtures for the store tests: one metadata database per test, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from interlock.store import Database


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database, disposed after the test."""
    async with Database(database_url) as database:
        database.migrate()
        yield database


# private redis-server processes that a test may kill and restart (tests/store/test_redis_*)
from tests.cache.conftest import redis_server  # noqa: E402, F401
