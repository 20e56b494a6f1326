"""Choosing a deployment, and when to try again.

A model's deployments are ordered afresh for every request by the model's strategy; the
gateway then walks that order, skipping any whose breaker is open:

- ``latency``: lowest moving average of recent successful call latencies first. A
  deployment with no successful call yet counts as the fastest, so every one gets
  measured; a failure makes a deployment count as slow for a while (its average is
  pushed up), so traffic drifts away from it before its breaker opens.
- ``weighted``: a weighted random draw without replacement (``weight`` of each
  deployment), so the order after the first is weighted too.
- ``least-busy``: fewest calls in flight first; ties by latency.

Retries follow "exponential backoff and full jitter": attempt *n* waits a uniform draw
in ``[0, min(max_delay, base_delay · 2ⁿ)]``, or the upstream's Retry-After when it
gave one. A :class:`RetryBudget` caps the share of retries over all requests, as
Finagle's and gRPC's retry budgets do, so a failing upstream sees at most
``1 + budget_ratio`` times the offered load and not ``max_attempts`` times.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from interlock._core.clock import Clock
from interlock.resilience.breaker import CircuitBreaker
from interlock.settings import LLMDeployment, LLMRetrySettings

__all__ = ["DeploymentState", "RetryBudget", "backoff_s", "order_deployments"]

_ALPHA = 0.3  # weight of the newest latency sample
_FAILURE_PENALTY_S = 5.0  # what a failure adds to the latency average, decayed like a sample


@dataclass(slots=True, eq=False)
class DeploymentState:
    """What the gateway knows of one deployment while it runs."""

    config: LLMDeployment
    breaker: CircuitBreaker
    in_flight: int = 0
    latency_s: float = 0.0  # EWMA of successful calls; 0 until the first one
    calls: int = 0
    failures: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def succeeded(self, seconds: float) -> None:
        self.calls += 1
        if self.latency_s == 0.0:
            self.latency_s = seconds
        else:
            self.latency_s += _ALPHA * (seconds - self.latency_s)

    def failed(self) -> None:
        self.calls += 1
        self.failures += 1
        base = max(self.latency_s, 0.001)
        self.latency_s = base + _ALPHA * _FAILURE_PENALTY_S


def order_deployments(
    strategy: str, states: Sequence[DeploymentState], rng: random.Random
) -> list[DeploymentState]:
    """The order in which a request tries ``states`` (breakers are checked by the caller)."""
    if len(states) < 2:
        return list(states)
    if strategy == "weighted":
        pool = list(states)
        out: list[DeploymentState] = []
        while pool:
            total = sum(s.config.weight for s in pool)
            pick = rng.random() * total
            for i, state in enumerate(pool):
                pick -= state.config.weight
                if pick <= 0 or i == len(pool) - 1:
                    out.append(pool.pop(i))
                    break
        return out
    if strategy == "least-busy":
        return sorted(states, key=lambda s: (s.in_flight, s.latency_s))
    return sorted(states, key=lambda s: s.latency_s)  # stable: config order breaks ties


def backoff_s(attempt: int, settings: LLMRetrySettings, rng: random.Random) -> float:
    """Full-jitter backoff before retry number ``attempt`` (1 for the first retry)."""
    cap = min(settings.max_delay_ms, settings.base_delay_ms * (2 ** (attempt - 1))) / 1000.0
    return rng.uniform(0.0, cap)


class RetryBudget:
    """Retries allowed as a share of requests, plus a floor per second.

    Each request deposits ``ratio`` (kept at most ``10 · ratio`` + the floor's second), each
    retry withdraws 1; the floor refills ``min_per_s`` per second up to ``min_per_s``. A
    retry is allowed while the balance holds a whole token.
    """

    def __init__(self, ratio: float, min_per_s: float, clock: Clock) -> None:
        self._ratio = ratio
        self._min_per_s = min_per_s
        self._clock = clock
        self._deposits = 0.0
        self._cap = max(10.0 * ratio, 1.0)
        self._floor = min_per_s
        self._at = clock.monotonic()
        self.refused = 0

    def request(self) -> None:
        self._deposits = min(self._deposits + self._ratio, self._cap)

    def try_retry(self) -> bool:
        now = self._clock.monotonic()
        self._floor = min(self._min_per_s, self._floor + (now - self._at) * self._min_per_s)
        self._at = now
        if self._floor >= 1.0:
            self._floor -= 1.0
            return True
        if self._deposits >= 1.0:
            self._deposits -= 1.0
            return True
        self.refused += 1
        return False
