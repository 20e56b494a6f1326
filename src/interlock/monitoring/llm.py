"""Prometheus metrics of the LLM gateway.

Labels are bounded by configuration: ``model`` and ``deployment`` are names from
``[[llm.models]]`` and ``[[llm.deployments]]`` (a request for an unknown model is
counted with ``model=""``), ``tenant`` a name from ``[[llm.tenants]]`` or ``""``.
Counters count since the process started; one ``interlock serve`` process is one
Prometheus target, so the figures are exact per target and add up across nodes.

:class:`LLMMetrics` is the gateway's observer
(:class:`~interlock.llm.observer.GatewayObserver`, met structurally: ``monitoring``
does not import ``llm``).
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
        self._children: dict[tuple[str, str, str, str], _Children] = {}
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

    # -- the gateway's observer ------------------------------------------------------------

    def answered(
        self,
        model: str,
        deployment: str,
        tenant: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        overhead_s: float,
    ) -> None:
        key = (model, deployment, tenant, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(self, model, deployment, tenant, status)
        children.requests.inc()
        if prompt_tokens:
            children.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            children.completion_tokens.inc(completion_tokens)
        if cost_usd:
            children.cost.inc(cost_usd)
        children.overhead.observe(overhead_s)

    def cache_result(self, model: str, result: str) -> None:
        self.cache.labels(model, result).inc()

    def cache_saved(self, model: str, usd: float) -> None:
        self.saved.labels(model).inc(usd)

    def fallback_used(self, model: str, to: str) -> None:
        self.fallbacks.labels(model, to).inc()

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def retried(self, deployment: str) -> None:
        self.retries.labels(deployment).inc()

    def upstream_failed(self, deployment: str, kind: str) -> None:
        self.upstream_errors.labels(deployment, kind).inc()

    def rejected(self, limit: str, kind: str) -> None:
        self.rejections.labels(limit, kind).inc()

    def breaker_changed(self, deployment: str, state: BreakerState) -> None:
        self.breaker.labels(deployment).set(_STATE_VALUE[state])


class _Children:
    """The metric children of one (model, deployment, tenant, status): looked up once."""

    __slots__ = ("completion_tokens", "cost", "overhead", "prompt_tokens", "requests")

    def __init__(self, metrics: LLMMetrics, model: str, dep: str, tenant: str, status: str):
        self.requests = metrics.requests.labels(model, dep, tenant, status)
        self.prompt_tokens = metrics.tokens.labels(model, dep, "prompt")
        self.completion_tokens = metrics.tokens.labels(model, dep, "completion")
        self.cost = metrics.cost.labels(model, dep, tenant)
        self.overhead = metrics.overhead.labels(model)
