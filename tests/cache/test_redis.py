"""The Redis backend against the real server: key layout, expiry and round trips."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio

from interlock._core.clock import SystemClock
from interlock.cache.redis import RedisCache
from interlock.errors import CacheError, ConfigError
from tests.cache.conftest import ManualClock, eventually, free_port, unique_prefix
from tests.conftest import REDIS_URL, require_service


@pytest.fixture
async def raw() -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client of the test Redis, to look behind the cache."""
    require_service("Redis", REDIS_URL)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def shared() -> AsyncIterator[RedisCache]:
    require_service("Redis", REDIS_URL)
    async with RedisCache(
        REDIS_URL, timeout_s=2.0, prefix=unique_prefix(), clock=SystemClock()
    ) as cache:
        yield cache
        await cache.delete_prefix(b"")


async def test_keys_are_stored_under_the_prefix_with_px(
    shared: RedisCache, raw: redis.asyncio.Redis
) -> None:
    await shared.set_many([(b"k", b"v")], ttl_s=30)

    assert await raw.get(shared.prefix + b"k") == b"v"
    assert 0 < await raw.pttl(shared.prefix + b"k") <= 30_000


async def test_a_short_ttl_expires_in_redis(shared: RedisCache, raw: redis.asyncio.Redis) -> None:
    await shared.set_many([(b"k", b"v")], ttl_s=0.2)

    assert 0 < await raw.pttl(shared.prefix + b"k") <= 200
    await eventually(lambda: raw.exists(shared.prefix + b"k"), lambda n: n == 0, what="expiry")


async def test_caches_with_other_prefixes_do_not_see_each_other(shared: RedisCache) -> None:
    async with RedisCache(
        REDIS_URL, timeout_s=2.0, prefix=unique_prefix(), clock=SystemClock()
    ) as other:
        await shared.set_many([(b"k", b"mine")], ttl_s=30)

        assert await other.get_many([b"k"]) == [None]
        assert await other.delete_prefix(b"") == 0
    assert await shared.get_many([b"k"]) == [b"mine"]


async def test_delete_prefix_works_through_many_scan_batches(shared: RedisCache) -> None:
    await shared.set_many([(f"m:{i}".encode(), b"v") for i in range(2500)], ttl_s=30)

    assert await shared.delete_prefix(b"m:") == 2500


class RoundTripCounter:
    """A loopback TCP proxy in front of Redis that counts round trips.

    A round trip starts when the client sends after having had a reply (or first).
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.round_trips = 0
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RoundTripCounter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_r, server_w = await asyncio.open_connection(*self.target)
        replied = True

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal replied
            try:
                while data := await reader.read(65536):
                    if reader is client_r and replied:
                        self.round_trips += 1
                    replied = reader is server_r
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))


async def test_each_call_is_one_round_trip() -> None:
    require_service("Redis", REDIS_URL)
    target = urlsplit(REDIS_URL)
    items = [(f"row-{i}".encode(), b"p" * 40) for i in range(64)]
    async with RoundTripCounter(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        userinfo = target.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
        url = target._replace(netloc=netloc).geturl()
        async with RedisCache(
            url, timeout_s=2.0, prefix=unique_prefix(), clock=SystemClock()
        ) as cache:
            await cache.get_many([b"warm-up"])  # the connection's handshake happens here
            start = proxy.round_trips
            await cache.set_many(items, ttl_s=30)
            stored = proxy.round_trips
            found = await cache.get_many([key for key, _ in items])
            read = proxy.round_trips
            await cache.delete_prefix(b"")

    assert found == [value for _, value in items]
    assert (stored - start, read - stored) == (1, 1)


def test_construction_connects_to_nothing() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.1, clock=ManualClock())

    assert cache.stats.errors == 0
    assert "127.0.0.1" in repr(cache)


@pytest.mark.parametrize("url", ["redis://host:port/0", "redis://h/0?socket_timeout=x"])
def test_an_unusable_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="invalid Redis cache URL"):
        RedisCache(url, timeout_s=0.1, clock=ManualClock())


def test_the_password_stays_out_of_repr() -> None:
    cache = RedisCache("redis://:hunter2@127.0.0.1/0", timeout_s=0.1, clock=ManualClock())

    assert "hunter2" not in repr(cache)


async def test_delete_prefix_raises_when_redis_is_down() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisCache(url, timeout_s=1.0, clock=ManualClock()) as cache:
        with pytest.raises(CacheError, match="cannot delete"):
            await cache.delete_prefix(b"fraud:3:")
        assert cache.stats.errors == 1
