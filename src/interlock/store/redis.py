"""Redis, once for the whole package: the client factory and the outage policy.

Every module that talks to Redis (the prediction cache, the rate limiter, the spend
ledger, the semantic index's log, the idempotency records of the event worker, the
Redis bus) gets its client and its behaviour during an outage from here.

- :func:`open_client`: a client from a ``redis://``, ``rediss://`` or ``unix://`` URL,
  pooled, with the caller's timeout (from the settings) as the connect timeout. redis-py
  never retries on its own: each caller bounds each call with ``asyncio.timeout`` and
  decides what a failure means. With ``max_connections`` the pool makes callers wait
  for a free connection instead of failing (redis-py's default pool refuses a call
  when its connections are all busy, which a burst reaches at once). This is the one
  module that imports ``redis.asyncio``; it does so on first use, so the package
  imports without the ``interlock[redis]`` extra.
- :func:`check_url`: a URL that redis-py cannot use is a :class:`~interlock.errors.ConfigError`
  naming the setting, with the password masked.
- :class:`Outage`: what one caller does while its Redis fails. After a failure Redis
  is left alone for a backoff (``first_s`` doubling up to ``max_s``, each wait drawn
  uniformly in ``[d/2, d]``: "equal jitter", so that nodes that failed together do not
  come back together); calls made meanwhile do not touch the network. When the backoff
  ends, exactly one call probes Redis while the others keep skipping it, so a dead Redis
  sees one connection attempt per backoff from each caller, not one per request. A
  caller *fails open* (goes on without Redis: a miss, an unchecked admission) or *fails
  closed* (raises :class:`~interlock.errors.UnavailableError`, see :meth:`Outage.unavailable`);
  each caller documents which. One warning is logged when an outage starts, with its
  cause (and the traceback if the error is not a Redis or network error, which points
  at a bug), and one info line when Redis answers again, saying how long it was down.
- :class:`RedisObserver`: metrics of outages. The composition root registers one with
  :func:`observe` (the monitoring package implements it); infrastructure never imports
  monitoring.

Error text comes from :func:`interlock.errors.describe`, re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import TYPE_CHECKING, Final, Protocol

from interlock.errors import ConfigError, UnavailableError, describe
from interlock.settings import mask_url

if TYPE_CHECKING:
    import redis.asyncio

    from interlock._core.clock import Clock

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "MAX_CONNECTIONS",
    "REDIS_SCHEMES",
    "Outage",
    "RedisObserver",
    "check_url",
    "close_client",
    "describe",
    "failures",
    "is_redis_url",
    "observe",
    "open_client",
]

REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 5.0
MAX_CONNECTIONS: Final = 32
"""The pool size of callers that wait for a connection (Redis runs one command at a time
anyway: more connections would only queue there instead of here)."""

_INSTALL_HINT = "pip install 'interlock[redis]'"


# -- the client ------------------------------------------------------------------------


def is_redis_url(url: str) -> bool:
    """Whether ``url``'s scheme names Redis."""
    return url.split(":", 1)[0].lower() in REDIS_SCHEMES


def check_url(url: str, what: str) -> None:
    """Raise :class:`ConfigError` unless redis-py can use ``url`` (``what`` names it).

    Raises:
        ConfigError: the redis package is missing, or the URL is malformed.
    """
    try:
        from redis.asyncio.connection import parse_url
    except ImportError as exc:
        raise ConfigError(
            f"{what} URL {mask_url(url)} needs the redis package: {_INSTALL_HINT}"
        ) from exc
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"invalid {what} URL {mask_url(url)!r}: {exc}") from exc


def open_client(
    url: str, *, timeout_s: float, max_connections: int | None = None
) -> redis.asyncio.Redis:
    """A pooled client for ``url``; nothing is connected until the first call.

    ``timeout_s`` bounds connecting; the caller bounds every call with
    ``asyncio.timeout`` (redis-py's socket timeout is off, and it does not retry: a
    retry would only outlive the caller's deadline). With ``max_connections`` a call
    waits for a free connection (under the caller's timeout) rather than fail; without,
    the pool grows as needed (the bus's blocking reads each hold one).

    Create it inside the running event loop that will use it.
    """
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, object] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": None,  # asyncio.timeout bounds every call instead
        "retry": Retry(NoBackoff(), 0),
    }
    if max_connections is None:
        return redis.asyncio.Redis.from_url(url, **options)  # type: ignore[arg-type]
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,  # asyncio.timeout bounds the wait for a connection too
        **options,
    )
    return redis.asyncio.Redis.from_pool(pool)


async def close_client(client: redis.asyncio.Redis, *, timeout_s: float, what: str) -> None:
    """Close ``client``'s pool within ``timeout_s``; a broken pool is logged, not raised
    (closing one must not fail a shutdown)."""
    try:
        async with asyncio.timeout(timeout_s):
            await client.aclose()
    except failures() as exc:
        logging.getLogger("interlock").debug(
            "closing the %s failed: %s", what, describe(exc, with_type=True)
        )


def failures() -> tuple[type[Exception], ...]:
    """What a Redis call raises when Redis, not our code, failed.

    ``asyncio.timeout`` raises the builtin TimeoutError, an OSError like a refused
    connection.
    """
    from redis.exceptions import RedisError

    return (RedisError, OSError)


# -- metrics ---------------------------------------------------------------------------


class RedisObserver(Protocol):
    """Told about the outages of every :class:`Outage` (``what`` names the caller)."""

    def redis_failed(self, what: str) -> None:
        """A call to Redis failed (a probe included)."""
        ...

    def redis_down(self, what: str, down: bool) -> None:
        """An outage of ``what``'s Redis started (True) or ended (False)."""
        ...


_observer: RedisObserver | None = None


def observe(observer: RedisObserver | None) -> None:
    """Send the outages of every caller to ``observer`` (None: to nobody).

    The composition root calls this once at start-up; outages already under way are
    reported from their next failure or recovery on.
    """
    global _observer  # one process-wide sink, set by the composition root
    _observer = observer


# -- the outage policy -----------------------------------------------------------------


class Outage:
    """The backoff, the single probe and the log of one caller's Redis outages.

    Use it around every call::

        if not outage.may_call():
            ...  # fail open (a miss), or raise outage.unavailable("get")
        try:
            reply = await call()
        except Exception as exc:
            outage.failed("get", exc)
            ...  # fail open or closed
        except BaseException:
            outage.cancelled()
            raise
        outage.succeeded()

    ``what`` names the caller in log lines and metrics (``redis cache``);
    ``fails_open`` says which way it fails and ``while_down`` what it does meanwhile
    (``serving misses``), for the warning; ``clock``'s ``monotonic()`` times the
    backoff; ``rng`` draws the jitter.
    """

    def __init__(
        self,
        what: str,
        url: str,
        *,
        clock: Clock,
        logger: logging.Logger,
        fails_open: bool,
        while_down: str | None = None,
        first_s: float = BACKOFF_FIRST_S,
        max_s: float = BACKOFF_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError("backoff delays must be positive, the first not above the cap")
        self.what = what
        self.url = url
        self.fails_open = fails_open
        self.while_down = while_down or ("failing open" if fails_open else "refusing calls")
        self.first_s = first_s
        self.max_s = max_s
        self.skipped = 0  # calls left alone during the current outage
        self.failures = 0  # failed calls during the current outage
        self.probes = 0  # calls let through as a probe, over the whole life
        self._clock = clock
        self._log = logger
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._down = False
        self._probing = False
        self._skip_until = -math.inf
        self._backoffs = 0
        self._since = 0.0

    def __repr__(self) -> str:
        state = "down" if self._down else "up"
        return f"Outage({self.what!r}, {mask_url(self.url)!r}, {state})"

    @property
    def down(self) -> bool:
        """Whether the last call failed (and no call has succeeded since)."""
        return self._down

    def may_call(self) -> bool:
        """Whether to use Redis now: yes when up, or as the one probe after a backoff."""
        if not self._down:
            return True
        if self._probing or self._clock.monotonic() < self._skip_until:
            self.skipped += 1
            return False
        self._probing = True
        self.probes += 1
        return True

    def succeeded(self) -> None:
        """A call answered: end the outage, if any, saying so once."""
        if self._down:
            self._log.info(
                "%s %s answers again after %.1f s (%d failed calls, %d left alone)",
                self.what,
                mask_url(self.url),
                self._clock.monotonic() - self._since,
                self.failures,
                self.skipped,
            )
            self._down = self._probing = False
            self.failures = self.skipped = 0
            if _observer is not None:
                _observer.redis_down(self.what, False)

    def failed(self, op: str, exc: BaseException) -> float:
        """A call failed: start or extend the backoff; warn if an outage starts.

        Returns how long Redis is now left alone (seconds).
        """
        now = self._clock.monotonic()
        self.failures += 1
        if now >= self._skip_until:  # not a straggler from before the current backoff
            self._backoffs = self._backoffs + 1 if self._down else 1
            cap = min(self.max_s, self.first_s * 2 ** (self._backoffs - 1))
            self._skip_until = now + self._rng.uniform(cap / 2, cap)
        self._probing = False
        if _observer is not None:
            _observer.redis_failed(self.what)
        if not self._down:
            self._down = True
            self._since = now
            self._log.warning(
                "%s %s failed (%s: %s); %s until it answers",
                self.what,
                mask_url(self.url),
                op,
                describe(exc, with_type=True),
                self.while_down,
                exc_info=None if isinstance(exc, failures()) else exc,
            )
            if _observer is not None:
                _observer.redis_down(self.what, True)
        return max(0.0, self._skip_until - now)

    def cancelled(self) -> None:
        """A call was cancelled: if it was the probe, the next call may probe."""
        self._probing = False

    def unavailable(self, op: str, exc: BaseException | None = None) -> UnavailableError:
        """The error a caller that fails closed raises (``exc``: the failure, if any)."""
        cause = describe(exc, with_type=True) if exc is not None else "down, retried later"
        retry_after_s = max(0.0, self._skip_until - self._clock.monotonic())
        return UnavailableError(
            f"{self.what} {mask_url(self.url)}: {op} failed: {cause}",
            retry_after_s=max(retry_after_s, self.first_s),
        )
