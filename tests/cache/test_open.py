"""Choosing a backend by URL, and what importing the package costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from interlock.cache import Cache, MemoryCache, open_cache
from interlock.cache.redis import RedisCache
from interlock.errors import ConfigError
from tests.cache.conftest import ManualClock


def test_memory_is_in_process_and_bounded() -> None:
    cache = open_cache("memory://", max_bytes=1234, timeout_s=0.05, clock=ManualClock())

    assert isinstance(cache, MemoryCache)
    assert cache.max_bytes == 1234


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///s"])
def test_redis_urls_give_a_redis_cache_without_connecting(url: str) -> None:
    cache = open_cache(url, max_bytes=1, timeout_s=0.05, prefix=b"p:", clock=ManualClock())

    assert isinstance(cache, RedisCache)
    assert (cache.url, cache.timeout_s, cache.prefix) == (url, 0.05, b"p:")


@pytest.mark.parametrize("url", ["memcached://h:11211", "localhost:6379", "", "REDIS"])
def test_an_unknown_scheme_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown cache URL scheme .*expected memory://"):
        open_cache(url, max_bytes=1, timeout_s=0.05, clock=ManualClock())


def test_the_error_does_not_show_a_password() -> None:
    with pytest.raises(ConfigError) as caught:
        open_cache("valkey://u:hunter2@h/0", max_bytes=1, timeout_s=0.05, clock=ManualClock())

    assert "hunter2" not in str(caught.value)


def test_both_backends_are_caches() -> None:
    caches: list[Cache] = [
        MemoryCache(1, ManualClock()),
        RedisCache("redis://h/0", timeout_s=0.05, clock=ManualClock()),
    ]
    assert all(cache.stats.errors == 0 for cache in caches)


def test_importing_the_package_does_not_import_redis() -> None:
    code = "import sys, interlock.cache; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)

    assert out.stdout.strip() == "False"
