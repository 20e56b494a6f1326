"""Prometheus metrics of a serving process, all named ``interlock_*``.

Each app owns its own ``CollectorRegistry`` (no global state), so two apps in one
process, as in tests, never mix their figures. Queue depth is read from the batchers at
scrape time rather than updated on every request, and so is
``interlock_asyncio_tasks``: the tasks alive on the process's event loop, which stays
flat on a healthy node under steady load and climbs when something leaks tasks
(``bench/soak.py`` watches it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from interlock.resilience.breaker import BreakerState

__all__ = ["ServingMetrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (model, version, queued rows, busy replicas, ready replicas, queueing delay in seconds)
QueueReader = Callable[[], Iterable[tuple[str, int, int, int, int, float]]]


class _QueueCollector(Collector):
    def __init__(self, read: QueueReader) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "version"]
        depth = GaugeMetricFamily(
            "interlock_queue_depth_rows",
            "Rows waiting for an inference worker, per loaded version.",
            labels=labels,
        )
        running = GaugeMetricFamily(
            "interlock_batches_in_flight",
            "Batches being predicted now, per loaded version.",
            labels=labels,
        )
        replicas = GaugeMetricFamily(
            "interlock_replicas",
            "Inference workers ready per loaded version (autoscaled between min and max).",
            labels=labels,
        )
        delay = GaugeMetricFamily(
            "interlock_queue_delay_seconds",
            "Queueing delay per loaded version (moving average): what HPA/KEDA scale on.",
            labels=labels,
        )
        for model, version, queued, busy, ready, delay_s in self._read():
            key = [model, str(version)]
            depth.add_metric(key, queued)
            running.add_metric(key, busy)
            replicas.add_metric(key, ready)
            delay.add_metric(key, delay_s)
        yield depth
        yield running
        yield replicas
        yield delay


class _TaskCollector(Collector):
    """``interlock_asyncio_tasks``: tasks not yet done on the process's event loop.

    The loop is the one running where the scrape happens (``/metrics`` of ``interlock
    serve`` is a handler on its loop), else the one that was running when the metrics
    were made (``interlock worker`` serves them from a thread of prometheus_client).
    With neither, the family is empty.
    """

    def __init__(self) -> None:
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def collect(self) -> Iterable[Metric]:
        tasks = GaugeMetricFamily(
            "interlock_asyncio_tasks",
            "Asyncio tasks not yet done on this process's event loop.",
        )
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop
        if loop is not None and not loop.is_closed():
            tasks.add_metric([], len(asyncio.all_tasks(loop)))
        yield tasks


class ServingMetrics:
    """The collectors of one serving app, and the cheap calls that feed them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(_TaskCollector())
        self.requests = Counter(
            "interlock_requests",
            "Prediction requests answered, by model, version, protocol and HTTP status.",
            ["model", "version", "protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "interlock_request_latency_seconds",
            "Time from a prediction request's arrival to its answer.",
            ["model", "version", "protocol", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "interlock_predicted_rows",
            "Rows predicted, by model and version.",
            ["model", "version"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "interlock_batch_size_rows",
            "Rows per batch sent to a model.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "interlock_model_load_seconds",
            "Time to load and warm a model version.",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        self.loaded_versions = Gauge(
            "interlock_model_loaded",
            "1 for each model version loaded in this process.",
            ["model", "version"],
            registry=self.registry,
        )
        self.cache_rows = Counter(
            "interlock_cache_rows",
            "Rows looked up in the prediction cache, by model and result (hit or miss).",
            ["model", "result"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "interlock_fallbacks",
            "Requests answered by a fallback, by model, failed version and kind.",
            ["model", "version", "kind"],
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "interlock_breaker_state",
            "Circuit breaker state per version: 0 closed, 1 half-open, 2 open.",
            ["model", "version"],
            registry=self.registry,
        )
        self.breaker_transitions = Counter(
            "interlock_breaker_transitions",
            "Circuit breaker transitions, by the state entered.",
            ["model", "version", "state"],
            registry=self.registry,
        )
        self.shadow_requests = Counter(
            "interlock_shadow_requests",
            "Shadow copies, by model, shadow version and outcome (compared, failed, dropped).",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.shadow_delta = Histogram(
            "interlock_shadow_abs_delta",
            "Largest |shadow - primary| score difference per request.",
            ["model", "version"],
            buckets=(0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=self.registry,
        )
        self.shadow_flips = Counter(
            "interlock_shadow_label_flips",
            "Rows whose decision differs between the shadow and the primary.",
            ["model", "version"],
            registry=self.registry,
        )
        self.canary_weight = Gauge(
            "interlock_canary_weight_percent",
            "Current weight of a model's canary version (0 after a rollback).",
            ["model", "version"],
            registry=self.registry,
        )
        self.canary_actions = Counter(
            "interlock_canary_actions",
            "Canary guard actions: advance, promote, rollback.",
            ["model", "version", "action"],
            registry=self.registry,
        )
        self.loop_failures = Counter(
            "interlock_background_loop_failures",
            "Failed iterations of a background loop (each one retried with backoff).",
            ["loop"],
            registry=self.registry,
        )
        self.loop_failing = Gauge(
            "interlock_background_loop_failing",
            "1 while a background loop's last iteration failed (the node is then not ready).",
            ["loop"],
            registry=self.registry,
        )
        self.redis_failures = Counter(
            "interlock_redis_failures",
            "Failed calls to Redis, by caller (cache, rate limiter, ledger, ...).",
            ["what"],
            registry=self.registry,
        )
        self.redis_outage = Gauge(
            "interlock_redis_outage",
            "1 while a caller's Redis is down (it then fails open or closed, as documented).",
            ["what"],
            registry=self.registry,
        )
        self._request_children: dict[
            tuple[str, str, str, int], tuple[Callable[[], None], Callable[[float], None]]
        ] = {}
        self._batch_children: dict[tuple[str, int], tuple[Callable[[float], None], ...]] = {}
        self._cache_children: dict[str, tuple[Callable[[float], None], ...]] = {}

    def watch_queues(self, read: QueueReader) -> None:
        self.registry.register(_QueueCollector(read))

    def request_done(
        self, model: str, version: str, protocol: str, status: int, seconds: float
    ) -> None:
        key = (model, version, protocol, status)
        children = self._request_children.get(key)
        if children is None:
            labels = (model, version, protocol, str(status))
            children = (
                self.requests.labels(*labels).inc,
                self.latency.labels(*labels).observe,
            )
            if len(self._request_children) < 10_000:  # bounded: unknown names are not cached
                self._request_children[key] = children
        children[0]()
        children[1](seconds)

    # ServingObserver
    def model_loaded(self, model: str, version: int, seconds: float) -> None:
        self.load_seconds.labels(model).observe(seconds)
        self.loaded_versions.labels(model, str(version)).set(1)

    def batch_done(self, model: str, version: int, rows: int) -> None:
        key = (model, version)
        children = self._batch_children.get(key)
        if children is None:
            children = (
                self.batch_size.labels(model, str(version)).observe,
                self.rows.labels(model, str(version)).inc,
            )
            self._batch_children[key] = children
        children[0](rows)
        children[1](rows)

    # PipelineObserver
    def cache_lookup(self, model: str, hits: int, misses: int) -> None:
        children = self._cache_children.get(model)
        if children is None:
            children = (
                self.cache_rows.labels(model, "hit").inc,
                self.cache_rows.labels(model, "miss").inc,
            )
            self._cache_children[model] = children
        if hits:
            children[0](hits)
        if misses:
            children[1](misses)

    def fallback_used(self, model: str, failed_version: int, kind: str) -> None:
        self.fallbacks.labels(model, str(failed_version), kind).inc()

    def breaker_changed(self, model: str, version: int, state: BreakerState) -> None:
        level = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}[state]
        self.breaker_state.labels(model, str(version)).set(level)
        self.breaker_transitions.labels(model, str(version), state.value).inc()

    # ShadowObserver
    def shadow_compared(self, model: str, shadow: int, delta: float | None, flips: int) -> None:
        self.shadow_requests.labels(model, str(shadow), "compared").inc()
        if delta is not None:
            self.shadow_delta.labels(model, str(shadow)).observe(delta)
        if flips:
            self.shadow_flips.labels(model, str(shadow)).inc(flips)

    def shadow_failed(self, model: str, shadow: int) -> None:
        self.shadow_requests.labels(model, str(shadow), "failed").inc()

    def shadow_dropped(self, model: str, shadow: int) -> None:
        self.shadow_requests.labels(model, str(shadow), "dropped").inc()

    # RouterObserver
    def canary_changed(
        self, model: str, version: int, weight: float, action: str, reason: str = ""
    ) -> None:
        self.canary_weight.labels(model, str(version)).set(weight)
        self.canary_actions.labels(model, str(version), action).inc()

    # LoopObserver
    def loop_failed(self, loop: str) -> None:
        self.loop_failures.labels(loop).inc()
        self.loop_failing.labels(loop).set(1)

    def loop_recovered(self, loop: str) -> None:
        self.loop_failing.labels(loop).set(0)

    # RedisObserver (interlock.store.redis)
    def redis_failed(self, what: str) -> None:
        self.redis_failures.labels(what).inc()

    def redis_down(self, what: str, down: bool) -> None:
        self.redis_outage.labels(what).set(1 if down else 0)

    def model_unloaded(self, model: str, version: int) -> None:
        self.loaded_versions.labels(model, str(version)).set(0)
