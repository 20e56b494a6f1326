"""The prediction cache port, its counters, and the URL that picks a backend.

The serving layer caches one encoded prediction per row under a key made of the
model, the version and a hash of the canonical row. It looks up every row of a
request in one call and stores the misses in another, so a backend sees two calls
per request whatever the number of rows:

- ``memory://``: :class:`~interlock.cache.memory.MemoryCache`, in the process,
  bounded in bytes; the default.
- ``redis://host:port/db`` (or ``rediss://``, ``unix://``):
  :class:`~interlock.cache.redis.RedisCache`, shared by every node. It fails open:
  when Redis is slow or down, lookups are misses and stores are dropped.

A cache is an async context manager; ``aclose()`` releases what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self
from urllib.parse import urlsplit

from interlock.errors import ConfigError
from interlock.settings import mask_url

if TYPE_CHECKING:
    from interlock._core.clock import Clock

__all__ = ["DEFAULT_PREFIX", "Cache", "CacheStats", "open_cache"]

DEFAULT_PREFIX = b"interlock:pc:"
"""What :class:`~interlock.cache.redis.RedisCache` puts before every key."""

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


@dataclass(slots=True)
class CacheStats:
    """Counters of one cache, updated in place as it works.

    ``hits`` and ``misses`` count keys, not calls; a key read while Redis is
    unavailable counts as a miss. ``errors`` counts failed backend calls (always 0
    for memory). ``evictions`` counts live entries dropped to stay under
    ``max_bytes``, and ``bytes`` and ``entries`` give the current size; Redis
    evicts on its own, so these three stay 0 for :class:`RedisCache`.
    """

    hits: int = 0
    misses: int = 0
    errors: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class Cache(Protocol):
    """Where encoded predictions are kept between requests.

    Keys and values are opaque bytes. A backend never raises on a lookup or a store
    because its storage failed: the prediction is simply computed again.
    """

    stats: CacheStats

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The value of each key, in order; ``None`` for a miss or an expired entry."""
        ...

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: float) -> None:
        """Store each ``(key, value)`` for ``ttl_s`` seconds (``ttl_s > 0``)."""
        ...

    async def delete_prefix(self, prefix: bytes) -> int:
        """Remove every key starting with ``prefix``; return how many were removed."""
        ...

    async def aclose(self) -> None:
        """Release connections and memory; the cache cannot be used afterwards."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_cache(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    prefix: bytes = DEFAULT_PREFIX,
    clock: Clock,
) -> Cache:
    """The backend named by the scheme of ``url``; nothing is connected yet.

    ``max_bytes`` bounds the memory backend; ``timeout_s`` bounds each Redis call
    and ``prefix`` namespaces the Redis keys. Each backend ignores the others.

    Raises:
        ConfigError: the scheme is unknown, the URL cannot be used, or ``redis://``
            is asked for without the ``redis`` package installed.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from interlock.cache.memory import MemoryCache

        return MemoryCache(max_bytes, clock)
    if scheme in _REDIS_SCHEMES:
        try:
            from interlock.cache.redis import RedisCache
        except ImportError as exc:
            raise ConfigError(
                f"cache URL {mask_url(url)} needs the redis package: pip install 'interlock[redis]'"
            ) from exc
        return RedisCache(url, timeout_s=timeout_s, prefix=prefix, clock=clock)
    raise ConfigError(
        f"unknown cache URL scheme {scheme!r} in {mask_url(url)!r}: "
        "expected memory:// or redis://host:port/db"
    )
