"""A clock for tests: it moves only when the test says so."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["ManualClock"]


class ManualClock:
    """A :class:`~interlock._core.clock.Clock` that moves only when told to."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
