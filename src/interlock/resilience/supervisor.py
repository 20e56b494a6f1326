"""Long-lived background loops that outlive their own failures.

Every loop a process runs for as long as it lives (the traffic refresher, the alias
refresher, the usage writer…) runs under a :class:`Supervisor` as a *step* called
again and again, each call optionally ``every_s`` seconds after the previous one ended.
A step that raises does not end its loop:

- the first failure of a streak is logged once, with its traceback, on the
  ``interlock.resilience`` logger; the retries that fail again are only counted (a
  debug line each), and the first success after them logs the recovery. A loop that
  recovers and then fails anew is logged again;
- every failed step is reported to the observer (``loop_failed``), which app.py turns
  into the ``interlock_background_loop_failures_total{loop}`` counter;
- the next try waits a capped exponential backoff with jitter: a uniform draw in
  ``[d/2, d]`` where ``d = min(max_backoff_s, base · 2^(n-1))`` after the n-th failure
  in a row, ``base`` being the loop's ``every_s`` (or ``backoff_s`` when given);
- while a loop's last step failed, :meth:`Supervisor.failing` names it, and the
  process reports not ready (``/v2/health/ready``) until a step succeeds again.

``CancelledError`` is never caught: stopping a loop cancels its task, and a loop
cancelled is a loop stopped. A loop whose task ends any other way (a ``BaseException``
such as ``SystemExit``) counts as failing, so a dead loop never passes for a healthy
one. The supervisor keeps a reference to every task it started. Waiting goes through
an injected ``sleep`` and jitter through an injected ``random.Random``, so tests need
no wall time.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LoopObserver", "LoopStatus", "Supervised", "Supervisor"]

log = logging.getLogger("interlock.resilience")

Step = Callable[[], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


class LoopObserver(Protocol):
    """What the supervisor reports, for metrics."""

    def loop_failed(self, loop: str) -> None:
        """A step of ``loop`` raised (called once per failed step)."""
        ...

    def loop_recovered(self, loop: str) -> None:
        """A step of ``loop`` succeeded after one or more failed ones."""
        ...


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """One loop as its supervisor sees it now."""

    name: str
    failing: bool
    failures: int  # failed steps since the loop started
    in_a_row: int  # failed steps since the last success
    error: str | None  # the last failure, one line; None once recovered


class Supervised:
    """One supervised loop: its task, its state, and how to stop it."""

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        step: Step,
        every_s: float | None,
        backoff_s: float,
    ) -> None:
        self.name = name
        self._supervisor = supervisor
        self._step = step
        self._every_s = every_s
        self._backoff_s = backoff_s
        self.failures = 0
        self.in_a_row = 0
        self.error: str | None = None
        self.stopping = False
        self.task: asyncio.Task[None] = asyncio.create_task(self._run(), name=name)
        self.task.add_done_callback(self._ended)

    @property
    def failing(self) -> bool:
        return self.in_a_row > 0

    def status(self) -> LoopStatus:
        return LoopStatus(self.name, self.failing, self.failures, self.in_a_row, self.error)

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end; a no-op when it already has."""
        self.stopping = True
        self.task.cancel()
        await asyncio.wait([self.task])  # its outcome was taken by _ended, or is the cancel
        self._supervisor._forget(self)

    async def _run(self) -> None:
        sup = self._supervisor
        wait_s = self._every_s
        while True:
            if wait_s is not None:
                await sup.sleep(wait_s)
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait_s = self._failed(exc)
            else:
                if self.in_a_row:
                    self._recovered()
                wait_s = self._every_s

    def _failed(self, exc: Exception) -> float:
        """Count, report and maybe log a failed step; the backoff before the next."""
        self.failures += 1
        self.in_a_row += 1
        self.error = _one_line(exc)
        delay = self._supervisor.backoff(self._backoff_s, self.in_a_row)
        if self.in_a_row == 1:
            log.error(
                "background loop %r failed; it goes on, retrying with backoff",
                self.name,
                exc_info=exc,
                extra={"loop": self.name, "error": self.error, "retry_in_s": round(delay, 3)},
            )
        else:
            log.debug(
                "background loop %r failed again (%d in a row): %s",
                self.name,
                self.in_a_row,
                self.error,
                extra={"loop": self.name, "retry_in_s": round(delay, 3)},
            )
        observer = self._supervisor.observer
        if observer is not None:
            observer.loop_failed(self.name)
        return delay

    def _recovered(self) -> None:
        log.info(
            "background loop %r recovered after %d failed attempts",
            self.name,
            self.in_a_row,
            extra={"loop": self.name, "failed_attempts": self.in_a_row},
        )
        self.in_a_row = 0
        self.error = None
        observer = self._supervisor.observer
        if observer is not None:
            observer.loop_recovered(self.name)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self.stopping:
            return
        if task.cancelled():  # cancelled from outside stop(): stopped all the same
            self._supervisor._forget(self)
            return
        # Only a BaseException that is not an Exception gets here: the loop is dead.
        exc = task.exception()
        self.in_a_row = max(self.in_a_row, 1)
        self.error = "the loop ended" + (f": {_one_line(exc)}" if exc is not None else "")
        log.error(
            "background loop %r ended; it is no longer running",
            self.name,
            exc_info=exc,
            extra={"loop": self.name},
        )


class Supervisor:
    """Runs background loops that survive their failures; one per process.

    ``observer`` hears of every failed step and every recovery. ``sleep`` waits
    (``asyncio.sleep`` unless a test passes its own); ``rng`` draws the jitter.
    """

    def __init__(
        self,
        *,
        observer: LoopObserver | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.observer = observer
        self.sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._max_backoff_s = max_backoff_s
        self._loops: dict[str, Supervised] = {}

    def spawn(
        self,
        name: str,
        step: Step,
        *,
        every_s: float | None = None,
        backoff_s: float | None = None,
    ) -> Supervised:
        """Start calling ``step`` in a loop, ``every_s`` seconds apart (None: back to back).

        ``step`` does one iteration (it may wait inside, e.g. for an event). The first
        backoff is ``backoff_s``, else ``every_s``, else half a second. Needs a running
        event loop. Raises ValueError when a loop of that name is running.
        """
        current = self._loops.get(name)
        if current is not None and not current.task.done():
            raise ValueError(f"a background loop named {name!r} is already running")
        base = backoff_s if backoff_s is not None else every_s
        loop = Supervised(self, name, step, every_s, base if base else DEFAULT_BACKOFF_S)
        self._loops[name] = loop
        return loop

    def backoff(self, base_s: float, in_a_row: int) -> float:
        """The wait after the ``in_a_row``-th failure in a row: capped, with jitter."""
        ceiling = min(self._max_backoff_s, base_s * 2.0 ** min(in_a_row - 1, 62))
        return ceiling * (0.5 + 0.5 * self._rng.random())

    def status(self) -> list[LoopStatus]:
        """Every loop started and not stopped, by name."""
        return [self._loops[name].status() for name in sorted(self._loops)]

    def failing(self) -> list[str]:
        """The loops whose last step failed (or that ended), by name; empty when all run."""
        return [name for name in sorted(self._loops) if self._loops[name].failing]

    def _forget(self, loop: Supervised) -> None:
        if self._loops.get(loop.name) is loop:
            del self._loops[loop.name]

    async def aclose(self) -> None:
        """Stop every loop still running."""
        for loop in list(self._loops.values()):
            await loop.stop()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
