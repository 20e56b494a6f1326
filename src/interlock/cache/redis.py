"""The shared prediction cache on Redis, failing open.

One round trip per call: ``MGET`` for a lookup, and a non-transactional pipeline of
``SET key value PX ms`` for a store, written as one buffer on one pooled connection.
The commands are packed here rather than by redis-py, whose per-command packing and
dispatch cost ~10 µs of CPU each: a 64-row store would take ~0.7 ms instead of
~0.17 ms. Every call runs under ``asyncio.timeout``.

The cache must never make a request slower or fail it. Any Redis error, refused
connection or timeout turns a lookup into misses and a store into nothing; it adds
one to ``stats.errors`` and logs a warning on the ``interlock.cache`` logger, at most
one every ten seconds. After a failure Redis is left alone for a backoff (0.5 s,
doubling up to 5 s, back to 0.5 s after a success): calls made meanwhile return at
once without touching the network. When the backoff ends, one call probes Redis
while the others keep skipping it, so a dead Redis costs nothing per request.

``delete_prefix`` is the exception: invalidation that silently did nothing would be
worse than an error, so it raises :class:`~interlock.errors.CacheError`.

This is the only module that imports ``redis``; the client is created on first use,
inside the running event loop, which it then belongs to.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import redis.asyncio
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from interlock.cache.base import DEFAULT_PREFIX, CacheStats
from interlock.errors import CacheError, ConfigError
from interlock.settings import mask_url

if TYPE_CHECKING:
    from interlock._core.clock import Clock

__all__ = ["RedisCache"]

logger = logging.getLogger("interlock.cache")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 5.0
WARNING_INTERVAL_S = 10.0
SCAN_BATCH = 1000

# asyncio.timeout raises the builtin TimeoutError, an OSError like a refused connection.
_FAILURES = (RedisError, OSError)
_GLOB_SPECIAL = frozenset(b"*?[]\\")


class RedisCache:
    """A prediction cache in Redis at ``url``; keys are stored as ``prefix + key``.

    ``timeout_s`` bounds each call, connection included. ``clock.monotonic()``
    times the backoff and the warning interval.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        prefix: bytes = DEFAULT_PREFIX,
        clock: Clock,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the Redis cache timeout must be positive, not {timeout_s}")
        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"invalid Redis cache URL {mask_url(url)!r}: {exc}") from exc
        self.url = url
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.stats = CacheStats()
        self._clock = clock
        self._client: redis.asyncio.Redis | None = None
        self._backoff_s = BACKOFF_INITIAL_S
        self._failing = False
        self._probing = False
        self._skip_until = -math.inf
        self._warned_at = -math.inf
        self._unreported = 0

    def __repr__(self) -> str:
        return f"RedisCache({mask_url(self.url)!r}, prefix={self.prefix!r})"

    def _redis(self) -> redis.asyncio.Redis:
        client = self._client
        if client is None:
            client = self._client = redis.asyncio.Redis.from_url(
                self.url,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=None,  # asyncio.timeout bounds every call instead
                retry=Retry(NoBackoff(), 0),  # a retry would only outlive the timeout
            )
        return client

    # -- fail open -------------------------------------------------------------------

    def _may_call(self) -> bool:
        """Whether to use Redis now: yes when healthy, or as the one probe after a backoff."""
        if not self._failing:
            return True
        if self._probing or self._clock.monotonic() < self._skip_until:
            return False
        self._probing = True
        return True

    def _succeeded(self) -> None:
        if self._failing:
            logger.info("redis cache %s answers again", mask_url(self.url))
            self._failing = self._probing = False
            self._backoff_s = BACKOFF_INITIAL_S

    def _failed(self, op: str, exc: Exception) -> None:
        """Count a failure, start or extend the backoff, and warn if none was said lately.

        An error outside ``_FAILURES`` (a bug in a client library, say) fails open too,
        but its warning carries the traceback.
        """
        self.stats.errors += 1
        now = self._clock.monotonic()
        if now >= self._skip_until:  # not a straggler from before the current backoff
            self._skip_until = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
        self._failing = True
        self._probing = False
        if now - self._warned_at >= WARNING_INTERVAL_S:
            logger.warning(
                "redis cache %s failed (%s: %s); serving misses for %.1f s",
                mask_url(self.url),
                op,
                _describe(exc),
                self._skip_until - now,
                extra={"cache_errors_unreported": self._unreported},
                exc_info=None if isinstance(exc, _FAILURES) else exc,
            )
            self._warned_at = now
            self._unreported = 0
        else:
            self._unreported += 1

    # -- the Cache protocol ----------------------------------------------------------

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The value of each key, in order; all ``None`` when Redis fails or is skipped."""
        if not keys:
            return []
        replies = None
        if self._may_call():
            replies = await self._round_trip("get_many", lambda: _pack_mget(self.prefix, keys), 1)
        stats = self.stats
        if replies is None:
            stats.misses += len(keys)
            return [None] * len(keys)
        values: list[bytes | None] = replies[0]
        misses = values.count(None)
        stats.misses += misses
        stats.hits += len(values) - misses
        return values

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: float) -> None:
        """Store every item with ``PX`` in one pipeline; nothing when Redis fails or is skipped."""
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s}")
        if items and self._may_call():
            ttl_ms = max(1, round(ttl_s * 1000))
            await self._round_trip(
                "set_many", lambda: _pack_set_px(self.prefix, items, ttl_ms), len(items)
            )

    async def _round_trip(
        self, op: str, pack: Callable[[], bytes], replies: int
    ) -> list[Any] | None:
        """Send what ``pack`` makes (``replies`` commands), read every reply; None on failure.

        Call it only when :meth:`_may_call` said yes. The commands go out as one buffer
        on one pooled connection, as in redis-py's own pipeline.
        """
        try:
            payload = pack()
            async with asyncio.timeout(self.timeout_s):
                pool = self._redis().connection_pool
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await conn.send_packed_command(payload, check_health=False)
                    out = [await conn.read_response(disable_decoding=True) for _ in range(replies)]
                except BaseException:
                    await conn.disconnect(nowait=True)  # unread replies must reach no one
                    raise
                finally:
                    await pool.release(conn)
        except Exception as exc:  # fail open, whatever broke: see _failed
            self._failed(op, exc)
            return None
        except BaseException:
            self._probing = False  # a cancelled probe must not stop the next one
            raise
        self._succeeded()
        return out

    async def delete_prefix(self, prefix: bytes) -> int:
        """Remove every key starting with ``prefix`` (SCAN + UNLINK by batches).

        Raises:
            CacheError: Redis failed or a batch outlived ``timeout_s``.
        """
        client = self._redis()
        pattern = _glob_escape(self.prefix + prefix) + b"*"
        deleted = 0
        cursor = 0
        try:
            while True:
                async with asyncio.timeout(self.timeout_s):
                    cursor, names = await client.scan(cursor, match=pattern, count=SCAN_BATCH)
                    if names:
                        deleted += await client.unlink(*names)
                if cursor == 0:
                    return deleted
        except _FAILURES as exc:
            self.stats.errors += 1
            raise CacheError(
                f"cannot delete {prefix!r} from the redis cache {mask_url(self.url)}: "
                f"{_describe(exc)} ({deleted} keys deleted)"
            ) from exc

    async def aclose(self) -> None:
        """Close the connection pool; a later call would open a new one."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.aclose()
        except _FAILURES as exc:
            logger.debug("closing the redis cache failed: %s", _describe(exc))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _pack_mget(prefix: bytes, keys: Sequence[bytes]) -> bytes:
    """``MGET prefix+key ...`` in RESP."""
    parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
    n = len(prefix)
    parts += [b"$%d\r\n%s%s\r\n" % (n + len(key), prefix, key) for key in keys]
    return b"".join(parts)


def _pack_set_px(prefix: bytes, items: Sequence[tuple[bytes, bytes]], ttl_ms: int) -> bytes:
    """One ``SET prefix+key value PX ttl_ms`` per item, in RESP, back to back."""
    ms = str(ttl_ms).encode()
    tail = b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ms), ms)
    n = len(prefix)
    return b"".join(
        [
            b"*5\r\n$3\r\nSET\r\n$%d\r\n%s%s\r\n$%d\r\n%s%s"
            % (n + len(key), prefix, key, len(value), value, tail)
            for key, value in items
        ]
    )


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a SCAN MATCH pattern that matches only itself."""
    out = bytearray()
    for byte in raw:
        if byte in _GLOB_SPECIAL:
            out.append(0x5C)  # backslash
        out.append(byte)
    return bytes(out)
