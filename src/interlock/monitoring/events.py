"""Prometheus metrics of the event worker (``interlock worker --metrics-port``).

:class:`WorkerMetrics` is the worker's :class:`~interlock.serving.worker.WorkerObserver`,
wired to it in ``app.py``.

``interlock_worker_lag`` is what an autoscaler (KEDA) scales on: the messages of the
requests topic the group has not acknowledged yet, read every few seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["WorkerMetrics"]


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "interlock_worker_consumed_total", "Events taken from the bus", registry=r
        )
        self.completed = Counter(
            "interlock_worker_completed_total",
            "Completions published, by how they were answered (predicted, recorded)",
            ["source"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "interlock_worker_dead_lettered_total",
            "Events sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.redelivered = Counter(
            "interlock_worker_redelivered_total",
            "Events the bus delivered again (after a consumer died or did not ack)",
            registry=r,
        )
        self.retries = Counter(
            "interlock_worker_retries_total",
            "Predictions tried again after a transient failure",
            registry=r,
        )
        self.in_flight = Gauge(
            "interlock_worker_in_flight", "Events taken and not yet acknowledged", registry=r
        )
        self.lag = Gauge(
            "interlock_worker_lag",
            "Events of the requests topic the group has not acknowledged (for KEDA)",
            registry=r,
        )
        self.latency = Histogram(
            "interlock_worker_latency_seconds",
            "From an event's arrival at the worker to its completion's publication",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

    # -- serving.worker.WorkerObserver ------------------------------------------------

    def events_taken(self, events: int, redelivered: int) -> None:
        self.consumed.inc(events)
        if redelivered:
            self.redelivered.inc(redelivered)

    def events_completed(self, source: str, events: int) -> None:
        self.completed.labels(source).inc(events)

    def event_dead_lettered(self, reason: str) -> None:
        self.dead_lettered.labels(reason).inc()

    def prediction_retried(self) -> None:
        self.retries.inc()

    def in_flight_changed(self, events: int) -> None:
        self.in_flight.set(events)

    def lag_read(self, events: int) -> None:
        self.lag.set(events)

    def batch_answered(self, seconds: float) -> None:
        self.latency.observe(seconds)
