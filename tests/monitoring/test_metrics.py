"""The process-level gauges of :class:`ServingMetrics` (the soak benchmark reads them)."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from interlock.monitoring.metrics import ServingMetrics


def tasks_gauge(metrics: ServingMetrics) -> list[float]:
    text = generate_latest(metrics.registry).decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "interlock_asyncio_tasks"
    ]


async def test_asyncio_tasks_counts_the_loops_tasks_on_the_loop_and_from_a_thread() -> None:
    metrics = ServingMetrics()
    release = asyncio.Event()
    waiting = [asyncio.create_task(release.wait()) for _ in range(3)]
    try:
        expected = len(asyncio.all_tasks())
        assert expected >= 4  # this test's own task and the three waiting
        assert tasks_gauge(metrics) == [expected]  # scraped on the loop (interlock serve)
        # Scraped from another thread (interlock worker's metrics server): the loop the
        # metrics were made on.
        assert await asyncio.to_thread(tasks_gauge, metrics) == [expected]
    finally:
        release.set()
        await asyncio.gather(*waiting)
    assert tasks_gauge(metrics) == [expected - 3]


def test_asyncio_tasks_is_empty_without_a_loop() -> None:
    assert tasks_gauge(ServingMetrics()) == []
