"""The rate limiter shared by every node: sliding windows in Redis (``redis://``).

Each acquire is one ``EVALSHA`` of a Lua script that trims, checks and takes for all
the limits atomically, reading Redis's own ``TIME`` so that every node agrees on the
window (see :mod:`interlock.llm.limits` for the keys).

During a Redis outage it **fails open**: a request is admitted unchecked
(``stats.errors`` counts failed calls, ``stats.unchecked`` the requests let through) and
a reconcile is dropped. The outage policy is :class:`interlock.store.redis.Outage`:
one warning per outage on ``interlock.llm.limits``, a jittered backoff (0.5 s doubling
to 5 s) during which Redis is not called, then a single probe. An outage of the limiter
must not take the gateway down with it; the providers' own 429s still protect their
quotas meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from interlock._core.clock import SystemClock
from interlock.errors import ConfigError
from interlock.llm.limits._base import (
    _US,
    WINDOW_S,
    Limit,
    LimiterStats,
    Quota,
    Reservation,
    _active,
    _check_request,
    _quota,
    _refused,
    _Room,
)
from interlock.settings import mask_url
from interlock.store.redis import MAX_CONNECTIONS, Outage, check_url, close_client, open_client

if TYPE_CHECKING:
    import redis.asyncio

    from interlock._core.clock import Clock

__all__ = ["RedisLimiter"]

logger = logging.getLogger("interlock.llm.limits")

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
    if freed ~= 0 then  -- Redis refuses '-0' (what Lua makes of -0) as an integer
      redis.call('HINCRBY', tok, '#', -freed)
    end
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
        check_url(url, "rate-limit")
        self.url = url
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        self.stats = LimiterStats()
        self._window = round(window_s * _US)
        self._ttl_ms = str(math.ceil(window_s * 1000) + 1000)
        self.outage = Outage(
            "redis rate limiter",
            url,
            clock=clock or SystemClock(),
            logger=logger,
            fails_open=True,
            while_down="admitting requests unchecked",
        )
        self._client: redis.asyncio.Redis | None = None
        self._node = os.urandom(6).hex()
        self._ids = itertools.count(1)
        self._keys: dict[str, tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"RedisLimiter({mask_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = open_client(
                self.url, timeout_s=self.timeout_s, max_connections=MAX_CONNECTIONS
            )
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
        if not self.outage.may_call():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await _run_script(self._redis(), script, sha, keys, args)
        except Exception as exc:  # fail open, whatever broke
            self.stats.errors += 1
            self.outage.failed(op, exc)
            return None
        except BaseException:
            self.outage.cancelled()
            raise
        self.outage.succeeded()
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
        await close_client(client, timeout_s=self.timeout_s, what="redis rate limiter")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
