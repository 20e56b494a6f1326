"""What every cache backend promises, run on memory and on the real Redis."""

from __future__ import annotations

import pytest

from interlock.cache import CacheStats
from tests.cache.conftest import Backend, eventually


async def test_get_returns_what_set_stored_in_key_order(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    await cache.set_many([(b"a", b"1"), (b"b", b"2")], ttl_s=60)

    assert await cache.get_many([b"b", b"missing", b"a"]) == [b"2", None, b"1"]


async def test_many_keys_keep_their_order(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    items = [(f"row-{i}".encode(), f"prediction-{i}".encode()) for i in range(64)]
    await cache.set_many(items, ttl_s=60)

    keys = [key for key, _ in reversed(items)]
    assert await cache.get_many(keys) == [value for _, value in reversed(items)]


async def test_keys_and_values_are_opaque_bytes(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    key, value = b"\x00\r\n*?[]\\\xff", bytes(range(256))
    await cache.set_many([(key, value), (b"empty", b"")], ttl_s=60)

    assert await cache.get_many([key, b"empty"]) == [value, b""]


async def test_a_later_set_replaces_the_value(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    await cache.set_many([(b"k", b"old")], ttl_s=60)
    await cache.set_many([(b"k", b"new")], ttl_s=60)

    assert await cache.get_many([b"k"]) == [b"new"]


async def test_empty_calls_do_nothing(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    await cache.set_many([], ttl_s=60)

    assert await cache.get_many([]) == []
    assert (cache.stats.hits, cache.stats.misses) == (0, 0)


async def test_expired_entries_are_misses(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    await cache.set_many([(b"short", b"s")], ttl_s=0.05)
    await cache.set_many([(b"long", b"l")], ttl_s=60)
    cache_backend.pass_time(0.1)

    await eventually(
        lambda: cache.get_many([b"short"]),
        lambda values: values == [None],
        what="the short entry expiring",
    )
    assert await cache.get_many([b"long"]) == [b"l"]


@pytest.mark.parametrize("ttl_s", [0, -1.0])
async def test_a_ttl_must_be_positive(cache_backend: Backend, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await cache_backend.cache.set_many([(b"k", b"v")], ttl_s=ttl_s)


async def test_delete_prefix_removes_only_matching_keys(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    keys = [b"fraud:3:a", b"fraud:3:b", b"fraud:4:a", b"fraud:3", b"churn:3:a"]
    await cache.set_many([(key, b"v") for key in keys], ttl_s=60)

    assert await cache.delete_prefix(b"fraud:3:") == 2
    assert await cache.get_many(keys) == [None, None, b"v", b"v", b"v"]
    assert await cache.delete_prefix(b"fraud:3:") == 0


async def test_delete_prefix_takes_glob_characters_literally(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    keys = [b"m[1]*:a", b"m1x:a", b"m[1]*", b"m\\:a"]
    await cache.set_many([(key, b"v") for key in keys], ttl_s=60)

    assert await cache.delete_prefix(b"m[1]*:") == 1
    assert await cache.delete_prefix(b"m\\") == 1
    assert await cache.get_many(keys) == [None, b"v", b"v", None]


async def test_stats_count_hits_and_misses_per_key(cache_backend: Backend) -> None:
    cache = cache_backend.cache
    await cache.set_many([(b"a", b"1"), (b"b", b"2")], ttl_s=60)
    await cache.get_many([b"a", b"b", b"c"])
    await cache.get_many([b"a", b"d"])

    stats = cache.stats
    assert (stats.hits, stats.misses, stats.errors) == (3, 2, 0)
    assert isinstance(stats, CacheStats)
