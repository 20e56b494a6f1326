"""The in-process backend: exact expiry, the byte bound and LRU order."""

from __future__ import annotations

import pytest

from interlock.cache.memory import ENTRY_OVERHEAD_BYTES, MemoryCache
from tests.cache.conftest import ManualClock


def size(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES


def room_for(entries: int) -> int:
    """max_bytes holding exactly ``entries`` entries of a 1-byte key and 1-byte value."""
    return entries * size(b"k", b"v")


async def test_an_entry_expires_exactly_after_its_ttl() -> None:
    clock = ManualClock()
    cache = MemoryCache(1 << 20, clock)
    await cache.set_many([(b"k", b"v")], ttl_s=10)

    clock.advance(9.999)
    assert await cache.get_many([b"k"]) == [b"v"]
    clock.advance(0.001)
    assert await cache.get_many([b"k"]) == [None]


async def test_an_expired_entry_is_removed_when_read() -> None:
    clock = ManualClock()
    cache = MemoryCache(1 << 20, clock)
    await cache.set_many([(b"a", b"1"), (b"b", b"2")], ttl_s=1)
    clock.advance(1)

    await cache.get_many([b"a"])

    assert (cache.stats.entries, cache.stats.bytes) == (1, size(b"b", b"2"))


async def test_bytes_count_keys_values_and_the_overhead() -> None:
    cache = MemoryCache(1 << 20, ManualClock())
    await cache.set_many([(b"key", b"value"), (b"k2", b"")], ttl_s=60)
    await cache.set_many([(b"key", b"longer value")], ttl_s=60)

    assert cache.stats.entries == 2
    assert cache.stats.bytes == size(b"key", b"longer value") + size(b"k2", b"")


async def test_the_least_recently_used_entry_is_evicted_first() -> None:
    cache = MemoryCache(room_for(3), ManualClock())
    await cache.set_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")], ttl_s=60)
    await cache.get_many([b"a"])  # b is now the least recently used

    await cache.set_many([(b"d", b"4")], ttl_s=60)

    assert await cache.get_many([b"a", b"b", b"c", b"d"]) == [b"1", None, b"3", b"4"]
    assert cache.stats.evictions == 1
    assert cache.stats.bytes == room_for(3)


async def test_a_set_refreshes_recency() -> None:
    cache = MemoryCache(room_for(2), ManualClock())
    await cache.set_many([(b"a", b"1"), (b"b", b"2")], ttl_s=60)
    await cache.set_many([(b"a", b"9")], ttl_s=60)

    await cache.set_many([(b"c", b"3")], ttl_s=60)

    assert await cache.get_many([b"a", b"b", b"c"]) == [b"9", None, b"3"]


async def test_the_bound_holds_when_one_batch_is_larger_than_the_cache() -> None:
    cache = MemoryCache(room_for(4), ManualClock())
    items = [(bytes([65 + i]), b"v") for i in range(10)]
    await cache.set_many(items, ttl_s=60)

    assert cache.stats.bytes <= cache.max_bytes
    assert cache.stats.entries == 4
    found = await cache.get_many([key for key, _ in items])
    assert found == [None] * 6 + [b"v"] * 4  # the last ones written survive


async def test_an_item_larger_than_the_cache_is_not_stored() -> None:
    cache = MemoryCache(room_for(2), ManualClock())
    await cache.set_many([(b"a", b"1")], ttl_s=60)

    await cache.set_many([(b"big", b"x" * room_for(2))], ttl_s=60)

    assert await cache.get_many([b"big", b"a"]) == [None, b"1"]
    assert cache.stats.evictions == 0


async def test_dropping_expired_entries_to_make_room_is_not_an_eviction() -> None:
    clock = ManualClock()
    cache = MemoryCache(room_for(2), clock)
    await cache.set_many([(b"a", b"1")], ttl_s=1)
    await cache.set_many([(b"b", b"2")], ttl_s=60)
    clock.advance(5)

    await cache.set_many([(b"c", b"3")], ttl_s=60)

    assert cache.stats.evictions == 0
    assert await cache.get_many([b"b", b"c"]) == [b"2", b"3"]


async def test_delete_prefix_and_aclose_release_the_bytes() -> None:
    cache = MemoryCache(1 << 20, ManualClock())
    await cache.set_many([(b"m:1:a", b"1"), (b"m:2:a", b"2")], ttl_s=60)

    assert await cache.delete_prefix(b"m:1:") == 1
    assert (cache.stats.entries, cache.stats.bytes) == (1, size(b"m:2:a", b"2"))
    await cache.aclose()
    assert (cache.stats.entries, cache.stats.bytes) == (0, 0)


def test_max_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryCache(0, ManualClock())
