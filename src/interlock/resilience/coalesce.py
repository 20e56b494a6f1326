"""Request coalescing: concurrent calls for the same key share one execution.

:class:`SingleFlight` is Go's ``singleflight.Group`` for asyncio. The first caller for a
key starts ``fn()`` as a task; callers that arrive while it runs wait on that same task
and all get its value, or all get its exception. Nothing is cached: once the task is
done its key is free, and the next caller starts a new execution.

Cancelling one waiter never cancels the shared task: each caller waits on a future of
its own, which the task's done-callback resolves (what :func:`asyncio.shield` does, minus
its overhead), so the others still get their answer. When every waiter has been
cancelled the task runs on to its end: the group keeps a reference to it until then,
retrieves its outcome, and logs the exception nobody is left to receive.

The task runs in a copy of the *first* caller's context (contextvars such as the bound
request id). One event loop per group; no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

_log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Call(Generic[V]):
    """One shared execution and the futures of the callers waiting on it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Future[V]) -> None:
        self.task = task
        self.waiters: list[asyncio.Future[V]] = []


class SingleFlight(Generic[K, V]):
    """Deduplicates concurrent executions by key.

    Example::

        flight: SingleFlight[str, bytes] = SingleFlight()
        body = await flight.do(url, lambda: fetch(url))
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[K, _Call[V]] = {}

    @property
    def in_flight(self) -> int:
        """How many keys have an execution running now."""
        return len(self._calls)

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """``fn()``'s value, from the execution already running for ``key`` or a new one.

        ``fn`` is called only when no execution for ``key`` is running. Its exception is
        raised to every waiter. Cancelling this call cancels only this caller's wait.
        """
        call = self._calls.get(key)
        if call is None:
            task = asyncio.ensure_future(fn())
            call = self._calls[key] = _Call(task)
            task.add_done_callback(lambda _: self._finish(key, call))
        # Cancelling this caller cancels only its own future, never the shared task.
        waiter: asyncio.Future[V] = call.task.get_loop().create_future()
        call.waiters.append(waiter)
        return await waiter

    def _finish(self, key: K, call: _Call[V]) -> None:
        del self._calls[key]
        task = call.task
        waiters = [w for w in call.waiters if not w.done()]  # cancelled ones are done
        if task.cancelled():
            for w in waiters:
                w.cancel()
            return
        exc = task.exception()  # marks it retrieved: no "never retrieved" noise at GC
        if exc is None:
            value = task.result()
            for w in waiters:
                w.set_result(value)
        elif waiters:
            for w in waiters:
                w.set_exception(exc)
        else:
            _log.warning(
                "coalesced call for %r failed after all its waiters were cancelled",
                key,
                exc_info=exc,
            )
