"""Replica pools and the autoscaling policy: threads, child processes, growing, shrinking."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from interlock.errors import PredictionError, RuntimeLoadError
from interlock.runtime.batcher import Batcher
from interlock.runtime.pool import Autoscaler, ProcessReplicas, ScalePolicy, ThreadReplicas
from tests.clock import ManualClock

# A python-format model that answers with its process ID. A row may hold the model inside
# ``predict``: it writes the PID to the FIFO ``entered`` (which blocks until the test
# reads it), then blocks reading the FIFO ``release``. Model() blocks on the FIFO named
# by ``START_GATE`` when that exists, to hold a replica in start-up.
PID_MODEL = """
import os

START_GATE = {start_gate!r}


class Model:
    def __init__(self):
        if os.path.exists(START_GATE):
            with open(START_GATE) as gate:
                gate.read()

    def predict(self, rows):
        for row in rows:
            if "entered" in row:
                with open(row["entered"], "w") as fifo:
                    fifo.write(str(os.getpid()))
            if "release" in row:
                with open(row["release"]) as fifo:
                    fifo.read()
        return [os.getpid() for _ in rows]
"""


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Yield until ``condition`` holds: child processes start and stop in real time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Fifos:
    """Named pipes in a directory; reading or writing one blocks until the other side is there."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def make(self, name: str) -> str:
        path = self.directory / name
        os.mkfifo(path)
        return str(path)

    async def read(self, path: str) -> str:
        return await asyncio.to_thread(Path(path).read_text)

    async def write(self, path: str, text: str = "go") -> None:
        await asyncio.to_thread(Path(path).write_text, text)


@pytest.fixture
def fifos(tmp_path: Path) -> Fifos:
    return Fifos(tmp_path)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "pid_model.py"
    start_gate = str(tmp_path / "start-gate")
    path.write_text(textwrap.dedent(PID_MODEL.format(start_gate=start_gate)))
    return path


BatcherFactory = Callable[..., tuple[Batcher, ProcessReplicas]]


@pytest.fixture(params=["spawn", "forkserver"])
async def process_batcher(
    model_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[BatcherFactory]:
    """Batchers on process replicas of the PID model (and their pools), closed after."""
    made: list[Batcher] = []

    def factory(**kwargs: Any) -> tuple[Batcher, ProcessReplicas]:
        pool = ProcessReplicas(
            "python", model_path, name="pid-model", start_method=request.param, start_timeout_s=60
        )
        batcher = Batcher(pool, **kwargs)
        made.append(batcher)
        return batcher, pool

    yield factory
    for batcher in made:
        await batcher.aclose()


# -- the policy --------------------------------------------------------------------------


def scaler(**policy: Any) -> tuple[Autoscaler, ManualClock]:
    clock = ManualClock()
    defaults: dict[str, Any] = {"min_replicas": 1, "max_replicas": 3, "cooldown_s": 10}
    return Autoscaler(ScalePolicy(**(defaults | policy)), clock), clock


def test_grows_when_all_are_busy_and_the_delay_is_over_target_or_a_batch_is_full() -> None:
    auto, clock = scaler(target_queue_delay_s=0.005)
    assert auto.decide(replicas=1, busy=1, queue_delay_s=0.001, full_batch=False) == 0
    assert auto.decide(replicas=1, busy=1, queue_delay_s=0.01, full_batch=False) == 1
    clock.advance(10)
    assert auto.decide(replicas=2, busy=2, queue_delay_s=0.0, full_batch=True) == 1


def test_never_grows_while_a_replica_is_idle_or_beyond_the_maximum() -> None:
    auto, _ = scaler()
    assert auto.decide(replicas=2, busy=1, queue_delay_s=1.0, full_batch=True) == 0
    assert auto.decide(replicas=3, busy=3, queue_delay_s=1.0, full_batch=True) == 0


def test_steps_are_a_cooldown_apart() -> None:
    auto, clock = scaler()
    assert auto.decide(replicas=1, busy=1, queue_delay_s=0.0, full_batch=True) == 1
    clock.advance(9.9)
    assert auto.decide(replicas=2, busy=2, queue_delay_s=0.0, full_batch=True) == 0
    clock.advance(0.1)
    assert auto.decide(replicas=2, busy=2, queue_delay_s=0.0, full_batch=True) == 1


def test_shrinks_after_a_cooldown_without_every_replica_busy_and_never_below_min() -> None:
    auto, clock = scaler(min_replicas=2)
    auto.saturated(clock.monotonic())
    clock.advance(9)
    assert auto.decide(replicas=3, busy=2, queue_delay_s=0.0, full_batch=False) == 0
    clock.advance(1)
    assert auto.decide(replicas=3, busy=2, queue_delay_s=0.0, full_batch=False) == -1
    clock.advance(60)
    assert auto.decide(replicas=2, busy=0, queue_delay_s=0.0, full_batch=False) == 0


def test_a_policy_with_min_above_max_is_refused() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        ScalePolicy(min_replicas=3, max_replicas=2)


# -- thread replicas -------------------------------------------------------------------


async def test_thread_replicas_grow_run_and_retire() -> None:
    names: set[str] = set()

    def model(batch: Any) -> Any:
        names.add(threading.current_thread().name)
        return batch[:, 0] + 1

    pool = ThreadReplicas(model, takes_rows=False, name="t")
    batcher = Batcher(pool, scaling=ScalePolicy(2, 2))
    await batcher.start()
    assert pool.replicas == 2 and pool.busy == 0
    assert await batcher.submit(np.zeros((2, 1)), 2) == [1.0, 1.0]
    assert names <= {"interlock-t-1", "interlock-t-2"}
    assert pool.shrink()
    assert pool.replicas == 1
    assert await batcher.submit(np.zeros((1, 1)), 1) == [1.0]
    await batcher.aclose()
    assert not any(t.name.startswith("interlock-t-") for t in threading.enumerate())


async def test_queueing_delay_over_target_grows_the_pool() -> None:
    started = threading.Semaphore(0)
    release = threading.Event()

    def model(batch: Any) -> Any:
        started.release()
        release.wait(10)
        return batch[:, 0]

    clock = ManualClock()
    policy = ScalePolicy(min_replicas=1, max_replicas=2, target_queue_delay_s=0.5, cooldown_s=1)
    pool = ThreadReplicas(model, takes_rows=False)
    batcher = Batcher(pool, max_batch_size=64, scaling=policy, clock=clock)
    first = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    assert await asyncio.to_thread(started.acquire, True, 10)
    second = asyncio.create_task(batcher.submit(np.zeros((1, 1)), 1))
    await until(lambda: batcher.queued_rows == 1)
    batcher.rescale()
    assert batcher.replicas == 1  # one row waiting for no time at all
    clock.advance(2)
    batcher.rescale()  # the waiting row is now 2 s old
    await until(lambda: batcher.replicas == 2)
    assert batcher.busy == 1  # the new replica does not take a partial batch
    release.set()
    await asyncio.gather(first, second)
    await batcher.aclose()


# -- process replicas ------------------------------------------------------------------


async def test_a_python_model_predicts_in_a_child_process(
    process_batcher: BatcherFactory,
) -> None:
    batcher, pool = process_batcher()
    await batcher.start()
    [pid] = await batcher.submit([{"x": 1.0}], 1)
    assert pid != os.getpid()
    assert pool.pids == [pid]
    await batcher.aclose()
    assert gone(pid)


async def test_a_replica_killed_mid_batch_fails_that_batch_and_is_replaced(
    process_batcher: BatcherFactory, fifos: Fifos
) -> None:
    batcher, pool = process_batcher()
    await batcher.start()
    entered, release = fifos.make("entered"), fifos.make("release")  # never released
    held = asyncio.create_task(batcher.submit([{"entered": entered, "release": release}], 1))
    pid = int(await fifos.read(entered))  # the child is inside predict
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(PredictionError, match="died"):
        await held
    [new_pid] = await batcher.submit([{"x": 1.0}], 1)  # waits for the replacement
    assert new_pid not in (pid, os.getpid())
    assert batcher.replicas == 1 and pool.pids == [new_pid]


async def test_a_replica_starting_up_does_not_stop_the_others_serving(
    process_batcher: BatcherFactory, fifos: Fifos
) -> None:
    batcher, pool = process_batcher(scaling=ScalePolicy(1, 2))
    await batcher.start()
    start_gate = fifos.make("start-gate")  # the next Model() blocks on it
    pool.grow()
    [first] = pool.pids
    for _ in range(3):
        assert await batcher.submit([{"x": 1.0}], 1) == [first]
    assert batcher.replicas == 1 and pool.starting == 1
    await fifos.write(start_gate)  # the new child's Model() may now finish
    await until(lambda: batcher.replicas == 2)
    assert pool.starting == 0 and len(set(pool.pids)) == 2


async def test_scaling_a_process_pool_down_ends_a_child(
    process_batcher: BatcherFactory, fifos: Fifos
) -> None:
    clock = ManualClock()
    policy = ScalePolicy(min_replicas=1, max_replicas=2, cooldown_s=10)
    batcher, pool = process_batcher(scaling=policy, clock=clock, max_batch_size=2)
    await batcher.start()
    entered, release = fifos.make("entered"), fifos.make("release")
    held = asyncio.create_task(batcher.submit([{"entered": entered, "release": release}], 1))
    busy_pid = int(await fifos.read(entered))
    # A full batch waits while the only replica is busy: the pool grows, and the batch
    # runs on the new child once it has loaded the model.
    burst = [asyncio.create_task(batcher.submit([{"x": 1.0}], 1)) for _ in range(2)]
    answers = await asyncio.gather(*burst)
    assert answers[0] == answers[1] and answers[0] != [busy_pid]
    assert batcher.replicas == 2
    await fifos.write(release)
    assert await held == [busy_pid]
    before = set(pool.pids)
    clock.advance(10)
    batcher.rescale()
    assert batcher.replicas == 1
    [retired] = before - set(pool.pids)
    await until(lambda: gone(retired))
    [left] = pool.pids
    assert await batcher.submit([{"x": 1.0}], 1) == [left]


async def test_a_model_that_fails_to_load_in_the_child_fails_start(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('no model today')\n")
    batcher = Batcher(ProcessReplicas("python", path, name="broken"))
    with pytest.raises(RuntimeLoadError, match="no model today"):
        await batcher.start()
    await batcher.aclose()


async def test_a_model_error_in_the_child_fails_the_request_and_keeps_the_replica(
    tmp_path: Path,
) -> None:
    path = tmp_path / "picky.py"
    path.write_text(
        textwrap.dedent(
            """
            class Model:
                def predict(self, rows):
                    if any(r.get("bad") for r in rows):
                        raise ValueError("bad row")
                    return [r["x"] * 2 for r in rows]
            """
        )
    )
    pool = ProcessReplicas("python", path, name="picky")
    batcher = Batcher(pool)
    await batcher.start()
    [pid] = pool.pids
    with pytest.raises(PredictionError, match="bad row"):
        await batcher.submit([{"bad": True}], 1)
    assert await batcher.submit([{"x": 2}, {"x": 3}], 2) == [4, 6]
    assert pool.pids == [pid]
    await batcher.aclose()
