"""The adaptive batcher: grouping, result routing, failures, and staying off the loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from interlock.errors import DeadlineExceededError, OverloadedError, PredictionError
from interlock.runtime.batcher import Batcher
from interlock.runtime.pool import ScalePolicy, ThreadReplicas
from tests.clock import ManualClock


class Gate:
    """A predictor that blocks until released, recording each batch it was given."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.threads: set[int] = set()

    def __call__(self, batch: Any) -> Any:
        self.threads.add(threading.get_ident())
        self.batches.append(len(batch))
        self.entered.set()
        self.release.wait(10)
        return np.asarray(batch, dtype=np.float64)[:, 0] * 2


def make(predict: Any, *, takes_rows: bool = False, threads: int = 1, **kwargs: Any) -> Batcher:
    """A batcher on ``threads`` thread replicas (a fixed pool unless ``scaling`` says so)."""
    kwargs.setdefault("scaling", ScalePolicy(threads, threads))
    return Batcher(ThreadReplicas(predict, takes_rows=takes_rows), **kwargs)


async def _enqueued(batcher: Batcher, rows: int) -> None:
    """Yield to the loop until ``rows`` rows are queued (tasks enqueue on their first step)."""
    for _ in range(1000):
        if batcher.queued_rows >= rows:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {batcher.queued_rows} rows were queued")


async def test_requests_queued_while_busy_are_predicted_together() -> None:
    gate = Gate()
    batcher = make(gate, takes_rows=False, max_batch_size=64, threads=1)
    first = asyncio.create_task(batcher.submit(np.array([[1.0]]), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    rest = [
        asyncio.create_task(batcher.submit(np.array([[float(i)], [float(i) + 0.5]]), 2))
        for i in range(10)
    ]
    await _enqueued(batcher, 20)
    gate.release.set()
    assert await first == [2.0]
    results = await asyncio.gather(*rest)
    assert results == [[2.0 * i, 2.0 * i + 1.0] for i in range(10)]
    assert gate.batches == [1, 20]
    await batcher.aclose()


async def test_an_idle_batcher_never_waits_for_a_batch_to_fill() -> None:
    gate = Gate()
    gate.release.set()
    batcher = make(gate, takes_rows=False, max_batch_size=64, max_wait_s=30.0, threads=1)
    # With a 30 s max wait, an answer at all proves the idle batcher dispatched at once.
    assert await asyncio.wait_for(batcher.submit(np.array([[3.0]]), 1), 10) == [6.0]
    await batcher.aclose()


async def test_batches_never_exceed_the_maximum_size() -> None:
    gate = Gate()
    batcher = make(gate, takes_rows=False, max_batch_size=8, threads=1)
    first = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    rest = [asyncio.create_task(batcher.submit(np.zeros((3, 1)), 3)) for _ in range(6)]
    await _enqueued(batcher, 18)
    gate.release.set()
    await asyncio.gather(first, *rest)
    assert gate.batches == [1, 6, 6, 6]
    await batcher.aclose()


async def test_a_request_larger_than_the_maximum_still_goes_alone() -> None:
    gate = Gate()
    gate.release.set()
    batcher = make(gate, takes_rows=False, max_batch_size=4, threads=1)
    result = await batcher.submit(np.arange(10, dtype=np.float64).reshape(10, 1), 10)
    assert result == [2.0 * i for i in range(10)]
    await batcher.aclose()


async def test_model_work_runs_off_the_event_loop_thread() -> None:
    gate = Gate()
    gate.release.set()
    batcher = make(gate, takes_rows=False, threads=2)
    await asyncio.gather(*(batcher.submit(np.ones((1, 1)), 1) for _ in range(20)))
    assert gate.threads
    assert threading.get_ident() not in gate.threads
    await batcher.aclose()


async def test_a_failing_batch_fails_every_request_in_it_and_the_next_batch_runs() -> None:
    calls = 0

    def flaky(batch: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        return [r["x"] for r in batch]

    batcher = make(flaky, takes_rows=True, threads=1)
    with pytest.raises(PredictionError, match="boom"):
        await batcher.submit([{"x": 1}], 1)
    assert await batcher.submit([{"x": 5}, {"x": 6}], 2) == [5, 6]
    assert batcher.stats.failures == 1
    await batcher.aclose()


async def test_a_wrong_number_of_results_is_an_error_not_a_misrouted_answer() -> None:
    batcher = make(lambda batch: [1], takes_rows=True, threads=1)
    with pytest.raises(PredictionError, match="1 results for 2 rows"):
        await batcher.submit([{"x": 1}, {"x": 2}], 2)
    await batcher.aclose()


async def test_closing_finishes_queued_work_then_refuses_new_work() -> None:
    gate = Gate()
    batcher = make(gate, takes_rows=False, threads=1)
    pending = asyncio.create_task(batcher.submit(np.ones((1, 1)), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    closing = asyncio.create_task(batcher.aclose())
    gate.release.set()
    assert await pending == [2.0]
    await closing
    with pytest.raises(PredictionError, match="unloaded"):
        await batcher.submit(np.ones((1, 1)), 1)


async def test_rows_the_model_rejects_fail_only_the_request_that_sent_them() -> None:
    gate = threading.Event()

    def picky(batch: Any) -> Any:
        gate.wait(10)
        if np.isnan(batch).any():
            raise ValueError("Input X contains NaN")
        return batch[:, 0]

    batcher = make(picky, takes_rows=False, threads=1)
    first = asyncio.create_task(batcher.submit(np.array([[1.0]]), 1))
    await asyncio.sleep(0)
    good = asyncio.create_task(batcher.submit(np.array([[2.0]]), 1))
    bad = asyncio.create_task(batcher.submit(np.array([[np.nan]]), 1))
    also_good = asyncio.create_task(batcher.submit(np.array([[3.0]]), 1))
    await _enqueued(batcher, 3)
    gate.set()
    assert await first == [1.0]
    assert await good == [2.0]
    assert await also_good == [3.0]
    with pytest.raises(PredictionError, match="contains NaN"):
        await bad
    assert batcher.stats.failures == 1
    await batcher.aclose()


async def test_another_thread_starts_only_when_a_full_batch_waits() -> None:
    started = threading.Semaphore(0)
    release = threading.Event()
    sizes: list[int] = []

    def model(batch: Any) -> Any:
        sizes.append(len(batch))
        started.release()
        release.wait(10)
        return batch[:, 0]

    batcher = make(model, takes_rows=False, max_batch_size=4, threads=2)
    first = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    assert await asyncio.to_thread(started.acquire, True, 10)
    small = [asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1)) for _ in range(3)]
    await _enqueued(batcher, 3)
    assert batcher.in_flight == 1  # three rows would not fill a batch: they wait
    small.append(asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1)))
    await asyncio.to_thread(started.acquire, True, 10)  # a full batch went to thread two
    assert batcher.in_flight == 2 and sizes == [1, 4]
    release.set()
    await asyncio.gather(first, *small)
    await batcher.aclose()


async def test_with_max_wait_a_partial_batch_takes_a_free_thread_after_waiting() -> None:
    started = threading.Semaphore(0)
    release = threading.Event()

    def model(batch: Any) -> Any:
        started.release()
        release.wait(10)
        return batch[:, 0]

    batcher = make(model, takes_rows=False, max_batch_size=64, max_wait_s=0.001, threads=2)
    first = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    assert await asyncio.to_thread(started.acquire, True, 10)
    second = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    # The partial batch starts on the second thread once its wait is over.
    assert await asyncio.to_thread(started.acquire, True, 10)
    assert batcher.in_flight == 2
    release.set()
    await asyncio.gather(first, second)
    await batcher.aclose()


async def test_a_full_queue_sheds_at_once_with_a_retry_after_from_the_throughput() -> None:
    gate = Gate()
    clock = ManualClock()
    batcher = make(gate, max_batch_size=4, max_queue_rows=8, clock=clock)
    first = asyncio.create_task(batcher.submit(np.zeros((4, 1)), 4))
    await asyncio.to_thread(gate.entered.wait, 10)
    clock.advance(2.0)  # 4 rows in 2 s: 2 rows/s
    gate.release.set()
    await first
    gate.release.clear()
    gate.entered.clear()
    running = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    queued = [asyncio.create_task(batcher.submit(np.zeros((4, 1)), 4)) for _ in range(2)]
    await _enqueued(batcher, 8)
    with pytest.raises(OverloadedError) as shed:
        await batcher.submit(np.zeros((1, 1)), 1)
    assert shed.value.retry_after_s == pytest.approx(4.0)  # 8 rows queued at 2 rows/s
    assert batcher.queued_rows == 8 and batcher.stats.shed == 1
    gate.release.set()
    await asyncio.gather(running, *queued)
    assert gate.batches == [4, 1, 4, 4]  # the shed row never reached the model
    await batcher.aclose()


async def test_retry_after_stays_within_bounds() -> None:
    gate = Gate()
    batcher = make(gate, max_batch_size=64, max_queue_rows=2)
    running = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    queued = asyncio.create_task(batcher.submit(np.zeros((2, 1)), 2))
    await _enqueued(batcher, 2)
    with pytest.raises(OverloadedError) as shed:
        await batcher.submit(np.zeros((1, 1)), 1)
    assert shed.value.retry_after_s == 5.0  # nothing measured yet: the upper bound
    gate.release.set()
    await asyncio.gather(running, queued)
    await batcher.aclose()


async def test_a_request_larger_than_the_queue_bound_is_taken_when_nothing_waits() -> None:
    gate = Gate()
    gate.release.set()
    batcher = make(gate, max_queue_rows=2)
    assert await batcher.submit(np.ones((3, 1)), 3) == [2.0, 2.0, 2.0]
    await batcher.aclose()


async def test_a_request_whose_deadline_passes_while_queued_never_reaches_the_model() -> None:
    gate = Gate()
    seen: list[float] = []

    def model(batch: Any) -> Any:
        seen.extend(batch[:, 0].tolist())
        return gate(batch)

    batcher = make(model, max_batch_size=64)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(batcher.submit(np.array([[1.0]]), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    late = asyncio.create_task(batcher.submit(np.array([[2.0]]), 1, loop.time() + 0.01))
    other = asyncio.create_task(batcher.submit(np.array([[3.0]]), 1, loop.time() + 60))
    with pytest.raises(DeadlineExceededError, match="queued"):
        await late  # failed by the deadline timer while the first batch still runs
    assert batcher.queued_rows == 1 and not gate.release.is_set()
    gate.release.set()
    assert await first == [2.0]
    assert await other == [6.0]
    assert seen == [1.0, 3.0]
    assert batcher.stats.expired == 1
    await batcher.aclose()


async def test_a_deadline_already_passed_is_refused_before_queueing() -> None:
    gate = Gate()
    batcher = make(gate)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceededError):
        await batcher.submit(np.ones((1, 1)), 1, loop.time() - 1)
    assert gate.batches == [] and batcher.idle()
    await batcher.aclose()


async def test_waiting_stops_at_the_deadline_while_the_batch_runs() -> None:
    gate = Gate()
    batcher = make(gate)
    loop = asyncio.get_running_loop()
    slow = asyncio.create_task(batcher.submit(np.ones((1, 1)), 1, loop.time() + 0.02))
    patient = asyncio.create_task(batcher.submit(np.ones((1, 1)), 1))
    await asyncio.to_thread(gate.entered.wait, 10)
    with pytest.raises(DeadlineExceededError, match="batch ran"):
        await slow
    assert batcher.busy == 1 and not patient.done()  # the model still runs; no one else fails
    gate.release.set()
    assert await patient == [2.0]  # the late result of ``slow`` was dropped
    await batcher.drain()
    assert batcher.stats.expired == 1 and batcher.stats.failures == 0
    await batcher.aclose()


async def test_the_pool_grows_under_a_burst_and_shrinks_after_it() -> None:
    started = threading.Semaphore(0)
    release = threading.Event()

    def model(batch: Any) -> Any:
        started.release()
        release.wait(10)
        return batch[:, 0]

    clock = ManualClock()
    policy = ScalePolicy(min_replicas=1, max_replicas=3, target_queue_delay_s=1.0, cooldown_s=10)
    batcher = make(model, max_batch_size=4, scaling=policy, clock=clock)
    await batcher.start()
    assert batcher.replicas == 1
    tasks = [asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))]
    assert await asyncio.to_thread(started.acquire, True, 10)

    async def burst(rows: int) -> None:
        tasks.extend(asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1)) for _ in range(rows))
        await _enqueued(batcher, rows)

    await burst(4)  # a full batch waits with every replica busy: one more replica
    assert await asyncio.to_thread(started.acquire, True, 10)  # and the batch took it
    assert batcher.replicas == 2 and batcher.busy == 2
    await burst(4)
    assert batcher.replicas == 2  # within the cooldown: no second step
    clock.advance(10)
    batcher.rescale()
    assert await asyncio.to_thread(started.acquire, True, 10)
    assert batcher.replicas == 3 and batcher.busy == 3
    await burst(4)
    clock.advance(10)
    batcher.rescale()
    assert batcher.replicas == 3  # the maximum
    release.set()
    await asyncio.gather(*tasks)
    assert batcher.idle()

    clock.advance(5)
    batcher.rescale()
    assert batcher.replicas == 3  # idle for less than a cooldown
    clock.advance(5)
    batcher.rescale()
    assert batcher.replicas == 2
    batcher.rescale()
    assert batcher.replicas == 2  # one step per cooldown
    clock.advance(10)
    batcher.rescale()
    assert batcher.replicas == 1
    clock.advance(10)
    batcher.rescale()
    assert batcher.replicas == 1  # the minimum
    assert await batcher.submit(np.ones((1, 1)), 1) == [1.0]
    await batcher.aclose()
