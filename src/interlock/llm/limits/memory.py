"""The rate limiter of one node: sliding windows in this process (``memory://``)."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

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

if TYPE_CHECKING:
    from interlock._core.clock import Clock

__all__ = ["MemoryLimiter"]


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
