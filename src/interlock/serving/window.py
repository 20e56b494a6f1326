"""Rolling-window request statistics per model version: count, errors, latency quantiles.

The canary guard compares a canary with its stable version over the last minute or so.
Each window is a ring of time buckets; each bucket counts requests, errors and a
latency histogram with fixed log-spaced bounds, so recording is O(1) and a p99 over the
window merges a few dozen small arrays.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from interlock._core.clock import Clock

__all__ = ["RollingWindow", "WindowSnapshot"]

# 0.1 ms … ~30 s, 12 bounds per decade: a quantile is off by at most ~21%.
_BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 10 ** (i / 12) for i in range(67))


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class _Bucket:
    __slots__ = ("errors", "histogram", "requests", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.requests = 0
        self.errors = 0
        self.histogram = [0] * (len(_BOUNDS_MS) + 1)


class RollingWindow:
    """Requests, errors and latencies of the last ``window_s`` seconds."""

    def __init__(self, clock: Clock, window_s: float = 60.0, buckets: int = 12) -> None:
        self._clock = clock
        self._span = window_s / buckets
        self._size = buckets
        self._ring: list[_Bucket] = []

    def _current(self) -> _Bucket:
        now = self._clock.monotonic()
        start = math.floor(now / self._span) * self._span
        ring = self._ring
        if not ring or ring[-1].started != start:
            ring.append(_Bucket(start))
            if len(ring) > self._size:
                del ring[0]
        return ring[-1]

    def record(self, latency_s: float, ok: bool) -> None:
        bucket = self._current()
        bucket.requests += 1
        if not ok:
            bucket.errors += 1
        bucket.histogram[bisect.bisect_left(_BOUNDS_MS, latency_s * 1000.0)] += 1

    def snapshot(self) -> WindowSnapshot:
        horizon = self._clock.monotonic() - self._span * self._size
        live = [b for b in self._ring if b.started + self._span > horizon]
        requests = sum(b.requests for b in live)
        errors = sum(b.errors for b in live)
        merged = [sum(column) for column in zip(*(b.histogram for b in live), strict=True)]
        return WindowSnapshot(
            requests=requests,
            errors=errors,
            p50_ms=_quantile(merged, requests, 0.50),
            p99_ms=_quantile(merged, requests, 0.99),
        )

    def reset(self) -> None:
        self._ring.clear()


def _quantile(histogram: list[int], total: int, q: float) -> float:
    """The upper bound of the bucket holding the q-quantile (0 for an empty window)."""
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return _BOUNDS_MS[index] if index < len(_BOUNDS_MS) else math.inf
    return math.inf
