"""The Redis backend fails open: a dead or hung Redis means misses, never errors or waits.

The caches here read a :class:`ManualClock`, so the backoff moves only when the test
moves it; real time bounds only the waits for a private ``redis-server`` to start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
import redis.asyncio

from interlock.cache.redis import RedisCache
from interlock.store.redis import BACKOFF_MAX_S
from tests.cache.conftest import ManualClock, RedisServer, eventually, free_port

KEYS = [b"a", b"b"]
ITEMS = [(b"a", b"1"), (b"b", b"2")]


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "interlock.cache" and r.levelno == logging.WARNING
    ]


async def test_a_killed_redis_gives_misses_then_recovers_after_the_backoff(
    redis_server: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    async with RedisCache(server.url, timeout_s=1.0, clock=clock) as cache:
        await cache.set_many(ITEMS, ttl_s=60)
        assert await cache.get_many(KEYS) == [b"1", b"2"]

        server.kill()
        assert await cache.get_many(KEYS) == [None, None]
        assert cache.stats.errors == 1
        for _ in range(500):  # within the backoff: Redis is not even tried
            assert await cache.get_many(KEYS) == [None, None]
            await cache.set_many(ITEMS, ttl_s=60)
        assert cache.stats.errors == 1
        assert cache.stats.misses == 2 * 501

        clock.advance(0.5)  # the backoff is over: one probe, refused
        await cache.set_many(ITEMS, ttl_s=60)
        assert cache.stats.errors == 2

        await server.start()  # same port, empty

        async def round_trip() -> list[bytes | None]:
            clock.advance(BACKOFF_MAX_S)
            await cache.set_many([(b"c", b"3")], ttl_s=60)
            return await cache.get_many([b"c"])

        await eventually(round_trip, lambda v: v == [b"3"], what="the cache recovering")
        errors = cache.stats.errors
        assert await cache.get_many([b"c", b"a"]) == [b"3", None]
        assert cache.stats.errors == errors
    assert len(warnings_in(caplog)) == 1  # the clock moved less than 10 s before recovery


async def test_a_hung_redis_times_out_and_one_probe_at_a_time_is_let_through(
    redis_server: Callable[[], RedisServer],
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    async with RedisCache(server.url, timeout_s=0.2, clock=clock) as cache:
        assert await cache.get_many(KEYS) == [None, None]  # connected, nothing stored
        server.pause()

        assert await cache.get_many(KEYS) == [None, None]
        assert cache.stats.errors == 1

        clock.advance(0.5)
        probe = asyncio.create_task(cache.get_many(KEYS))
        await asyncio.sleep(0)  # the probe is now waiting on the hung server
        for _ in range(100):
            assert await cache.get_many(KEYS) == [None, None]
            await cache.set_many(ITEMS, ttl_s=60)
        assert cache.stats.errors == 1
        assert await probe == [None, None]
        assert cache.stats.errors == 2

        server.resume()
        clock.advance(BACKOFF_MAX_S)
        await cache.set_many(ITEMS, ttl_s=60)
        assert await cache.get_many(KEYS) == [b"1", b"2"]
        assert cache.stats.errors == 2


async def test_a_cancelled_probe_does_not_block_the_next(
    redis_server: Callable[[], RedisServer],
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    async with RedisCache(server.url, timeout_s=5.0, clock=clock) as cache:
        await cache.set_many(ITEMS, ttl_s=60)
        server.pause()
        failed = asyncio.create_task(cache.get_many(KEYS))
        await asyncio.sleep(0.05)
        server.kill()  # the paused request now fails at once
        assert await failed == [None, None]

        await server.start()
        clock.advance(0.5)
        probe = asyncio.create_task(cache.get_many(KEYS))
        await asyncio.sleep(0)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe

        await cache.set_many(ITEMS, ttl_s=60)
        assert await cache.get_many(KEYS) == [b"1", b"2"]


async def test_an_error_reply_fails_open_and_leaves_no_reply_unread(
    redis_server: Callable[[], RedisServer],
) -> None:
    server = await redis_server().start()
    clock = ManualClock()
    items = [(f"row-{i}".encode(), b"p") for i in range(64)]
    admin = redis.asyncio.Redis.from_url(server.url)
    async with RedisCache(server.url, timeout_s=1.0, clock=clock) as cache:
        await cache.get_many(KEYS)  # the cache's connection is open and pooled
        await admin.config_set("maxmemory", 1)  # every SET is refused: OOM
        await cache.set_many(items, ttl_s=60)
        assert cache.stats.errors == 1

        await admin.config_set("maxmemory", 0)
        clock.advance(0.5)
        await cache.set_many(items, ttl_s=60)
        assert await cache.get_many([key for key, _ in items]) == [b"p"] * 64
        assert cache.stats.errors == 1
    await admin.aclose()


async def test_the_backoff_doubles_up_to_five_seconds_with_jitter() -> None:
    clock = ManualClock()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: refused at once
    async with RedisCache(url, timeout_s=1.0, clock=clock) as cache:
        await cache.get_many(KEYS)
        windows = []
        for _ in range(6):
            errors, waited = cache.stats.errors, 0.0
            while cache.stats.errors == errors:
                clock.advance(0.125)
                waited += 0.125
                await cache.get_many(KEYS)
            windows.append(waited)

    # each wait is drawn in [d/2, d], d = 0.5 s doubling up to 5 s; the clock moves by 1/8 s
    for waited, cap in zip(windows, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0], strict=True):
        assert cap / 2 <= waited <= cap + 0.125, windows


async def test_one_warning_per_outage_and_one_line_when_it_ends(
    redis_server: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interlock.cache")
    server = await redis_server().start()
    clock = ManualClock()
    async with RedisCache(server.url, timeout_s=1.0, clock=clock) as cache:
        await cache.set_many(ITEMS, ttl_s=60)
        server.kill()
        for _ in range(12):  # a failure every 5 s for a minute
            await cache.set_many(ITEMS, ttl_s=60)
            clock.advance(BACKOFF_MAX_S)
        assert cache.stats.errors == 12
        await server.start()
        await cache.set_many(ITEMS, ttl_s=60)
        assert await cache.get_many(KEYS) == [b"1", b"2"]

    lines = [r for r in caplog.records if r.name == "interlock.cache"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    assert "serving misses" in lines[0].getMessage()
    assert "answers again after 60.0 s (12 failed calls" in lines[1].getMessage()


async def test_an_unexpected_error_fails_open_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisCache(url, timeout_s=1.0, clock=clock) as cache:
        wrong = ["a str, not bytes"]
        assert await cache.get_many(wrong) == [None]  # type: ignore[arg-type]
        clock.advance(0.5)  # the failed probe did not stay in flight
        assert await cache.get_many(wrong) == [None]  # type: ignore[arg-type]
        assert cache.stats.errors == 2

    (warned,) = warnings_in(caplog)
    assert warned.exc_info is not None
    assert warned.exc_info[0] is TypeError
