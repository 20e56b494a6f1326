"""Spending budgets per UTC day and month, in memory and on the real Redis.

Both ledgers read a :class:`ManualClock` set to a chosen UTC instant, so days and months
turn when the test says so.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis.asyncio

from interlock.errors import BudgetExceededError, ConfigError, UnavailableError
from interlock.llm.budgets import (
    KEY_GRACE_S,
    MemoryLedger,
    RedisLedger,
    SpendLedger,
    open_ledger,
)
from tests.cache.conftest import free_port
from tests.clock import ManualClock
from tests.conftest import REDIS_URL, require_service


def at(year: int, month: int, day: int, hour: int, minute: int) -> ManualClock:
    """A clock standing at that UTC instant."""
    return ManualClock(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp())


@dataclass
class Backend:
    kind: str
    make: Callable[[ManualClock], SpendLedger]
    prefix: str


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "redis":
        require_service("Redis", REDIS_URL)
    prefix = f"test:spend:{uuid.uuid4().hex}:"
    made: list[SpendLedger] = []

    def make(clock: ManualClock) -> SpendLedger:
        ledger: SpendLedger
        if kind == "memory":
            ledger = MemoryLedger(clock=clock)
        else:
            ledger = RedisLedger(REDIS_URL, clock=clock, key_prefix=prefix, timeout_s=10.0)
        made.append(ledger)
        return ledger

    yield Backend(kind, make, prefix)
    for ledger in made:
        await ledger.aclose()
    if kind == "redis":
        async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)


async def test_a_spent_daily_budget_refuses_until_utc_midnight(backend: Backend) -> None:
    clock = at(2025, 3, 31, 22, 0)
    ledger = backend.make(clock)
    await ledger.add("dashboards", 4.0)
    await ledger.check("dashboards", per_day=5.0, per_month=None)  # under: passes

    await ledger.add("dashboards", 1.0)  # the call that reaches the budget was answered
    with pytest.raises(BudgetExceededError, match="daily budget") as info:
        await ledger.check("dashboards", per_day=5.0, per_month=None)
    assert info.value.retry_after_s == 2 * 3600
    await ledger.check("reports", per_day=5.0, per_month=None)  # another tenant
    await ledger.check("dashboards", per_day=None, per_month=None)  # no budget
    assert await ledger.spent("dashboards") == (5.0, 5.0)

    clock.advance(2 * 3600)  # 1 April, 00:00 UTC: a new day and a new month
    await ledger.check("dashboards", per_day=5.0, per_month=None)
    assert await ledger.spent("dashboards") == (0.0, 0.0)


async def test_a_spent_monthly_budget_refuses_until_the_next_month(backend: Backend) -> None:
    clock = at(2025, 12, 31, 23, 0)
    ledger = backend.make(clock)
    await ledger.add("t", 0.25)
    clock.advance(-86400)  # the day before, same month
    await ledger.add("t", 9.75)
    assert await ledger.spent("t") == (9.75, 10.0)
    with pytest.raises(BudgetExceededError, match="monthly budget") as info:
        await ledger.check("t", per_day=100.0, per_month=10.0)
    assert info.value.retry_after_s == 86400 + 3600  # to 1 January 2026, 00:00 UTC

    clock.advance(86400 + 3600)
    await ledger.check("t", per_day=100.0, per_month=10.0)


async def test_with_both_spent_the_later_reset_is_given(backend: Backend) -> None:
    clock = at(2025, 3, 15, 12, 0)
    ledger = backend.make(clock)
    await ledger.add("t", 2.0)
    with pytest.raises(BudgetExceededError) as info:
        await ledger.check("t", per_day=1.0, per_month=2.0)
    assert info.value.retry_after_s == (16 * 24 + 12) * 3600  # to 1 April
    await ledger.check("t", per_day=3.0, per_month=3.0)


async def test_small_costs_add_up(backend: Backend) -> None:
    ledger = backend.make(at(2025, 6, 1, 8, 0))
    for _ in range(100):
        await ledger.add("t", 0.001)
    day, month = await ledger.spent("t")
    assert day == pytest.approx(0.1)
    assert month == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cost"):
        await ledger.add("t", -1.0)


async def test_redis_totals_live_under_the_documented_keys_and_expire() -> None:
    require_service("Redis", REDIS_URL)
    prefix = f"test:spend:{uuid.uuid4().hex}:"
    clock = at(2025, 3, 31, 22, 0)
    async with (
        RedisLedger(REDIS_URL, clock=clock, key_prefix=prefix) as ledger,
        redis.asyncio.Redis.from_url(REDIS_URL) as client,
    ):
        day, month = f"{prefix}{{dashboards}}:d:20250331", f"{prefix}{{dashboards}}:m:202503"
        try:
            await ledger.add("dashboards", 1.5)
            assert await client.mget([day, month]) == [b"1.5", b"1.5"]
            assert 0 < await client.ttl(day) <= 2 * 3600 + KEY_GRACE_S
            assert 2 * 3600 < await client.ttl(month) <= 2 * 3600 + KEY_GRACE_S
        finally:
            await client.delete(day, month)


async def test_an_unavailable_redis_lets_calls_through_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = at(2025, 3, 31, 22, 0)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    async with RedisLedger(url, clock=clock, timeout_s=5.0) as ledger:
        await ledger.check("t", per_day=0.0, per_month=0.0)  # fails open
        assert (ledger.stats.errors, ledger.stats.unchecked) == (1, 1)
        await ledger.add("t", 2.0)  # within the backoff: lost without trying
        assert ledger.stats.unrecorded_usd == 2.0
        with pytest.raises(UnavailableError) as info:
            await ledger.spent("t")
        assert "hunter2" not in str(info.value)
        assert ledger.stats.errors == 2
    warnings = [r for r in caplog.records if r.name == "interlock.llm.budgets"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "hunter2" not in warnings[0].getMessage()


def test_open_ledger_picks_the_backend_by_scheme() -> None:
    assert isinstance(open_ledger("memory://"), MemoryLedger)
    assert isinstance(open_ledger("redis://127.0.0.1:6379/0"), RedisLedger)
    with pytest.raises(ConfigError, match="memory://"):
        open_ledger("postgres://host/db")
