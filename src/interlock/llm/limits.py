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
is logged per outage, and Redis is left alone for a backoff (0.5 s doubling to 5 s)
after which one call probes it. An outage of the limiter must not take the gateway
down with it; the providers' own 429s still protect their quotas meanwhile.

Over a limit, the gateway either answers 429 with ``Retry-After`` and the
``x-ratelimit-*`` headers of the refusing limit (:meth:`Quota.headers`), or, when
configured to queue, calls :func:`acquire_within` to wait for room until its deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self
from urllib.parse import urlsplit

from interlock._core.clock import SystemClock
from interlock.errors import ConfigError, RateLimitedError
from interlock.settings import mask_url

if TYPE_CHECKING:
    import redis.asyncio

    from interlock._core.clock import Clock

__all__ = [
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

logger = logging.getLogger("interlock.llm.limits")

WINDOW_S = 60.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 5.0
MAX_CONNECTIONS = 32
"""Connections of one Redis limiter or ledger; further calls wait for one."""

_US = 1_000_000
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


# -- values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``rpm`` requests and ``tpm`` tokens per window under the name ``name``.

    The name identifies the limit's state (``tenant:dashboards``,
    ``deployment:primary``); ``None`` leaves that dimension unlimited.
    """

    name: str
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a limit needs a name")
        for field, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and not value > 0:
                raise ValueError(f"{self.name}: {field} must be positive or None, not {value}")

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(slots=True)
class Reservation:
    """What one :meth:`RateLimiter.acquire` took, to reconcile later.

    ``recorded`` is False when the request was admitted unchecked (the limiter's store
    was unavailable): reconciling it changes nothing but ``tokens``.
    """

    id: str
    limits: tuple[Limit, ...]
    tokens: int
    recorded: bool = True


@dataclass(frozen=True, slots=True)
class Quota:
    """The room left after an acquire (or at a refusal), for OpenAI's rate-limit headers.

    Requests and tokens each report the tightest limit that caps them: the one with the
    least room left. ``reset_*_s`` is the time until that limit's oldest counted request
    leaves the window and its room grows again (0 with an empty window). A dimension
    that no limit caps has a ``limit_*`` of ``None`` and gets no headers.
    """

    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, as OpenAI sends them."""
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.remaining_requests))
            out["x-ratelimit-reset-requests"] = format_reset(self.reset_requests_s)
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.remaining_tokens))
            out["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens_s)
        return out


@dataclass(slots=True)
class LimiterStats:
    """Counters of one limiter: requests ``admitted`` and ``refused``, store ``errors``,
    and requests admitted ``unchecked`` because the store was unavailable (fail open)."""

    admitted: int = 0
    refused: int = 0
    errors: int = 0
    unchecked: int = 0


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it: ``120ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h0m0s``.

    Rounded up to the millisecond, so that a client waiting that long finds room.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


# -- the port --------------------------------------------------------------------------


class RateLimiter(Protocol):
    """Where the sliding windows of every limit are kept."""

    window_s: float
    stats: LimiterStats

    async def acquire(self, limits: Sequence[Limit], tokens: int) -> tuple[Reservation, Quota]:
        """Take one request and ``tokens`` tokens from every limit, or nothing.

        Returns the reservation and the room left. Limits with neither rpm nor tpm are
        skipped, and a name given twice counts once.

        Raises:
            RateLimitedError: a limit has no room for this request; nothing was taken.
                ``retry_after_s`` is when the refusing limit has room again for it (the
                longest wait when several refuse), ``limit`` is ``NAME:rpm`` or
                ``NAME:tpm``, ``headers`` are that limit's ``x-ratelimit-*`` headers.
        """
        ...

    async def reconcile(self, reservation: Reservation, tokens: int) -> None:
        """Replace the reserved token count by the real one (lower or higher).

        A no-op for limits the reservation has already left the window of.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the limiter cannot be used afterwards."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


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
    if scheme in _REDIS_SCHEMES:
        return RedisLimiter(
            url, window_s=window_s, timeout_s=timeout_s, key_prefix=key_prefix, clock=clock
        )
    raise ConfigError(
        f"unknown rate-limit URL scheme {scheme!r} in {mask_url(url)!r}: "
        "expected memory:// or redis://host:port/db"
    )


async def acquire_within(
    limiter: RateLimiter, limits: Sequence[Limit], tokens: int, *, timeout_s: float
) -> tuple[Reservation, Quota]:
    """:meth:`RateLimiter.acquire`, waiting up to ``timeout_s`` for room instead of failing.

    Each refusal says when room comes back; this sleeps until then and tries again.
    Waiters are not served in order: whoever tries first after room frees up takes it.

    Raises:
        RateLimitedError: at once when the room will not come back within what is left
            of ``timeout_s``, or when the request can never pass (more tokens than a tpm).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await limiter.acquire(limits, tokens)
        except RateLimitedError as exc:
            if _too_large(limits, tokens) is not None:
                raise
            if exc.retry_after_s > deadline - loop.time():
                raise
            await asyncio.sleep(exc.retry_after_s)


# -- shared by both limiters ---------------------------------------------------------------


@dataclass(slots=True)
class _Room:
    """One limit's state as an acquire saw it: requests and tokens in the window."""

    limit: Limit
    requests: int
    tokens: int
    reset_s: float


def _quota(rooms: Sequence[_Room]) -> Quota:
    req: _Room | None = None
    tok: _Room | None = None
    req_left = tok_left = 0
    for room in rooms:
        rpm, tpm = room.limit.rpm, room.limit.tpm
        if rpm is not None and (req is None or rpm - room.requests < req_left):
            req, req_left = room, rpm - room.requests
        if tpm is not None and (tok is None or tpm - room.tokens < tok_left):
            tok, tok_left = room, tpm - room.tokens
    return Quota(
        None if req is None else req.limit.rpm,
        req_left,
        0.0 if req is None else req.reset_s,
        None if tok is None else tok.limit.tpm,
        tok_left,
        0.0 if tok is None else tok.reset_s,
    )


def _active(limits: Sequence[Limit]) -> tuple[Limit, ...]:
    seen: set[str] = set()
    out: list[Limit] = []
    for limit in limits:
        if limit.active and limit.name not in seen:
            seen.add(limit.name)
            out.append(limit)
    return tuple(out)


def _per(window_s: float) -> str:
    return "minute" if window_s == 60.0 else f"{window_s:g} s"


def _too_large(limits: Sequence[Limit], tokens: int) -> Limit | None:
    for limit in limits:
        if limit.tpm is not None and tokens > limit.tpm:
            return limit
    return None


def _check_request(limits: Sequence[Limit], tokens: int, window_s: float) -> None:
    if tokens < 0:
        raise ValueError(f"a request cannot reserve {tokens} tokens")
    limit = _too_large(limits, tokens)
    if limit is not None:
        quota = _quota([_Room(limit, 0, 0, 0.0)])
        raise RateLimitedError(
            f"request too large for {limit.name}: it needs {tokens} tokens (prompt and "
            f"max_tokens) and the limit is {limit.tpm} tokens per {_per(window_s)}, so it "
            "can never pass; shorten the prompt or lower max_tokens",
            retry_after_s=window_s,
            limit=f"{limit.name}:tpm",
            headers=quota.headers(),
        )


def _refused(
    room: _Room, kind: str, retry_after_s: float, tokens: int, window_s: float
) -> RateLimitedError:
    limit, per = room.limit, _per(window_s)
    if kind == "rpm":
        what = f"{limit.rpm} requests per {per}, and {room.requests} were admitted in the last"
    else:
        what = (
            f"{limit.tpm} tokens per {per}, {room.tokens} are taken in the last and this "
            f"request needs {tokens}"
        )
    return RateLimitedError(
        f"rate limit {limit.name}:{kind} reached: {what} {per}; "
        f"retry in {format_reset(retry_after_s)}",
        retry_after_s=retry_after_s,
        limit=f"{limit.name}:{kind}",
        headers=_quota([room]).headers(),
    )


# -- memory ------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("at", "id", "tokens")

    def __init__(self, at: int, id: str, tokens: int) -> None:
        self.at = at
        self.id = id
        self.tokens = tokens


class _Log:
    """One limit's window: entries oldest first, by id, and the sum of their tokens."""

    __slots__ = ("by_id", "entries", "tokens")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.by_id: dict[str, _Entry] = {}
        self.tokens = 0

    def trim(self, cutoff: int) -> None:
        entries = self.entries
        while entries and entries[0].at <= cutoff:
            entry = entries.popleft()
            del self.by_id[entry.id]
            self.tokens -= entry.tokens

    def wait_us(self, limit: Limit, tokens: int, now: int, window: int) -> tuple[str, int] | None:
        """Why and for how long (µs) this log refuses ``tokens`` more, or None."""
        entries = self.entries
        refusal: tuple[str, int] | None = None
        if limit.rpm is not None and len(entries) >= limit.rpm:
            refusal = ("rpm", entries[len(entries) - limit.rpm].at + window - now)
        if limit.tpm is not None and self.tokens + tokens > limit.tpm:
            need = self.tokens + tokens - limit.tpm
            wait = window  # only if reconciled tokens vanished: cannot happen
            for entry in entries:  # the oldest leave first
                need -= entry.tokens
                if need <= 0:
                    wait = entry.at + window - now
                    break
            if refusal is None or wait > refusal[1]:
                refusal = ("tpm", wait)
        return refusal


class MemoryLimiter:
    """Sliding-window limits in this process, for one event loop (no lock: no await)."""

    def __init__(self, *, window_s: float = WINDOW_S, clock: Clock | None = None) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ConfigError(f"the rate-limit window must be positive, not {window_s}")
        self.window_s = window_s
        self.stats = LimiterStats()
        self._window = round(window_s * _US)
        self._clock = clock or SystemClock()
        self._logs: dict[str, _Log] = {}
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"MemoryLimiter(window_s={self.window_s:g}, limits={len(self._logs)})"

    def _now(self) -> int:
        return round(self._clock.monotonic() * _US)

    def _log(self, name: str) -> _Log:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = _Log()
        return log

    async def acquire(self, limits: Sequence[Limit], tokens: int) -> tuple[Reservation, Quota]:
        active = _active(limits)
        _check_request(active, tokens, self.window_s)
        now, window = self._now(), self._window
        logs = [self._log(limit.name) for limit in active]
        worst: tuple[int, str, int] | None = None  # (index, kind, wait µs)
        for i, (limit, log) in enumerate(zip(active, logs, strict=True)):
            log.trim(now - window)
            refusal = log.wait_us(limit, tokens, now, window)
            if refusal is not None and (worst is None or refusal[1] > worst[2]):
                worst = (i, *refusal)
        if worst is not None:
            self.stats.refused += 1
            i, kind, wait = worst
            log = logs[i]
            reset = log.entries[0].at + window - now if log.entries else 0
            room = _Room(active[i], len(log.entries), log.tokens, reset / _US)
            raise _refused(room, kind, wait / _US, tokens, self.window_s)
        rid = str(next(self._ids))
        rooms = []
        for limit, log in zip(active, logs, strict=True):
            entry = _Entry(now, rid, tokens)
            log.entries.append(entry)
            log.by_id[rid] = entry
            log.tokens += tokens
            reset = log.entries[0].at + window - now
            rooms.append(_Room(limit, len(log.entries), log.tokens, reset / _US))
        self.stats.admitted += 1
        return Reservation(rid, active, tokens), _quota(rooms)

    async def reconcile(self, reservation: Reservation, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"a request cannot have used {tokens} tokens")
        cutoff = self._now() - self._window
        for limit in reservation.limits if reservation.recorded else ():
            log = self._logs.get(limit.name)
            entry = log.by_id.get(reservation.id) if log is not None else None
            if log is None or entry is None or entry.at <= cutoff:
                continue
            log.tokens += tokens - entry.tokens
            entry.tokens = tokens
        reservation.tokens = tokens

    async def aclose(self) -> None:
        self._logs.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- redis -------------------------------------------------------------------------------

# KEYS: per limit, its log (ZSET id -> µs) then its tokens (HASH id -> tokens, '#' -> sum).
# ARGV: window µs, key TTL ms, reservation id, tokens, then per limit rpm and tpm (-1: none).
# Returns {1, then per limit: requests, tokens, µs until its oldest leaves} when admitted,
# {0, index of the refusing limit, 1 rpm | 2 tpm, wait µs, requests, tokens, reset µs}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local id, tokens = ARGV[3], tonumber(ARGV[4])
local cutoff = now - window
local n = #KEYS / 2
local counts, sums = {}, {}
local worst, worst_kind, worst_wait = 0, 0, -1
local function reset(log)
  local first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if #first == 0 then return 0 end
  return tonumber(first[2]) + window - now
end
for i = 1, n do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  while true do
    local gone = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff, 'LIMIT', 0, 256)
    if #gone == 0 then break end
    local freed = 0
    for _, v in ipairs(redis.call('HMGET', tok, unpack(gone))) do
      freed = freed + (tonumber(v) or 0)
    end
    redis.call('ZREM', log, unpack(gone))
    redis.call('HDEL', tok, unpack(gone))
    redis.call('HINCRBY', tok, '#', -freed)
  end
  local count = redis.call('ZCARD', log)
  local sum = tonumber(redis.call('HGET', tok, '#') or '0')
  counts[i], sums[i] = count, sum
  local rpm, tpm = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local kind, wait = 0, -1
  if rpm >= 0 and count >= rpm then
    local at = redis.call('ZRANGE', log, count - rpm, count - rpm, 'WITHSCORES')
    kind, wait = 1, tonumber(at[2]) + window - now
  end
  if tpm >= 0 and sum + tokens > tpm then
    local need, start, w = sum + tokens - tpm, 0, window
    while need > 0 do
      local batch = redis.call('ZRANGE', log, start, start + 255, 'WITHSCORES')
      if #batch == 0 then break end
      local ids = {}
      for j = 1, #batch, 2 do ids[#ids + 1] = batch[j] end
      local values = redis.call('HMGET', tok, unpack(ids))
      for j = 1, #ids do
        need = need - (tonumber(values[j]) or 0)
        if need <= 0 then
          w = tonumber(batch[2 * j]) + window - now
          break
        end
      end
      start = start + 256
    end
    if w > wait then kind, wait = 2, w end
  end
  if wait > worst_wait then worst, worst_kind, worst_wait = i, kind, wait end
end
if worst > 0 then
  return {0, worst, worst_kind, worst_wait, counts[worst], sums[worst],
          reset(KEYS[2 * worst - 1])}
end
local out = {1}
for i = 1, n do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('ZADD', log, now, id)
  redis.call('HSET', tok, id, tokens)
  redis.call('HINCRBY', tok, '#', tokens)
  redis.call('PEXPIRE', log, ARGV[2])
  redis.call('PEXPIRE', tok, ARGV[2])
  out[#out + 1] = counts[i] + 1
  out[#out + 1] = sums[i] + tokens
  out[#out + 1] = reset(log)
end
return out
"""

# KEYS: as for _ACQUIRE. ARGV: window µs, reservation id, tokens.
_RECONCILE = """
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[1])
local id, tokens = ARGV[2], tonumber(ARGV[3])
for i = 1, #KEYS / 2 do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  local at = redis.call('ZSCORE', log, id)
  if at and tonumber(at) > cutoff then
    local old = tonumber(redis.call('HGET', tok, id) or '0')
    redis.call('HSET', tok, id, tokens)
    redis.call('HINCRBY', tok, '#', tokens - old)
  end
end
return 0
"""


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


_ACQUIRE_SHA = _sha1(_ACQUIRE)
_RECONCILE_SHA = _sha1(_RECONCILE)


class _Outage:
    """Fail-open bookkeeping for one Redis-backed store: backoff, probe, one warning.

    After a failure the store is skipped for a backoff (0.5 s doubling to 5 s); when it
    ends one call probes while the others keep skipping. One warning is logged when an
    outage starts and one info line when it ends.
    """

    def __init__(self, what: str, url: str, clock: Clock, log: logging.Logger) -> None:
        self.what = what
        self.url = url
        self.skipped = 0
        self._clock = clock
        self._log = log
        self._failing = False
        self._probing = False
        self._backoff_s = BACKOFF_INITIAL_S
        self._skip_until = -math.inf

    def may_call(self) -> bool:
        if not self._failing:
            return True
        if self._probing or self._clock.monotonic() < self._skip_until:
            self.skipped += 1
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        if self._failing:
            self._log.info(
                "%s %s answers again (%d calls went unchecked)",
                self.what,
                mask_url(self.url),
                self.skipped,
            )
            self._failing = self._probing = False
            self._backoff_s = BACKOFF_INITIAL_S
            self.skipped = 0

    def failed(self, op: str, exc: BaseException) -> None:
        now = self._clock.monotonic()
        if now >= self._skip_until:  # not a straggler from before the current backoff
            self._skip_until = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
        self._probing = False
        if not self._failing:
            self._failing = True
            self._log.warning(
                "%s %s failed (%s: %s); failing open until it answers",
                self.what,
                mask_url(self.url),
                op,
                _describe(exc),
                exc_info=None if isinstance(exc, (OSError, _redis_errors())) else exc,
            )

    def cancelled(self) -> None:
        self._probing = False  # a cancelled probe must not stop the next one


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _redis_errors() -> type[Exception]:
    from redis.exceptions import RedisError

    return RedisError


def _redis_client(url: str, timeout_s: float) -> redis.asyncio.Redis:
    """A client whose calls wait for one of ``MAX_CONNECTIONS`` rather than fail.

    redis-py's default pool refuses a call when its 100 connections are busy, which a
    burst of requests reaches at once; Redis runs one command at a time anyway, so
    more connections would only queue there instead of here.
    """
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=None,  # asyncio.timeout bounds the wait for a connection too
        socket_connect_timeout=timeout_s,
        socket_timeout=None,  # asyncio.timeout bounds every call instead
        retry=Retry(NoBackoff(), 0),  # a retry would only outlive the timeout
    )
    return redis.asyncio.Redis.from_pool(pool)


def _check_redis_url(url: str, what: str) -> None:
    try:
        from redis.asyncio.connection import parse_url
    except ImportError as exc:
        raise ConfigError(
            f"{what} URL {mask_url(url)} needs the redis package: pip install 'interlock[redis]'"
        ) from exc
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"invalid {what} URL {mask_url(url)!r}: {exc}") from exc


async def _run_script(
    client: redis.asyncio.Redis, script: str, sha: str, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """EVALSHA, or EVAL when Redis does not know the script yet (which also loads it)."""
    from redis.exceptions import NoScriptError

    try:
        return await client.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script, len(keys), *keys, *args)


class RedisLimiter:
    """Sliding-window limits in Redis, shared by every node using the same ``key_prefix``.

    ``timeout_s`` bounds each call, connection included; ``clock.monotonic()`` times
    the backoff after a failure. The window follows Redis's clock, not this one.
    """

    def __init__(
        self,
        url: str,
        *,
        window_s: float = WINDOW_S,
        timeout_s: float = 0.5,
        key_prefix: str = "interlock:rl:",
        clock: Clock | None = None,
    ) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ConfigError(f"the rate-limit window must be positive, not {window_s}")
        if not timeout_s > 0:
            raise ConfigError(f"the rate-limit timeout must be positive, not {timeout_s}")
        _check_redis_url(url, "rate-limit")
        self.url = url
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        self.stats = LimiterStats()
        self._window = round(window_s * _US)
        self._ttl_ms = str(math.ceil(window_s * 1000) + 1000)
        self._outage = _Outage("redis rate limiter", url, clock or SystemClock(), logger)
        self._client: redis.asyncio.Redis | None = None
        self._node = os.urandom(6).hex()
        self._ids = itertools.count(1)
        self._keys: dict[str, tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"RedisLimiter({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = _redis_client(self.url, self.timeout_s)
        return self._client

    def _keys_of(self, limits: Sequence[Limit]) -> list[str]:
        keys: list[str] = []
        for limit in limits:
            pair = self._keys.get(limit.name)
            if pair is None:
                base = f"{self.key_prefix}{{{limit.name}}}"
                pair = self._keys[limit.name] = (f"{base}:log", f"{base}:tok")
            keys += pair
        return keys

    async def _call(self, op: str, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, or None when Redis failed or is being left alone."""
        if not self._outage.may_call():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await _run_script(self._redis(), script, sha, keys, args)
        except Exception as exc:  # fail open, whatever broke
            self.stats.errors += 1
            self._outage.failed(op, exc)
            return None
        except BaseException:
            self._outage.cancelled()
            raise
        self._outage.succeeded()
        return reply

    async def acquire(self, limits: Sequence[Limit], tokens: int) -> tuple[Reservation, Quota]:
        active = _active(limits)
        _check_request(active, tokens, self.window_s)
        rid = f"{self._node}:{next(self._ids)}"
        if not active:
            self.stats.admitted += 1
            return Reservation(rid, active, tokens), Quota()
        args: list[Any] = [self._window, self._ttl_ms, rid, tokens]
        for limit in active:
            args += (-1 if limit.rpm is None else limit.rpm, -1 if limit.tpm is None else limit.tpm)
        reply = await self._call("acquire", _ACQUIRE, _ACQUIRE_SHA, self._keys_of(active), args)
        if reply is None:
            self.stats.admitted += 1
            self.stats.unchecked += 1
            return Reservation(rid, active, tokens, recorded=False), Quota()
        if reply[0] == 0:
            self.stats.refused += 1
            _, index, kind, wait, requests, used, reset = reply
            room = _Room(active[index - 1], requests, used, reset / _US)
            kind_name = "rpm" if kind == 1 else "tpm"
            raise _refused(room, kind_name, wait / _US, tokens, self.window_s)
        rooms = [
            _Room(limit, reply[1 + 3 * i], reply[2 + 3 * i], reply[3 + 3 * i] / _US)
            for i, limit in enumerate(active)
        ]
        self.stats.admitted += 1
        return Reservation(rid, active, tokens), _quota(rooms)

    async def reconcile(self, reservation: Reservation, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"a request cannot have used {tokens} tokens")
        if reservation.recorded and reservation.limits and tokens != reservation.tokens:
            keys = self._keys_of(reservation.limits)
            args = [self._window, reservation.id, tokens]
            await self._call("reconcile", _RECONCILE, _RECONCILE_SHA, keys, args)
        reservation.tokens = tokens

    async def aclose(self) -> None:
        """Close the connection pool; a later call would open a new one."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.aclose()
        except Exception as exc:  # closing a broken pool must not fail a shutdown
            logger.debug("closing the redis rate limiter failed: %s", _describe(exc))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
