"""Request coalescing: concurrent calls for the same key share one execution.

:class:`SingleFlight` is Go's ``singleflight.Group`` for asyncio, shaped for a hot path.
The first caller for a key (the *leader*) awaits its own ``work`` inline, in its own task
and context: no task is created, and no future either unless another caller joins. Callers
that arrive while it runs (*followers*) each wait on a future of their own, and get the
leader's value, or its exception. Nothing is cached: once the leader is done its key is
free, and the next caller leads a new execution.

Cancellation, the one rule:

- **A cancelled follower** stops waiting; the leader and the other followers go on as if
  it had never come.
- **A cancelled leader** does not fail or cancel its followers: the work is handed over.
  The first follower still waiting awaits its own ``work`` as the new leader, and the
  others wait on it. With no follower left, the work simply stops (nobody wants it any more).

The same goes for any other :class:`BaseException` that is not an :class:`Exception`
(``KeyboardInterrupt``): it ends the leader, never its followers. An ordinary exception
is the answer: the leader raises it and every follower gets the same object.

``do`` returns what *some* caller's ``work`` returned; a caller that must know whether it
ran the work itself has ``work`` return something of its own (the gateway returns its call's
``CallInfo`` and compares identities). One event loop per group; no lock is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _HandOver:
    """What followers receive when their leader was cancelled: one of them leads now."""

    __slots__ = ()


_HAND_OVER = _HandOver()


class SingleFlight(Generic[K, V]):
    """Deduplicates concurrent executions by key.

    Example::

        flight: SingleFlight[str, bytes] = SingleFlight()
        body = await flight.do(url, fetch(url))
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        # key -> the followers' futures; None while nobody has joined (the hot path).
        self._calls: dict[K, list[asyncio.Future[V | _HandOver]] | None] = {}

    @property
    def in_flight(self) -> int:
        """How many keys have an execution running now."""
        return len(self._calls)

    @property
    def followers(self) -> int:
        """How many callers wait now on an execution another caller runs (O(keys): for
        diagnostics and tests, not the hot path)."""
        return sum(
            sum(1 for w in waiters if not w.done()) for waiters in self._calls.values() if waiters
        )

    async def do(self, key: K, work: Coroutine[Any, Any, V]) -> V:
        """``work``'s value, or the value of the execution already running for ``key``.

        ``work`` is an unstarted coroutine (``fetch(url)``, not ``fetch``): passing it,
        rather than a function and its arguments, costs the leader nothing over awaiting
        it directly. It is awaited when this call leads (no execution running for ``key``,
        or the one it waited on was cancelled and this call is the first to take over);
        otherwise it is closed unstarted.
        """
        calls = self._calls
        try:
            while key in calls:
                waiters = calls[key]
                if waiters is None:
                    waiters = calls[key] = []
                waiter: asyncio.Future[V | _HandOver] = asyncio.get_running_loop().create_future()
                waiters.append(waiter)
                # Cancelling this caller cancels only its own future: the leader never sees it.
                value = await waiter
                if not isinstance(value, _HandOver):
                    work.close()
                    return value
                # The leader was cancelled: lead if nobody has yet (the loop), else join.
        except BaseException:
            work.close()
            raise
        calls[key] = None
        try:
            value = await work
        except Exception as exc:
            for w in _pending(calls.pop(key, None)):
                w.set_exception(exc)
                w.exception()  # retrieved even if that follower is cancelled meanwhile
            raise
        except BaseException:
            for w in _pending(calls.pop(key, None)):
                w.set_result(_HAND_OVER)
            raise
        joined = calls.pop(key, None)
        if joined:
            for w in _pending(joined):
                w.set_result(value)
        return value


def _pending(
    waiters: list[asyncio.Future[V | _HandOver]] | None,
) -> list[asyncio.Future[V | _HandOver]]:
    if not waiters:
        return []
    return [w for w in waiters if not w.done()]  # a cancelled follower's future is done
