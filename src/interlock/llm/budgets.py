"""Spending budgets: what each tenant spent per UTC day and month, checked before a call.

The gateway checks a tenant's budgets (:meth:`SpendLedger.check`) before calling a
provider and adds the call's cost, from the upstream's usage and the deployment's
prices, afterwards (:meth:`SpendLedger.add`). A budget is spent once what was spent
reaches it, so the call that crosses the line is answered and the next one is refused
with :class:`~interlock.errors.BudgetExceededError`, whose ``retry_after_s`` runs to the
next UTC midnight (daily) or the first of the next month (monthly; it wins when both
are spent). Concurrent calls checked before any of them is added may each pass: a
budget bounds spending to itself plus the calls in flight, not to the cent.

Periods follow the clock's ``now()`` in UTC, so tests move days and months by hand.

- ``memory://``: :class:`MemoryLedger`, one node; totals start again with the process.
- ``redis://`` (``rediss://``, ``unix://``): :class:`RedisLedger`, shared by every
  node. A check is one ``MGET`` of ``PREFIX{tenant}:d:YYYYMMDD`` and
  ``PREFIX{tenant}:m:YYYYMM``; an add is one round trip of ``INCRBYFLOAT`` and
  ``EXPIRE`` on both, each key expiring an hour after its period ends.

The Redis ledger **fails open**, like the rate limiter: when Redis is down or slow a
check lets the call through and an add is lost (``stats`` counts both, and the dollars
not recorded). The outage policy is :class:`interlock.store.redis.Outage`: one warning
per outage, a jittered backoff after each failure during which Redis is not called,
then a single probe. :meth:`~SpendLedger.spent` **fails closed**: a report of zero would
be a lie, so it raises :class:`~interlock.errors.UnavailableError` (it is an explicit
report, so it asks Redis even during a backoff).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self
from urllib.parse import urlsplit

from interlock._core.clock import SystemClock
from interlock.errors import BudgetExceededError, ConfigError
from interlock.settings import mask_url
from interlock.store.redis import (
    MAX_CONNECTIONS,
    REDIS_SCHEMES,
    Outage,
    check_url,
    close_client,
    open_client,
)

if TYPE_CHECKING:
    import redis.asyncio

    from interlock._core.clock import Clock

__all__ = [
    "LedgerStats",
    "MemoryLedger",
    "RedisLedger",
    "SpendLedger",
    "open_ledger",
]

logger = logging.getLogger("interlock.llm.budgets")

KEY_GRACE_S = 3600
"""How long a Redis total outlives its period (clocks of nodes differ a little)."""


@dataclass(slots=True)
class LedgerStats:
    """Counters of one ledger: failed store calls, checks let through unchecked, and
    the dollars whose add was lost, all while the store was unavailable."""

    errors: int = 0
    unchecked: int = 0
    unrecorded_usd: float = 0.0


class SpendLedger(Protocol):
    """What tenants spent, in USD, per UTC day and month."""

    stats: LedgerStats

    async def check(self, tenant: str, *, per_day: float | None, per_month: float | None) -> None:
        """Pass when ``tenant`` has spent less than each budget given (None: no budget).

        Raises:
            BudgetExceededError: what was spent reached a budget; ``retry_after_s`` is the
                time until that period ends (the month's when both are spent).
        """
        ...

    async def add(self, tenant: str, cost_usd: float) -> None:
        """Add ``cost_usd`` (>= 0) to the tenant's day and month."""
        ...

    async def spent(self, tenant: str) -> tuple[float, float]:
        """What ``tenant`` spent today and this month (UTC)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the ledger cannot be used afterwards."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_ledger(
    url: str,
    *,
    clock: Clock | None = None,
    key_prefix: str = "interlock:spend:",
    timeout_s: float = 0.5,
) -> SpendLedger:
    """The ledger named by the scheme of ``url``; nothing is connected yet.

    Raises:
        ConfigError: an unknown scheme or an unusable URL.
    """
    scheme = urlsplit(url).scheme.lower()
    clock = clock or SystemClock()
    if scheme == "memory":
        return MemoryLedger(clock=clock)
    if scheme in REDIS_SCHEMES:
        return RedisLedger(url, clock=clock, key_prefix=key_prefix, timeout_s=timeout_s)
    raise ConfigError(
        f"unknown spend-ledger URL scheme {scheme!r} in {mask_url(url)!r}: "
        "expected memory:// or redis://host:port/db"
    )


# -- periods -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Periods:
    """The UTC day and month around an instant, and when each ends."""

    day: str  # YYYYMMDD
    month: str  # YYYYMM
    day_left_s: float
    month_left_s: float

    @classmethod
    def at(cls, now: datetime) -> _Periods:
        now = now.astimezone(UTC)
        midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        next_month = datetime(year, month, 1, tzinfo=UTC)
        return cls(
            day=f"{now:%Y%m%d}",
            month=f"{now:%Y%m}",
            day_left_s=(midnight - now).total_seconds(),
            month_left_s=(next_month - now).total_seconds(),
        )


def _enforce(
    tenant: str,
    spent: tuple[float, float],
    per_day: float | None,
    per_month: float | None,
    periods: _Periods,
) -> None:
    day, month = spent
    if per_month is not None and month >= per_month:
        raise BudgetExceededError(
            f"tenant {tenant!r} has spent its monthly budget: ${month:.4f} of "
            f"${per_month:.2f} in {periods.month[:4]}-{periods.month[4:]} (UTC)",
            retry_after_s=periods.month_left_s,
        )
    if per_day is not None and day >= per_day:
        raise BudgetExceededError(
            f"tenant {tenant!r} has spent its daily budget: ${day:.4f} of "
            f"${per_day:.2f} on {periods.day[:4]}-{periods.day[4:6]}-{periods.day[6:]} (UTC)",
            retry_after_s=periods.day_left_s,
        )


def _check_cost(cost_usd: float) -> None:
    if not (cost_usd >= 0 and math.isfinite(cost_usd)):
        raise ValueError(f"a cost must be a finite amount >= 0, not {cost_usd}")


# -- memory ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Spend:
    day: str = ""
    month: str = ""
    day_usd: float = 0.0
    month_usd: float = 0.0

    def roll(self, periods: _Periods) -> None:
        """Start the totals of a period that began since the last call."""
        if self.day != periods.day:
            self.day, self.day_usd = periods.day, 0.0
        if self.month != periods.month:
            self.month, self.month_usd = periods.month, 0.0


class MemoryLedger:
    """Totals in this process; each call is O(1) and awaits nothing."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.stats = LedgerStats()
        self._clock = clock or SystemClock()
        self._tenants: dict[str, _Spend] = {}

    def __repr__(self) -> str:
        return f"MemoryLedger(tenants={len(self._tenants)})"

    def _spend(self, tenant: str, periods: _Periods) -> _Spend:
        spend = self._tenants.get(tenant)
        if spend is None:
            spend = self._tenants[tenant] = _Spend()
        spend.roll(periods)
        return spend

    async def check(self, tenant: str, *, per_day: float | None, per_month: float | None) -> None:
        if per_day is None and per_month is None:
            return
        periods = _Periods.at(self._clock.now())
        spend = self._spend(tenant, periods)
        _enforce(tenant, (spend.day_usd, spend.month_usd), per_day, per_month, periods)

    async def add(self, tenant: str, cost_usd: float) -> None:
        _check_cost(cost_usd)
        spend = self._spend(tenant, _Periods.at(self._clock.now()))
        spend.day_usd += cost_usd
        spend.month_usd += cost_usd

    async def spent(self, tenant: str) -> tuple[float, float]:
        spend = self._spend(tenant, _Periods.at(self._clock.now()))
        return spend.day_usd, spend.month_usd

    async def aclose(self) -> None:
        self._tenants.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- redis -------------------------------------------------------------------------------


class RedisLedger:
    """Totals in Redis, shared by every node using the same ``key_prefix``.

    ``timeout_s`` bounds each call, connection included; ``clock.now()`` picks the day
    and month, and ``clock.monotonic()`` times the backoff after a failure.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        key_prefix: str = "interlock:spend:",
        timeout_s: float = 0.5,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the spend-ledger timeout must be positive, not {timeout_s}")
        check_url(url, "spend-ledger")
        self.url = url
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.stats = LedgerStats()
        self._clock = clock or SystemClock()
        self.outage = Outage(
            "redis spend ledger",
            url,
            clock=self._clock,
            logger=logger,
            fails_open=True,
            while_down="letting calls through unchecked",
        )
        self._client: redis.asyncio.Redis | None = None

    def __repr__(self) -> str:
        return f"RedisLedger({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = open_client(
                self.url, timeout_s=self.timeout_s, max_connections=MAX_CONNECTIONS
            )
        return self._client

    def _keys(self, tenant: str, periods: _Periods) -> tuple[str, str]:
        base = f"{self.key_prefix}{{{tenant}}}"
        return f"{base}:d:{periods.day}", f"{base}:m:{periods.month}"

    async def _read(self, tenant: str, periods: _Periods) -> tuple[float, float]:
        async with asyncio.timeout(self.timeout_s):
            day, month = await self._redis().mget(self._keys(tenant, periods))
        return float(day or 0.0), float(month or 0.0)

    async def check(self, tenant: str, *, per_day: float | None, per_month: float | None) -> None:
        if per_day is None and per_month is None:
            return
        periods = _Periods.at(self._clock.now())
        if not self.outage.may_call():
            self.stats.unchecked += 1
            return
        try:
            spent = await self._read(tenant, periods)
        except Exception as exc:  # fail open, whatever broke
            self._failed("check", exc)
            self.stats.unchecked += 1
            return
        except BaseException:
            self.outage.cancelled()
            raise
        self.outage.succeeded()
        _enforce(tenant, spent, per_day, per_month, periods)

    async def add(self, tenant: str, cost_usd: float) -> None:
        _check_cost(cost_usd)
        if cost_usd == 0:
            return
        periods = _Periods.at(self._clock.now())
        if not self.outage.may_call():
            self.stats.unrecorded_usd += cost_usd
            return
        day_key, month_key = self._keys(tenant, periods)
        try:
            async with asyncio.timeout(self.timeout_s):
                pipe = self._redis().pipeline(transaction=False)
                pipe.incrbyfloat(day_key, cost_usd)
                pipe.expire(day_key, math.ceil(periods.day_left_s) + KEY_GRACE_S)
                pipe.incrbyfloat(month_key, cost_usd)
                pipe.expire(month_key, math.ceil(periods.month_left_s) + KEY_GRACE_S)
                await pipe.execute()
        except Exception as exc:  # fail open, whatever broke
            self._failed("add", exc)
            self.stats.unrecorded_usd += cost_usd
            return
        except BaseException:
            self.outage.cancelled()
            raise
        self.outage.succeeded()

    async def spent(self, tenant: str) -> tuple[float, float]:
        """What ``tenant`` spent today and this month (UTC).

        An explicit report, it asks Redis even while checks and adds leave it alone.

        Raises:
            UnavailableError: Redis failed; unlike checks and adds, this fails closed.
        """
        try:
            spent = await self._read(tenant, _Periods.at(self._clock.now()))
        except Exception as exc:
            self._failed("spent", exc)
            raise self.outage.unavailable("spent", exc) from exc
        except BaseException:
            self.outage.cancelled()
            raise
        self.outage.succeeded()
        return spent

    def _failed(self, op: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.outage.failed(op, exc)

    async def aclose(self) -> None:
        """Close the connection pool; a later call would open a new one."""
        client, self._client = self._client, None
        if client is None:
            return
        await close_client(client, timeout_s=self.timeout_s, what="redis spend ledger")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
