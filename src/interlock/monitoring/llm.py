"""Prometheus metrics of the LLM gateway.

Labels are bounded by configuration: ``model`` and ``deployment`` are names from
``[[llm.models]]`` and ``[[llm.deployments]]`` (a request for an unknown model is
counted with ``model=""``), ``tenant`` a name from ``[[llm.tenants]]`` or ``""``.
Counters count since the process started; one ``interlock serve`` process is one
Prometheus target, so the figures are exact per target and add up across nodes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from interlock.resilience.breaker import BreakerState

__all__ = ["LLMMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "interlock_llm_requests_total",
            "LLM gateway requests by model, deployment that answered, and status",
            ["model", "deployment", "tenant", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "interlock_llm_request_seconds",
            "Time to answer an LLM request (a stream: to its end)",
            ["model", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "interlock_llm_time_to_first_token_seconds",
            "Time from a streamed request to its first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "interlock_llm_overhead_seconds",
            "Time the gateway added to a call: total minus the time spent on upstreams",
            ["model"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=r,
        )
        self.tokens = Counter(
            "interlock_llm_tokens_total",
            "Tokens used upstream",
            ["model", "deployment", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "interlock_llm_cost_usd_total",
            "Cost of upstream calls in USD",
            ["model", "deployment", "tenant"],
            registry=r,
        )
        self.saved = Counter(
            "interlock_llm_saved_cost_usd_total",
            "What answers from the cache would have cost",
            ["model"],
            registry=r,
        )
        self.cache = Counter(
            "interlock_llm_cache_total",
            "Cache lookups by result (hit, semantic, miss, stale, coalesced, off)",
            ["model", "result"],
            registry=r,
        )
        self.retries = Counter(
            "interlock_llm_retries_total",
            "Attempts after the first on a deployment",
            ["deployment"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "interlock_llm_upstream_errors_total",
            "Failed upstream attempts by kind (http, timeout, connect, malformed, stream_cut)",
            ["deployment", "kind"],
            registry=r,
        )
        self.fallbacks = Counter(
            "interlock_llm_fallbacks_total",
            "Requests answered by a fallback model, or a stale cached answer",
            ["model", "to"],
            registry=r,
        )
        self.breaker = Gauge(
            "interlock_llm_breaker_state",
            "Circuit breaker per deployment: 0 closed, 1 half-open, 2 open",
            ["deployment"],
            registry=r,
        )
        self.rejections = Counter(
            "interlock_llm_limit_rejections_total",
            "Requests refused by a rate limit or budget",
            ["limit", "kind"],
            registry=r,
        )

    def breaker_changed(self, deployment: str, state: BreakerState) -> None:
        self.breaker.labels(deployment).set(_STATE_VALUE[state])
