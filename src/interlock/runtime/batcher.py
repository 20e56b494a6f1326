"""Adaptive micro-batching: concurrent requests for one model version predicted together.

The batcher is greedy. An idle model never waits: the first request goes at once. While
a batch runs, requests queue and the next batch takes everything queued, up to
``max_batch_size`` rows. Another replica starts a batch only when a full batch waits:
light traffic stays on one replica in larger batches, heavy traffic spreads over all.
With ``max_wait_s`` above zero, a partial batch waits at most that long for a free one.
Batches run on a pool of replicas (:mod:`interlock.runtime.pool`), which also turns the
results into Python values. When a batch of several requests fails, each is retried on
its own: only the request whose rows the model rejects fails.

A request whose rows would take the queue over ``max_queue_rows`` is refused at once
(OverloadedError, ``retry_after_s``: queued rows over recent throughput, in [0.05, 5] s;
a request over the bound alone goes when nothing waits). A request past its
``loop.time()`` deadline fails with DeadlineExceededError and never reaches the model:
checked when a batch is assembled, and by one timer armed for the earliest deadline. A
running batch cannot be stopped, but its callers stop waiting at their deadline. An
:class:`~interlock.runtime.pool.Autoscaler` sizes the pool from the queueing delay
(enqueue to start of each batch's oldest request, EWMA) and whether a full batch waits.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from interlock._core.clock import Clock, SystemClock
from interlock.errors import (
    DeadlineExceededError,
    OverloadedError,
    PredictionError,
    RuntimeLoadError,
)
from interlock.runtime.pool import Autoscaler, Replicas, ScalePolicy

__all__ = ["BatchStats", "Batcher"]

log = logging.getLogger("interlock.runtime")

_ALPHA = 0.2  # weight of the newest sample in the moving averages
_EARLY_S = 1e-6  # a loop timer may fire this much early; the deadline counts as passed
_RETRY_AFTER_MIN_S = 0.05
_RETRY_AFTER_MAX_S = 5.0


@dataclass(slots=True, eq=False)
class _Pending:
    batch: Any  # a float64 matrix [rows, features] or a list of row dicts
    rows: int
    future: asyncio.Future[list[Any]]
    deadline: float  # loop.time(); inf when none
    enqueued: float  # clock.monotonic()
    alone: bool = False  # retried on its own after its batch failed


@dataclass(slots=True, eq=False)
class _Running:
    taken: list[_Pending]
    rows: int
    started: float  # clock.monotonic()


@dataclass(slots=True)
class BatchStats:
    """Counters a metrics collector reads at scrape time."""

    batches: int = 0
    rows: int = 0
    failures: int = 0
    shed: int = 0  # requests refused because the queue was full
    expired: int = 0  # requests failed at their deadline


class Batcher:
    """Queues requests for one model version and runs them in batches on a replica pool.

    ``start()`` brings up ``scaling.min_replicas`` (the first ``submit`` does it too).
    ``clock`` times the queueing delay, the throughput and the autoscaler's cooldowns.
    """

    def __init__(
        self,
        replicas: Replicas,
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.0,
        max_queue_rows: int | None = None,
        scaling: ScalePolicy | None = None,
        clock: Clock | None = None,
        name: str = "model",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._pool = replicas
        self._max_rows = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue_rows = math.inf if max_queue_rows is None else max_queue_rows
        self._policy = scaling or ScalePolicy()
        self._now = time.monotonic if clock is None else clock.monotonic  # hot: no detour
        self._scaler = Autoscaler(self._policy, clock or SystemClock())
        self._scalable = self._policy.min_replicas < self._policy.max_replicas
        self._tick_s = min(max(self._policy.cooldown_s / 4, 0.05), 1.0)
        self._max_replicas = self._policy.max_replicas
        self._target_delay_s = self._policy.target_queue_delay_s
        self._name = name
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._in_flight = 0
        self._running: set[_Running] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = math.inf
        self._delay_s = 0.0
        self._rate = 0.0  # rows/s of one replica
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = BatchStats()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a replica."""
        return self._queued_rows

    @property
    def busy(self) -> int:
        """Replicas running a batch now."""
        return self._in_flight

    in_flight = busy  # the older name, read by app.py

    @property
    def replicas(self) -> int:
        """Replicas ready to take a batch (idle or busy); starting ones are not counted."""
        return self._pool.replicas

    @property
    def queue_delay_s(self) -> float:
        """Time from enqueue to batch start of each batch's oldest request (EWMA)."""
        return self._delay_s

    def idle(self) -> bool:
        """Nothing queued, nothing running."""
        return not self._queue and self._in_flight == 0

    def retry_after_s(self) -> float:
        """When a refused client may try again: queued rows over recent throughput."""
        rate = self._rate * max(self._pool.replicas, 1)
        estimate = self._queued_rows / rate if rate > 0 else _RETRY_AFTER_MAX_S
        return min(max(estimate, _RETRY_AFTER_MIN_S), _RETRY_AFTER_MAX_S)

    async def start(self) -> None:
        """Start ``min_replicas`` and wait until they are ready; RuntimeLoadError if one fails."""
        self._open(asyncio.get_running_loop())
        try:
            await self._pool.wait_ready(self._policy.min_replicas)
        except RuntimeLoadError:
            self._closed = True
            await self._pool.aclose()
            raise

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        self._pool.open(loop, self._dispatch)
        for _ in range(self._policy.min_replicas):
            self._pool.grow()

    async def submit(self, batch: Any, rows: int, deadline: float | None = None) -> list[Any]:
        """One result per row of ``batch`` (a matrix or row dicts), by ``deadline`` (loop time)."""
        if self._closed:
            raise PredictionError("the model is being unloaded")
        queued = self._queued_rows
        if queued + rows > self._max_queue_rows and queued:
            self.stats.shed += 1
            raise OverloadedError(
                f"{self._name} has {queued} rows queued", retry_after_s=self.retry_after_s()
            )
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
            self._open(loop)
        if deadline is None:
            deadline = math.inf
        elif deadline < self._deadline_at:
            if deadline <= loop.time():
                self.stats.expired += 1
                raise DeadlineExceededError("the deadline passed before the request was queued")
            self._arm_deadline(loop, deadline)
        item = _Pending(batch, rows, loop.create_future(), deadline, self._now())
        self._queue.append(item)
        self._queued_rows += rows
        self._idle.clear()
        self._dispatch()
        return await item.future

    # -- dispatch -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        pool = self._pool
        while self._queue and self._in_flight < pool.replicas:
            if self._in_flight > 0 and self._queued_rows < self._max_rows:
                # What waits would not fill a batch: let it grow until a replica frees up.
                if self._max_wait_s > 0 and self._timer is None and self._loop is not None:
                    self._timer = self._loop.call_later(self._max_wait_s, self._on_timer)
                return
            self._start_batch()
        if self._scalable and self._queue:
            if self._queued_rows >= self._max_rows and self._pool.replicas < self._max_replicas:
                self.rescale()  # a full batch waits for a replica
            elif self._tick is None:
                self._arm_tick()

    def _on_timer(self) -> None:
        self._timer = None
        if self._queue and self._in_flight < self._pool.replicas:
            self._start_batch()
        self._dispatch()

    def _start_batch(self) -> None:
        queue, loop = self._queue, self._loop
        now = loop.time() if loop is not None else 0.0
        taken: list[_Pending] = []
        rows = 0
        while queue:
            head = queue[0]
            if head.future.done() or head.deadline <= now:
                # Its caller gave up, or its deadline passed while it waited.
                queue.popleft()
                self._queued_rows -= head.rows
                self._expire(head, "queued")
                continue
            if taken and (head.alone or taken[0].alone or rows + head.rows > self._max_rows):
                break
            queue.popleft()
            taken.append(head)
            rows += head.rows
        if not taken:
            if self.idle():
                self._idle.set()
            return
        self._queued_rows -= rows
        self._in_flight += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        started = self._now()
        self._delay_s += _ALPHA * (started - taken[0].enqueued - self._delay_s)
        running = _Running(taken, rows, started)
        self._running.add(running)
        if self._scalable and self._in_flight >= self._pool.replicas:
            self._scaler.saturated(started)
            if self._delay_s > self._target_delay_s and self._pool.replicas < self._max_replicas:
                self.rescale()
        self._pool.run([p.batch for p in taken], functools.partial(self._finish, running))

    def _finish(
        self, running: _Running, values: list[Any] | None, exc: BaseException | None
    ) -> None:
        self._running.discard(running)
        taken, rows = running.taken, running.rows
        finished = self._now()
        if self._scalable and self._in_flight >= self._pool.replicas:
            self._scaler.saturated(finished)
        self._in_flight -= 1
        if finished > running.started:
            rate = rows / (finished - running.started)
            self._rate = rate if self._rate == 0 else self._rate + _ALPHA * (rate - self._rate)
        self.stats.batches += 1
        self.stats.rows += rows
        if self._on_batch is not None:
            self._on_batch(rows)
        if exc is None and values is not None and len(values) != rows:
            exc = PredictionError(f"the model returned {len(values)} results for {rows} rows")
        if exc is not None:
            live = [item for item in taken if not item.future.done()]
            if len(live) > 1:
                # Retry each on its own, ahead of the queue: only the culprit should fail.
                for item in reversed(live):
                    item.alone = True
                    self._queue.appendleft(item)
                    self._queued_rows += item.rows
            else:
                self.stats.failures += 1
                error = exc if isinstance(exc, PredictionError) else PredictionError(str(exc))
                error.__cause__ = exc if error is not exc else None
                for item in live:
                    item.future.set_exception(error)
        elif values is not None:
            start = 0
            for item in taken:
                if not item.future.done():
                    item.future.set_result(values[start : start + item.rows])
                start += item.rows
        self._dispatch()
        if self.idle():
            self._idle.set()

    # -- deadlines ------------------------------------------------------------------------

    def _arm_deadline(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_at = when
        self._deadline_timer = loop.call_at(when, self._on_deadline)

    def _expire(self, item: _Pending, where: str) -> None:
        if not item.future.done():
            self.stats.expired += 1
            message = f"the deadline passed while {where} ({self._name})"
            item.future.set_exception(DeadlineExceededError(message))

    def _on_deadline(self) -> None:
        """Fail what has passed its deadline, then re-arm for the earliest one left."""
        self._deadline_timer = None
        self._deadline_at = math.inf
        loop = self._loop
        if loop is None:
            return
        now = loop.time() + _EARLY_S
        if any(item.deadline <= now for item in self._queue):
            expired = [item for item in self._queue if item.deadline <= now]
            self._queue = collections.deque(item for item in self._queue if item.deadline > now)
            self._queued_rows = sum(item.rows for item in self._queue)
            for item in expired:
                self._expire(item, "queued")
        for item in (item for running in self._running for item in running.taken):
            if item.deadline <= now:
                self._expire(item, "its batch ran")
        running = (item for r in self._running for item in r.taken if not item.future.done())
        earliest = min((item.deadline for item in (*self._queue, *running)), default=math.inf)
        if earliest < math.inf:
            self._arm_deadline(loop, earliest)
        if self.idle():
            self._idle.set()

    # -- scaling ----------------------------------------------------------------------------

    def rescale(self) -> int:
        """Ask the autoscaler and apply its answer: +1 (grown), -1 (shrunk) or 0.

        Also asked when a batch starts with every replica busy, when a full batch waits,
        and each quarter cooldown (at most 1 s) while the pool may change.
        """
        pool, step = self._pool, 0
        if self._closed or self._loop is None:
            return 0
        delay_s = self._delay_s
        if self._queue:  # a head that waits long counts before its batch starts
            delay_s = max(delay_s, self._now() - self._queue[0].enqueued)
        if pool.starting == 0:  # judge a replica once it serves
            step = self._scaler.decide(
                replicas=pool.replicas,
                busy=self._in_flight,
                queue_delay_s=delay_s,
                full_batch=self._queued_rows >= self._max_rows,
            )
        if step > 0:
            pool.grow()
        elif step < 0 and not pool.shrink():
            step = 0
        if step:
            log.info("replicas scaled", extra={"batcher": self._name, "step": step})
        self._arm_tick()
        return step

    def _arm_tick(self) -> None:
        pool, loop = self._pool, self._loop
        if self._tick is not None or not self._scalable or self._closed or loop is None:
            return
        if self._queue or pool.replicas + pool.starting > self._policy.min_replicas:
            self._tick = loop.call_later(self._tick_s, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self.rescale()

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Stop taking work, finish what is queued, then retire the replicas."""
        self._closed = True
        await self.drain()
        for timer in (self._timer, self._tick, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        await self._pool.aclose()
