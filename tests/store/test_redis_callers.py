"""Each Redis caller while a Redis server of the test's own is killed, then restarted.

Every caller documents whether it fails open or closed; this checks what it does when
its Redis dies mid-use, that the calls made during the backoff do not touch the network,
and that after a restart a burst of concurrent calls sends a single probe per backoff
(no storm of reconnects: the restarted server counts the connections it received).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio

from interlock.app import build_components, start_components, stop_components
from interlock.cache.redis import RedisCache
from interlock.errors import RateLimitedError, UnavailableError
from interlock.llm.budgets import RedisLedger
from interlock.llm.limits import Limit, RedisLimiter
from interlock.llm.semantic import RedisVectorLog, VectorIndex, normalise
from interlock.serving.dedupe import RedisDedupe
from interlock.store.redis import BACKOFF_MAX_S, Outage, observe
from tests.cache.conftest import RedisServer, eventually
from tests.clock import ManualClock

MakeServer = Callable[[], RedisServer]
BURST = 20


async def connections_received(server: RedisServer) -> int:
    """Connections the server accepted since it started (this one excluded)."""
    async with redis.asyncio.Redis.from_url(server.url) as admin:
        info = await admin.info("stats")
    return int(info["total_connections_received"]) - 1


async def recover(
    server: RedisServer,
    clock: ManualClock,
    outage: Outage,
    call: Callable[[], Awaitable[Any]],
) -> None:
    """Restart ``server``; after each backoff fire a burst of calls until one probe works.

    Each burst lets exactly one call through (the probe) while Redis is down, and the
    restarted server sees about one connection per burst, not one per call.
    """
    await server.start()
    bursts = 0
    while outage.down:
        assert bursts < 10, "the caller did not recover"
        clock.advance(BACKOFF_MAX_S)
        probes = outage.probes
        await asyncio.gather(*(call() for _ in range(BURST)), return_exceptions=True)
        bursts += 1
        assert outage.probes == probes + 1  # a single probe, however many calls
    assert await connections_received(server) <= bursts + 1


async def test_the_cache_serves_misses_while_redis_is_dead_then_hits_again(
    redis_server: MakeServer,
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    keys, items = [b"a", b"b"], [(b"a", b"1"), (b"b", b"2")]
    async with RedisCache(server.url, timeout_s=1.0, clock=clock) as cache:
        await cache.set_many(items, ttl_s=60)
        assert await cache.get_many(keys) == [b"1", b"2"]

        server.kill()
        assert await cache.get_many(keys) == [None, None]  # fails open: misses
        await cache.set_many(items, ttl_s=60)  # and stores nothing, without raising
        assert cache.stats.errors == 1  # the store was skipped: within the backoff
        for _ in range(100):
            assert await cache.get_many(keys) == [None, None]
        assert cache.stats.errors == 1

        await recover(server, clock, cache.outage, lambda: cache.get_many(keys))
        await cache.set_many(items, ttl_s=60)
        assert await cache.get_many(keys) == [b"1", b"2"]


async def test_the_rate_limiter_admits_unchecked_while_redis_is_dead_then_limits(
    redis_server: MakeServer,
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    limit = Limit("tenant:t", rpm=2)
    async with RedisLimiter(server.url, clock=clock, timeout_s=1.0) as limiter:
        reservation, _ = await limiter.acquire([limit], 1)
        assert reservation.recorded

        server.kill()
        for _ in range(10):  # fails open: far beyond rpm, every request is admitted
            reservation, quota = await limiter.acquire([limit], 1)
            assert not reservation.recorded
            assert quota.headers() == {}
        await limiter.reconcile(reservation, 5)  # dropped, without raising
        assert limiter.stats.unchecked == 10
        assert limiter.stats.errors == 1

        await recover(server, clock, limiter.outage, lambda: limiter.acquire([limit], 0))
        fresh = Limit("tenant:fresh", rpm=2)
        await limiter.acquire([fresh], 0)
        await limiter.acquire([fresh], 0)
        with pytest.raises(RateLimitedError):
            await limiter.acquire([fresh], 0)


async def test_the_ledger_lets_calls_through_but_refuses_a_report_while_redis_is_dead(
    redis_server: MakeServer,
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    async with RedisLedger(server.url, clock=clock, timeout_s=1.0) as ledger:
        await ledger.add("t", 1.0)
        assert await ledger.spent("t") == (1.0, 1.0)

        server.kill()
        await ledger.check("t", per_day=0.5, per_month=None)  # spent, but fails open
        await ledger.add("t", 2.0)  # lost, counted
        assert ledger.stats.unchecked == 1
        assert ledger.stats.unrecorded_usd == 2.0
        with pytest.raises(UnavailableError):  # a report fails closed
            await ledger.spent("t")

        await recover(
            server,
            clock,
            ledger.outage,
            lambda: ledger.check("t", per_day=100.0, per_month=None),
        )
        await ledger.add("t", 3.0)
        assert await ledger.spent("t") == (3.0, 3.0)  # the restarted server was empty


async def test_the_semantic_log_keeps_local_entries_while_redis_is_dead_then_shares(
    redis_server: MakeServer,
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    rng = np.random.default_rng(1)
    first, second = normalise(rng.standard_normal((2, 8)))
    log = RedisVectorLog(server.url, prefix=b"t:", max_entries=100, timeout_s=1.0, clock=clock)
    other = RedisVectorLog(server.url, prefix=b"t:", max_entries=100, timeout_s=1.0, clock=clock)
    index = VectorIndex(100)
    try:
        assert await log.append("s", first, b"k1", 0)
        await log.pull("s", index)
        assert index.search("s", first, 0.99) is not None

        server.kill()
        assert not await log.append("s", second, b"k2", 0)  # fails open: not shared
        await log.pull("s", index)  # adds nothing, raises nothing
        assert index.search("s", first, 0.99) is not None  # local entries still answer
        assert log.outage.down

        await recover(server, clock, log.outage, lambda: log.pull("s", index))
        assert await log.append("s", second, b"k2", 0)
        elsewhere = VectorIndex(100)
        await other.pull("s", elsewhere)
        found = elsewhere.search("s", second, 0.99)
        assert found is not None
        assert found[0] == b"k2"
    finally:
        await log.aclose()
        await other.aclose()


async def test_the_dedupe_store_refuses_while_redis_is_dead_then_answers(
    redis_server: MakeServer,
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    store = RedisDedupe(server.url, 60.0, timeout_s=1.0, clock=clock)
    try:
        await store.set_many([("a", b"1")])
        assert await store.get_many(["a", "b"]) == [b"1", None]

        server.kill()
        with pytest.raises(UnavailableError) as caught:  # fails closed: retried later
            await store.get_many(["a"])
        assert caught.value.retryable
        failures = store.outage.failures
        for _ in range(50):  # within the backoff: refused without touching the network
            with pytest.raises(UnavailableError):
                await store.set_many([("a", b"2")])
        assert store.outage.failures == failures

        await recover(server, clock, store.outage, lambda: store.get_many(["a"]))
        await store.set_many([("a", b"3")])
        assert await store.get_many(["a"]) == [b"3"]
    finally:
        await store.aclose()


async def test_the_composition_root_counts_redis_outages_in_its_metrics(
    make_settings: Callable[..., Any], redis_server: MakeServer
) -> None:
    server = await redis_server().start()
    settings = make_settings(cache={"url": server.url})
    parts = build_components(settings)
    await start_components(parts)
    try:
        assert isinstance(parts.cache, RedisCache)
        await parts.cache.get_many([b"a"])
        server.kill()
        await parts.cache.get_many([b"a"])
        failures = parts.metrics.redis_failures.labels("redis cache")._value.get()
        down = parts.metrics.redis_outage.labels("redis cache")._value.get()
        assert (failures, down) == (1, 1)

        await server.start()
        cache = parts.cache
        await eventually(  # the real clock: the probe goes after a backoff of <= 0.5 s
            lambda: cache.get_many([b"a"]), lambda _: not cache.outage.down, what="a probe"
        )
        assert parts.metrics.redis_outage.labels("redis cache")._value.get() == 0
    finally:
        await stop_components(parts)
        observe(None)
