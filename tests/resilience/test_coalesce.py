"""SingleFlight: one execution per key at a time, shared by every concurrent caller."""

from __future__ import annotations

import asyncio

import pytest

from interlock.resilience import SingleFlight


class Gated:
    """An ``fn`` for SingleFlight that waits for the test to open its gate."""

    def __init__(self, value: str = "v", error: BaseException | None = None) -> None:
        self.value = value
        self.error = error
        self.calls = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.tasks: list[asyncio.Task[object]] = []
        self.finished = False

    async def __call__(self) -> str:
        self.calls += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        self.started.set()
        await self.gate.wait()
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.value


async def test_concurrent_callers_share_one_execution() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("answer")
    waiters = [asyncio.create_task(flight.do("k", fn())) for _ in range(10)]
    # Tasks run in order: by the time fn starts, every waiter has joined.
    await fn.started.wait()
    assert flight.in_flight == 1
    fn.gate.set()
    assert await asyncio.gather(*waiters) == ["answer"] * 10
    assert fn.calls == 1
    assert flight.in_flight == 0


async def test_the_exception_reaches_every_caller() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    error = RuntimeError("model down")
    fn = Gated(error=error)
    waiters = [asyncio.create_task(flight.do("k", fn())) for _ in range(3)]
    await fn.started.wait()
    fn.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert results == [error, error, error]
    assert all(r is error for r in results)
    assert fn.calls == 1
    assert flight.in_flight == 0


async def test_different_keys_run_independently() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fa, fb = Gated("a"), Gated("b")
    wa = asyncio.create_task(flight.do("a", fa()))
    wb = asyncio.create_task(flight.do("b", fb()))
    await fa.started.wait()
    await fb.started.wait()
    assert flight.in_flight == 2
    fa.gate.set()
    assert await wa == "a"
    assert flight.in_flight == 1
    assert not wb.done()
    fb.gate.set()
    assert await wb == "b"
    assert (fa.calls, fb.calls, flight.in_flight) == (1, 1, 0)


async def test_nothing_is_cached_once_the_execution_is_done() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    first, second = Gated("1"), Gated("2")
    first.gate.set()
    second.gate.set()
    assert await flight.do("k", first()) == "1"
    assert await flight.do("k", second()) == "2"
    assert (first.calls, second.calls) == (1, 1)


async def test_a_cancelled_follower_does_not_cancel_the_others() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("v")
    leader = asyncio.create_task(flight.do("k", fn()))
    leaving = asyncio.create_task(flight.do("k", fn()))
    staying = asyncio.create_task(flight.do("k", fn()))
    await fn.started.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert flight.in_flight == 1
    fn.gate.set()
    assert await leader == "v"
    assert await staying == "v"
    assert fn.finished
    assert fn.calls == 1


async def test_the_leader_runs_inline_in_its_own_task() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("v")
    leader = asyncio.create_task(flight.do("k", fn()))
    await fn.started.wait()
    assert fn.tasks == [leader]
    fn.gate.set()
    assert await leader == "v"


async def test_a_cancelled_leader_hands_the_work_to_a_follower() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("v")
    leader = asyncio.create_task(flight.do("k", fn()))
    followers = [asyncio.create_task(flight.do("k", fn())) for _ in range(3)]
    await fn.started.wait()
    fn.started.clear()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await fn.started.wait()  # the first follower leads now; the others wait on it
    assert fn.tasks == [leader, followers[0]]
    assert flight.in_flight == 1
    fn.gate.set()
    assert await asyncio.gather(*followers) == ["v"] * 3
    assert fn.calls == 2
    assert flight.in_flight == 0


async def test_a_late_caller_joins_the_follower_that_took_over() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("v")
    leader = asyncio.create_task(flight.do("k", fn()))
    follower = asyncio.create_task(flight.do("k", fn()))
    await fn.started.wait()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    late = asyncio.create_task(flight.do("k", fn()))
    fn.gate.set()
    assert await asyncio.gather(follower, late) == ["v", "v"]
    assert fn.calls == 2


async def test_a_cancelled_leader_alone_stops_the_work() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("v")
    leader = asyncio.create_task(flight.do("k", fn()))
    await fn.started.wait()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert not fn.finished
    assert flight.in_flight == 0


async def test_an_error_of_a_follower_that_left_is_not_reported_as_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    error = RuntimeError("late failure")
    fn = Gated(error=error)
    leader = asyncio.create_task(flight.do("k", fn()))
    follower = asyncio.create_task(flight.do("k", fn()))
    await fn.started.wait()
    fn.gate.set()
    follower.cancel()  # after its future is resolved, before it runs
    results = await asyncio.gather(leader, follower, return_exceptions=True)
    assert results[0] is error
    assert isinstance(results[1], asyncio.CancelledError | RuntimeError)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_an_fn_that_raises_cancelled_itself_hands_over_too() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated(error=asyncio.CancelledError())
    waiters = [asyncio.create_task(flight.do("k", fn())) for _ in range(2)]
    await fn.started.wait()
    fn.gate.set()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert all(w.cancelled() for w in waiters)
    assert fn.calls == 2
    assert flight.in_flight == 0


async def test_work_that_fails_at_once_leaves_nothing_behind() -> None:
    flight: SingleFlight[str, str] = SingleFlight()

    async def broken() -> str:
        raise ValueError("bad request")

    with pytest.raises(ValueError, match="bad request"):
        await flight.do("k", broken())
    assert flight.in_flight == 0


async def test_a_followers_own_work_is_closed_unstarted() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    fn = Gated("v")
    leader = asyncio.create_task(flight.do("k", fn()))
    await fn.started.wait()
    own = fn()
    follower = asyncio.create_task(flight.do("k", own))
    leaving = asyncio.create_task(flight.do("k", fn()))
    async with asyncio.timeout(5):
        while flight.followers < 2:  # both join (nothing ends before the gate opens)
            await asyncio.sleep(0)
    leaving.cancel()
    fn.gate.set()
    assert await asyncio.gather(leader, follower) == ["v", "v"]
    assert own.cr_frame is None  # closed, never run: no "never awaited" warning
    assert fn.calls == 1
