"""Shadow traffic: a copy of each request goes to another version after the answer.

The shadow never adds latency (it runs in a background task once the primary answer is
known), never changes an answer, and its failures are only counted. Each comparison —
the largest absolute difference of the scores and whether the decision flipped — feeds
the metrics and a bounded per-model log that the admin API serves.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from interlock._core.clock import Clock
from interlock.errors import InterlockError

__all__ = ["ShadowComparison", "ShadowObserver", "ShadowRunner", "compare"]

log = logging.getLogger("interlock.serving")

LOG_SIZE = 1000


@dataclass(frozen=True, slots=True)
class ShadowComparison:
    """One request answered by both versions."""

    at: datetime
    model: str
    primary: int
    shadow: int
    request_id: str | None
    rows: int
    max_abs_delta: float | None  # None when the answers are not numbers
    label_flips: int
    primary_values: list[Any]
    shadow_values: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "model": self.model,
            "primary_version": self.primary,
            "shadow_version": self.shadow,
            "request_id": self.request_id,
            "rows": self.rows,
            "max_abs_delta": self.max_abs_delta,
            "label_flips": self.label_flips,
            "primary": self.primary_values,
            "shadow": self.shadow_values,
        }


class ShadowObserver(Protocol):
    def shadow_compared(self, model: str, shadow: int, delta: float | None, flips: int) -> None: ...

    def shadow_failed(self, model: str, shadow: int) -> None: ...

    def shadow_dropped(self, model: str, shadow: int) -> None: ...


def _row_delta(a: Any, b: Any) -> tuple[float | None, bool]:
    """|Δ| and whether the decision flipped, for a score, a probability list or a label."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        delta = abs(float(a) - float(b))
        both_probabilities = 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
        flipped = (a >= 0.5) != (b >= 0.5) if both_probabilities else False
        return delta, flipped
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a:
        try:
            delta = max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True))
        except (TypeError, ValueError):
            return None, a != b
        return delta, a.index(max(a)) != b.index(max(b))
    return None, a != b


def compare(primary: list[Any], shadow: list[Any]) -> tuple[float | None, int]:
    """The largest |Δ| over the rows (None when not numeric) and the number of flips."""
    largest: float | None = None
    flips = 0
    for a, b in zip(primary, shadow, strict=False):
        delta, flipped = _row_delta(a, b)
        flips += flipped
        if delta is not None and not math.isnan(delta):
            largest = delta if largest is None else max(largest, delta)
    return largest, flips


class ShadowRunner:
    """Runs shadow predictions in the background, bounded, and keeps their comparisons."""

    def __init__(self, observer: ShadowObserver, clock: Clock, *, max_in_flight: int = 64) -> None:
        self._observer = observer
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._log: dict[str, collections.deque[ShadowComparison]] = {}

    def submit(
        self,
        model: str,
        primary: int,
        shadow: int,
        primary_values: list[Any],
        predict: Callable[[], Awaitable[list[Any]]],
        request_id: str | None,
    ) -> None:
        """Start ``predict`` (the shadow's prediction) and compare; drop it when saturated."""
        if len(self._tasks) >= self._max_in_flight:
            self._observer.shadow_dropped(model, shadow)
            return
        task = asyncio.create_task(
            self._run(model, primary, shadow, primary_values, predict, request_id)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        model: str,
        primary: int,
        shadow: int,
        primary_values: list[Any],
        predict: Callable[[], Awaitable[list[Any]]],
        request_id: str | None,
    ) -> None:
        try:
            values = await predict()
        except InterlockError as exc:
            self._observer.shadow_failed(model, shadow)
            log.info("shadow prediction failed", extra={"model": model, "error": str(exc)})
            return
        except Exception:  # a shadow must never take anything down with it
            self._observer.shadow_failed(model, shadow)
            log.exception("shadow prediction raised", extra={"model": model})
            return
        delta, flips = compare(primary_values, values)
        self._observer.shadow_compared(model, shadow, delta, flips)
        entries = self._log.setdefault(model, collections.deque(maxlen=LOG_SIZE))
        entries.append(
            ShadowComparison(
                at=self._clock.now(),
                model=model,
                primary=primary,
                shadow=shadow,
                request_id=request_id,
                rows=len(values),
                max_abs_delta=delta,
                label_flips=flips,
                primary_values=primary_values,
                shadow_values=values,
            )
        )

    def comparisons(
        self, model: str, *, limit: int = 100, disagreements_only: bool = False
    ) -> list[ShadowComparison]:
        """The newest comparisons for ``model``, newest first."""
        entries = list(self._log.get(model, ()))
        if disagreements_only:
            entries = [e for e in entries if e.label_flips or (e.max_abs_delta or 0.0) > 0.0]
        return entries[::-1][:limit]

    async def drain(self) -> None:
        """Wait for the shadow predictions under way (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
