"""The prediction cache: a port and its backends, picked by URL.

- :class:`Cache`: the protocol the serving layer depends on, with its
  :class:`CacheStats` counters.
- :func:`open_cache`: the backend for ``memory://`` or ``redis://host:port/db``.
- :class:`MemoryCache`: in the process, LRU and TTL, bounded in bytes.
- :class:`~interlock.cache.redis.RedisCache`: shared by every node, failing open;
  import it from :mod:`interlock.cache.redis`, which needs the ``redis`` package.
"""

from interlock.cache.base import Cache, CacheStats, open_cache
from interlock.cache.memory import MemoryCache

__all__ = ["Cache", "CacheStats", "MemoryCache", "open_cache"]
