"""Exact RPM/TPM rate limits over a sliding window, in memory or in Redis.

A :class:`Limit` caps requests (``rpm``) and tokens (``tpm``) per window of
``window_s`` seconds (60 unless a test says otherwise); the gateway keeps one per
tenant and one per deployment. The window slides and is exact: it is a log of every
admitted request with its time and tokens, not fixed buckets and not a token bucket.
A request is admitted when, counting every request admitted in the last ``window_s``,
the count stays within ``rpm`` and their tokens plus its own stay within ``tpm``. With
``rpm=N`` the N+1th request of a burst is the first refused, and it would be admitted
exactly when the oldest request leaves the window: the time its
:class:`~interlock.errors.RateLimitedError` gives in ``retry_after_s``.

:meth:`RateLimiter.acquire` is all or nothing across the limits it is given: one
request and its tokens are taken from every limit, or from none. A request reserves
its prompt tokens plus ``max_tokens`` up front; :meth:`RateLimiter.reconcile` later
replaces that with the tokens the upstream reports, which may free room or take more.
A request that needs more tokens than a limit's ``tpm`` can never pass and is refused
at once, saying so. A limit with neither ``rpm`` nor ``tpm`` is ignored.

- ``memory://``: :class:`MemoryLimiter`, one node. Per limit a deque of entries and
  running sums, O(1) amortised per request; it awaits nothing between checking and
  taking, so concurrent coroutines of its event loop cannot overshoot. Time is its
  clock's ``monotonic()``.
- ``redis://`` (``rediss://``, ``unix://``): :class:`RedisLimiter`, shared by every
  node. Each acquire is one ``EVALSHA`` of a Lua script that trims, checks and takes
  for all the limits atomically, reading Redis's own ``TIME`` so that every node agrees
  on the window. Per limit a ZSET of reservation ids scored by microseconds and a HASH
  of id -> tokens holding the running sum under ``#``; keys carry the limit's name as a
  hash tag and expire ``window_s`` + 1 s after the last request. (One script call
  covers several limits, so on Redis Cluster the limits of one request would have to
  share a slot.)

A Redis limiter fails open: when Redis is down, slow or refuses the script, the request
is admitted unchecked (``stats.errors`` and ``stats.unchecked`` count it), one warning
is logged per outage, and Redis is left alone for a jittered backoff (0.5 s doubling to
5 s, :class:`interlock.store.redis.Outage`) after which one call probes it. An outage
of the limiter must not take the gateway down with it; the providers' own 429s still
protect their quotas meanwhile.

Over a limit, the gateway either answers 429 with ``Retry-After`` and the
``x-ratelimit-*`` headers of the refusing limit (:meth:`Quota.headers`), or, when
configured to queue, calls :func:`acquire_within` to wait for room until its deadline.

The package: the values, the port and what both limiters share in ``_base``, one
limiter per module (:mod:`~interlock.llm.limits.memory`, :mod:`~interlock.llm.limits.redis`),
and :func:`open_limiter` here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from interlock._core.clock import SystemClock
from interlock.errors import ConfigError
from interlock.llm.limits._base import (
    WINDOW_S,
    Limit,
    LimiterStats,
    Quota,
    RateLimiter,
    Reservation,
    acquire_within,
    format_reset,
)
from interlock.llm.limits.memory import MemoryLimiter
from interlock.llm.limits.redis import RedisLimiter
from interlock.settings import mask_url
from interlock.store.redis import REDIS_SCHEMES

if TYPE_CHECKING:
    from interlock._core.clock import Clock

__all__ = [
    "WINDOW_S",
    "Limit",
    "LimiterStats",
    "MemoryLimiter",
    "Quota",
    "RateLimiter",
    "RedisLimiter",
    "Reservation",
    "acquire_within",
    "format_reset",
    "open_limiter",
]


def open_limiter(
    url: str,
    *,
    clock: Clock | None = None,
    key_prefix: str = "interlock:rl:",
    window_s: float = WINDOW_S,
    timeout_s: float = 0.5,
) -> RateLimiter:
    """The limiter named by the scheme of ``url``; nothing is connected yet.

    ``clock`` times the memory limiter's window and the Redis limiter's backoff;
    ``key_prefix`` and ``timeout_s`` (per Redis call) concern Redis only.

    Raises:
        ConfigError: an unknown scheme or an unusable URL or window.
    """
    scheme = urlsplit(url).scheme.lower()
    clock = clock or SystemClock()
    if scheme == "memory":
        return MemoryLimiter(window_s=window_s, clock=clock)
    if scheme in REDIS_SCHEMES:
        return RedisLimiter(
            url, window_s=window_s, timeout_s=timeout_s, key_prefix=key_prefix, clock=clock
        )
    raise ConfigError(
        f"unknown rate-limit URL scheme {scheme!r} in {mask_url(url)!r}: "
        "expected memory:// or redis://host:port/db"
    )
