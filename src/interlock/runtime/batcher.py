"""Adaptive micro-batching: concurrent requests for one model version predicted together.

The batcher is greedy. An idle model never waits: the first request goes at once. While
a batch runs, requests queue and the next batch takes everything queued, up to
``max_batch_size`` rows, so batches grow with load by themselves. A second (third, …)
thread starts a batch only when a full batch is waiting: light traffic stays on one
thread in larger batches, heavy traffic spreads over all of them. With ``max_wait_s``
above zero, a partial batch waits at most that long before it takes a free thread.

Model work runs in the batcher's own threads, never on the event loop. Results are
turned into Python values inside those threads too, so the loop only hands slices back.
When a batch of several requests fails, each is retried on its own: one client's rows
that the model rejects never fail the other requests batched with them.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from interlock.errors import PredictionError

__all__ = ["BatchStats", "Batcher"]

PredictFn = Callable[[Any], Any]


@dataclass(slots=True)
class _Pending:
    batch: Any  # a float64 matrix [rows, features] or a list of row dicts
    rows: int
    future: asyncio.Future[list[Any]]
    alone: bool = False  # retried on its own after its batch failed


@dataclass(slots=True)
class BatchStats:
    """Counters a metrics collector reads at scrape time."""

    batches: int = 0
    rows: int = 0
    failures: int = 0


class Batcher:
    """Queues requests for one predictor and runs them in batches on worker threads."""

    def __init__(
        self,
        predict: PredictFn,
        *,
        takes_rows: bool,
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        threads: int = 1,
        name: str = "model",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._predict = predict
        self._takes_rows = takes_rows
        self._max_rows = max_batch_size
        self._max_wait_s = max_wait_s
        self._threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"interlock-{name}")
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._on_batch = on_batch
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = BatchStats()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a thread."""
        return self._queued_rows

    @property
    def in_flight(self) -> int:
        """Batches running now."""
        return self._in_flight

    def idle(self) -> bool:
        return not self._queue and self._in_flight == 0

    async def submit(self, batch: Any, rows: int) -> list[Any]:
        """Predict ``rows`` rows (a matrix or a list of dicts); one result per row."""
        if self._closed:
            raise PredictionError("the model is being unloaded")
        loop = asyncio.get_running_loop()
        item = _Pending(batch, rows, loop.create_future())
        self._queue.append(item)
        self._queued_rows += rows
        self._idle.clear()
        self._dispatch(loop)
        return await item.future

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._queue and self._in_flight < self._threads:
            if self._in_flight > 0 and self._queued_rows < self._max_rows:
                # A batch is running and what waits would not fill another: let it grow
                # until a thread frees up (or, with max_wait, until it has waited enough).
                if self._max_wait_s > 0 and self._timer is None:
                    self._timer = loop.call_later(self._max_wait_s, self._on_timer, loop)
                return
            self._start_batch(loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._queue and self._in_flight < self._threads:
            self._start_batch(loop)
        self._dispatch(loop)

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        taken: list[_Pending] = [self._queue.popleft()]
        rows = taken[0].rows
        while (
            not taken[0].alone
            and self._queue
            and not self._queue[0].alone
            and rows + self._queue[0].rows <= self._max_rows
        ):
            item = self._queue.popleft()
            taken.append(item)
            rows += item.rows
        self._queued_rows -= rows
        self._in_flight += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cf = self._executor.submit(self._run, [p.batch for p in taken])
        cf.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._finish, loop, taken, rows, done)
        )

    def _run(self, batches: Sequence[Any]) -> list[Any]:
        """In a worker thread: join the batches, predict, return plain Python values."""
        if self._takes_rows:
            joined: Any = [row for batch in batches for row in batch]
        elif len(batches) == 1:
            joined = batches[0]
        else:
            joined = np.concatenate(batches)
        result = self._predict(joined)
        return result.tolist() if isinstance(result, np.ndarray) else list(result)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        taken: list[_Pending],
        rows: int,
        done: Future[list[Any]],
    ) -> None:
        self._in_flight -= 1
        self.stats.batches += 1
        self.stats.rows += rows
        if self._on_batch is not None:
            self._on_batch(rows)
        exc = done.exception()
        if exc is None:
            values = done.result()
            if len(values) != rows:
                exc = PredictionError(f"the model returned {len(values)} results for {rows} rows")
        if exc is not None and len(taken) > 1:
            # One request's rows may be what the model choked on: retry each on its own,
            # ahead of the queue, so that only the culprit fails.
            for item in reversed(taken):
                item.alone = True
                self._queue.appendleft(item)
                self._queued_rows += item.rows
        elif exc is not None:
            self.stats.failures += 1
            error = exc if isinstance(exc, PredictionError) else PredictionError(str(exc))
            error.__cause__ = exc if error is not exc else None
            for item in taken:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            start = 0
            for item in taken:
                if not item.future.done():
                    item.future.set_result(values[start : start + item.rows])
                start += item.rows
        self._dispatch(loop)
        if self.idle():
            self._idle.set()

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Stop taking work, finish what is queued, release the threads."""
        self._closed = True
        await self.drain()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
