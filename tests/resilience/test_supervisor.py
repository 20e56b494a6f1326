"""The supervisor of background loops, driven by scripted steps and a recording sleep.

The sleep records what it was asked to wait and which loops were failing at that moment,
then yields once: no wall time passes. Failures are counted by the real ServingMetrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque

import pytest

from interlock.monitoring.metrics import ServingMetrics
from interlock.resilience.supervisor import LoopStatus, Supervisor


class BoomError(Exception):
    pass


class FatalError(BaseException):
    """Not an Exception: a loop that meets it is dead."""


class Script:
    """A step that raises or returns as told, then parks (and says so) when out of lines."""

    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = deque(outcomes)
        self.calls = 0
        self.parked = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        if not self.outcomes:
            self.parked.set()
            await asyncio.Event().wait()
        outcome = self.outcomes.popleft()
        if outcome is not None:
            raise outcome


class Recorder:
    """A sleep that records (seconds, failing loops) and lets the loop go on at once."""

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        self.waits: list[tuple[float, tuple[str, ...]]] = []

    async def __call__(self, seconds: float) -> None:
        assert self.supervisor is not None
        self.waits.append((seconds, tuple(self.supervisor.failing())))
        await asyncio.sleep(0)


def make(metrics: ServingMetrics | None = None, **kwargs: object) -> tuple[Supervisor, Recorder]:
    sleep = Recorder()
    supervisor = Supervisor(observer=metrics, sleep=sleep, rng=random.Random(7), **kwargs)  # type: ignore[arg-type]
    sleep.supervisor = supervisor
    return supervisor, sleep


def failures(metrics: ServingMetrics, loop: str) -> float:
    value = metrics.registry.get_sample_value(
        "interlock_background_loop_failures_total", {"loop": loop}
    )
    return value or 0.0


async def within(event: asyncio.Event) -> None:
    async with asyncio.timeout(10):
        await event.wait()


async def test_a_failing_loop_is_logged_once_counted_backed_off_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ServingMetrics()
    supervisor, sleep = make(metrics, max_backoff_s=3.0)
    step = Script(
        BoomError("one"), BoomError("two"), BoomError("three"), None, BoomError("four"), None
    )
    with caplog.at_level(logging.DEBUG, logger="interlock.resilience"):
        loop = supervisor.spawn("refresh", step, every_s=1.0)
        await within(step.parked)
    assert step.calls == 7
    waits = sleep.waits
    failing = ("refresh",)
    assert [w[1] for w in waits] == [(), failing, failing, failing, (), failing, ()]
    assert [w[0] for w in waits if not w[1]] == [1.0, 1.0, 1.0]  # the interval when healthy
    backoffs = [w[0] for w in waits if w[1]]
    for seconds, ceiling in zip(backoffs, (1.0, 2.0, 3.0, 1.0), strict=True):
        assert ceiling / 2 <= seconds <= ceiling  # capped exponential, jittered
    assert len(set(backoffs)) == 4

    errors = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [(r.levelname, r.getMessage()) for r in errors] == [
        ("ERROR", "background loop 'refresh' failed; it goes on, retrying with backoff"),
        ("INFO", "background loop 'refresh' recovered after 3 failed attempts"),
        ("ERROR", "background loop 'refresh' failed; it goes on, retrying with backoff"),
        ("INFO", "background loop 'refresh' recovered after 1 failed attempts"),
    ]
    assert errors[0].exc_info is not None and errors[0].exc_info[1] is not None
    assert str(errors[0].exc_info[1]) == "one"
    assert errors[2].exc_info is not None and str(errors[2].exc_info[1]) == "four"
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(retries) == 2 and "failed again (3 in a row): BoomError: three" in retries[1]

    assert failures(metrics, "refresh") == 4
    sample = {"loop": "refresh"}
    assert metrics.registry.get_sample_value("interlock_background_loop_failing", sample) == 0
    assert supervisor.status() == [LoopStatus("refresh", False, 4, 0, None)]
    assert supervisor.failing() == []
    await loop.stop()
    assert loop.task.cancelled()
    assert supervisor.status() == []


async def test_the_status_names_the_failing_loop_and_its_last_error() -> None:
    metrics = ServingMetrics()
    supervisor, _sleep = make(metrics)
    gate = asyncio.Event()

    succeeded = asyncio.Event()

    async def step() -> None:
        if not gate.is_set():
            raise BoomError("the table is gone\nsecond line")
        if succeeded.is_set():
            await asyncio.Event().wait()
        succeeded.set()

    healthy = Script()
    supervisor.spawn("b-healthy", healthy)
    supervisor.spawn("a-broken", step)
    await within(healthy.parked)
    async with asyncio.timeout(10):
        while failures(metrics, "a-broken") < 3:
            await asyncio.sleep(0)
    assert supervisor.failing() == ["a-broken"]
    [broken, ok] = supervisor.status()
    assert broken.failing and broken.in_a_row >= 3
    assert broken.error == "BoomError: the table is gone"
    assert ok == LoopStatus("b-healthy", False, 0, 0, None)
    assert (
        metrics.registry.get_sample_value("interlock_background_loop_failing", {"loop": "a-broken"})
        == 1
    )
    gate.set()
    async with asyncio.timeout(10):
        while supervisor.failing():
            await asyncio.sleep(0)
    await supervisor.aclose()
    assert supervisor.status() == []


async def test_cancellation_is_never_caught() -> None:
    supervisor, _sleep = make()
    step = Script()
    loop = supervisor.spawn("x", step)
    await within(step.parked)
    await loop.stop()  # cancels the step where it waits
    assert loop.task.cancelled()
    assert step.calls == 1

    # A step that raises CancelledError itself ends its loop too, as a stop.
    inner = supervisor.spawn("y", Script(asyncio.CancelledError()))
    with pytest.raises(asyncio.CancelledError):
        await inner.task
    assert supervisor.failing() == [] and supervisor.status() == []


async def test_a_loop_that_dies_counts_as_failing(caplog: pytest.LogCaptureFixture) -> None:
    supervisor, _sleep = make()
    loop = supervisor.spawn("doomed", Script(FatalError("out")))
    with caplog.at_level(logging.ERROR, logger="interlock.resilience"), pytest.raises(FatalError):
        await loop.task
    assert supervisor.failing() == ["doomed"]
    [status] = supervisor.status()
    assert status.error == "the loop ended: FatalError: out"
    [line] = caplog.records
    assert line.getMessage() == "background loop 'doomed' ended; it is no longer running"
    await loop.stop()
    assert supervisor.failing() == []


async def test_names_are_unique_while_running() -> None:
    supervisor, _sleep = make()
    step = Script()
    supervisor.spawn("x", step)
    with pytest.raises(ValueError, match="'x' is already running"):
        supervisor.spawn("x", Script())
    await supervisor.aclose()
    again = Script()
    supervisor.spawn("x", again)  # a stopped name can be used again
    await within(again.parked)
    await supervisor.aclose()


def test_backoff_doubles_from_its_base_up_to_the_cap() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    top = Supervisor(rng=Fixed(0.99999), max_backoff_s=30.0)
    assert [round(top.backoff(1.0, n), 3) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    low = Supervisor(rng=Fixed(0.0), max_backoff_s=30.0)
    assert [low.backoff(0.5, n) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert low.backoff(0.5, 10_000) == 15.0  # no overflow after a long outage
