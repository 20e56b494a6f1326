"""Resilience building blocks for the serving hot path: circuit breakers and coalescing.

Pure and in-process: no I/O, no locks (one event loop), O(1) per call. Time comes from
an injected :class:`~interlock._core.clock.Clock`.
"""

from interlock.resilience.breaker import BreakerConfig, BreakerState, BreakerStats, CircuitBreaker
from interlock.resilience.coalesce import SingleFlight

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "BreakerStats",
    "CircuitBreaker",
    "SingleFlight",
]
