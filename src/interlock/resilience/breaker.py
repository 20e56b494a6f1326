"""A circuit breaker per model version, with resilience4j's semantics.

The breaker watches the last ``window_calls`` recorded calls (a count-based sliding
window). Once it holds at least ``min_calls`` of them and the share of failures reaches
``failure_rate``, or the share of slow calls reaches ``slow_call_rate``, it opens: every
call is refused for ``open_s`` seconds. Then it goes half-open and lets
``half_open_calls`` probe calls through. When their results are under both thresholds
it closes again with an empty window; otherwise it opens for another ``open_s``.

    closed ──(rates at or over threshold)──▶ open ──(open_s passed)──▶ half_open
      ▲                                        ▲                           │
      └──────────(probes under thresholds)─────┼───────────────────────────┤
                                               └───(probes over)───────────┘

Every call that :meth:`CircuitBreaker.allow` admits must end in exactly one
:meth:`~CircuitBreaker.record` (it got a verdict) or :meth:`~CircuitBreaker.release`
(it never reached the model, e.g. cancelled or shed); a half-open probe that does
neither keeps its slot. The breaker is meant for one event loop: it takes no lock, and
each call is O(1) with counts kept incrementally over a ``bytearray`` ring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from interlock.errors import ConfigError

if TYPE_CHECKING:
    from interlock._core.clock import Clock
    from interlock.settings import BreakerSettings

__all__ = ["BreakerConfig", "BreakerState", "BreakerStats", "CircuitBreaker"]


class BreakerState(StrEnum):
    """Where a breaker stands; the values are the names used in metrics and logs."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN

_FAILED = 1  # flag bits of one call in the ring
_SLOW = 2


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """How a breaker decides; every rate is a fraction in (0, 1].

    ``slow_call_rate`` of 1.0 switches the slow-call rule off: slow calls alone never
    open the breaker. ``min_calls`` may not exceed ``window_calls``, or the breaker
    could never decide.
    """

    failure_rate: float = 0.5
    slow_call_rate: float = 1.0
    slow_call_s: float = 1.0
    window_calls: int = 50
    min_calls: int = 10
    open_s: float = 5.0
    half_open_calls: int = 3

    def __post_init__(self) -> None:
        # Written as "not (valid)" so that NaN is refused too.
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate}")
        if not 0.0 < self.slow_call_rate <= 1.0:
            raise ValueError(f"slow_call_rate must be in (0, 1], got {self.slow_call_rate}")
        if not self.slow_call_s > 0.0:
            raise ValueError(f"slow_call_s must be > 0, got {self.slow_call_s}")
        if not self.window_calls >= 1:
            raise ValueError(f"window_calls must be >= 1, got {self.window_calls}")
        if not 1 <= self.min_calls <= self.window_calls:
            raise ValueError(f"min_calls must be in [1, window_calls], got {self.min_calls}")
        if not self.open_s > 0.0:
            raise ValueError(f"open_s must be > 0, got {self.open_s}")
        if not self.half_open_calls >= 1:
            raise ValueError(f"half_open_calls must be >= 1, got {self.half_open_calls}")

    @classmethod
    def from_settings(cls, s: BreakerSettings) -> BreakerConfig:
        """The config for :class:`~interlock.settings.BreakerSettings` (ms → s).

        Raises :class:`~interlock.errors.ConfigError` when the combination is unusable.
        """
        try:
            return cls(
                failure_rate=s.failure_rate,
                slow_call_rate=s.slow_call_rate,
                slow_call_s=s.slow_call_ms / 1000.0,
                window_calls=s.window_calls,
                min_calls=s.min_calls,
                open_s=s.open_s,
                half_open_calls=s.half_open_calls,
            )
        except ValueError as exc:
            raise ConfigError(f"invalid breaker settings: {exc}") from exc


@dataclass(frozen=True, slots=True)
class BreakerStats:
    """A snapshot of a breaker's counts, for metrics.

    ``calls``, ``failed_calls`` and ``slow_calls`` describe the window the breaker decides
    on: the sliding window when closed or open, the probes so far when half-open.
    ``not_permitted_calls`` counts every refusal since the breaker was made.
    """

    state: BreakerState
    calls: int
    failed_calls: int
    slow_calls: int
    not_permitted_calls: int


class CircuitBreaker:
    """One breaker; see the module docstring for the rules.

    ``on_transition(name, old, new)`` is called after every change of state, with the
    breaker already in ``new``; exceptions it raises propagate to the caller.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Clock,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        # Config copied to plain attributes: one lookup each on the hot path.
        self._fail_rate = config.failure_rate
        # 1.0 means "off": a threshold no rate can reach.
        self._slow_rate = config.slow_call_rate if config.slow_call_rate < 1.0 else 2.0
        self._slow_call_s = config.slow_call_s
        self._window = config.window_calls
        self._min_calls = config.min_calls
        self._open_s = config.open_s
        self._half_open_calls = config.half_open_calls
        self._state = _CLOSED
        self._open_until = 0.0
        self._not_permitted = 0
        # The sliding window: one byte of flags per call, and running counts.
        self._ring = bytearray(config.window_calls)
        self._pos = 0
        self._size = 0
        self._failed = 0
        self._slow = 0
        # Half-open: permits handed out (released ones given back) and probe results.
        self._probes_admitted = 0
        self._probe_results = 0
        self._probe_failed = 0
        self._probe_slow = 0

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    # -- the hot path ----------------------------------------------------------------

    def allow(self) -> bool:
        """Whether a call may go ahead now; a True must be followed by record or release."""
        state = self._state
        if state is _CLOSED:
            return True
        if state is _OPEN:
            if self._clock.monotonic() < self._open_until:
                self._not_permitted += 1
                return False
            self._to_half_open()
        if self._probes_admitted < self._half_open_calls:
            self._probes_admitted += 1
            return True
        self._not_permitted += 1
        return False

    def record(self, duration_s: float, ok: bool) -> None:
        """Count the verdict of an admitted call: ``ok`` or not, and how long it took."""
        state = self._state
        if state is _CLOSED:
            flags = (0 if ok else _FAILED) | (_SLOW if duration_s >= self._slow_call_s else 0)
            ring = self._ring
            pos = self._pos
            if self._size == self._window:
                old = ring[pos]
                if old:
                    self._failed -= old & _FAILED
                    self._slow -= old >> 1
            else:
                self._size += 1
            ring[pos] = flags
            pos += 1
            self._pos = 0 if pos == self._window else pos
            if flags:
                self._failed += flags & _FAILED
                self._slow += flags >> 1
            size = self._size
            if size >= self._min_calls and (
                self._failed / size >= self._fail_rate or self._slow / size >= self._slow_rate
            ):
                self._to_open()
        elif state is _HALF_OPEN:
            self._probe_results += 1
            if not ok:
                self._probe_failed += 1
            if duration_s >= self._slow_call_s:
                self._probe_slow += 1
            n = self._probe_results
            if n >= self._half_open_calls:
                failing = self._probe_failed / n >= self._fail_rate
                if failing or self._probe_slow / n >= self._slow_rate:
                    self._to_open()
                else:
                    self._to_closed()
        # Open: the call was admitted before the breaker opened; its verdict is stale.

    def release(self) -> None:
        """Give back the permit of an admitted call that ended without a verdict."""
        if self._state is _HALF_OPEN and self._probes_admitted > self._probe_results:
            self._probes_admitted -= 1

    # -- reading -----------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose ``open_s`` has passed turns half-open."""
        if self._state is _OPEN and self._clock.monotonic() >= self._open_until:
            self._to_half_open()
        return self._state

    def retry_after_s(self) -> float:
        """Seconds until an open breaker admits probes; 0.0 in any other state."""
        if self._state is not _OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock.monotonic())

    def failure_rate(self) -> float:
        """Share of failed calls in the deciding window (as in :class:`BreakerStats`), or 0.0."""
        if self._state is _HALF_OPEN:
            n = self._probe_results
            return self._probe_failed / n if n else 0.0
        return self._failed / self._size if self._size else 0.0

    def slow_call_rate(self) -> float:
        """Share of slow calls in the deciding window (as in :class:`BreakerStats`), or 0.0."""
        if self._state is _HALF_OPEN:
            n = self._probe_results
            return self._probe_slow / n if n else 0.0
        return self._slow / self._size if self._size else 0.0

    @property
    def stats(self) -> BreakerStats:
        """A snapshot of the counts, after applying the open timeout like :attr:`state`."""
        state = self.state
        if state is _HALF_OPEN:
            calls, failed, slow = self._probe_results, self._probe_failed, self._probe_slow
        else:
            calls, failed, slow = self._size, self._failed, self._slow
        return BreakerStats(state, calls, failed, slow, self._not_permitted)

    # -- transitions -------------------------------------------------------------------

    def _to_open(self) -> None:
        self._open_until = self._clock.monotonic() + self._open_s
        self._transition(_OPEN)

    def _to_half_open(self) -> None:
        self._probes_admitted = 0
        self._probe_results = 0
        self._probe_failed = 0
        self._probe_slow = 0
        self._transition(_HALF_OPEN)

    def _to_closed(self) -> None:
        # Ring cells are read only once the ring is full again: no clearing needed.
        self._pos = 0
        self._size = 0
        self._failed = 0
        self._slow = 0
        self._transition(_CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)
