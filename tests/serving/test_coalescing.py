"""Coalescing on the prediction path: identical concurrent misses run the model once.

Real components (``build_components``: SQLite registry, model manager, batcher, memory
cache) around a python model that waits for a gate file and counts its calls in a file
(it may run in a worker process). Nothing here is mocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from interlock.app import Components, build_components, start_components, stop_components
from interlock.serving.pipeline import Answer
from tests.api.traffic_support import add_versions

GATED_COUNTING = """
import pathlib, time

GATE = pathlib.Path({gate!r})
COUNTER = pathlib.Path({counter!r})


class Model:
    features = ["x"]

    def predict(self, rows):
        if rows and rows[0].get("x") == 0.0:  # the warm-up row (x=0): not gated, not counted
            return [0.0 for _ in rows]
        calls = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
        COUNTER.write_text(str(calls))
        while not GATE.exists():
            time.sleep(0.005)
        return [r["x"] * 10 for r in rows]
"""


def _count(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    gate, counter = tmp_path / "gate", tmp_path / "calls"
    yield gate, counter
    gate.touch()  # never leave a worker waiting


@pytest.fixture
def settings(tmp_path: Path, files: tuple[Path, Path], make_settings: Callable[..., Any]) -> Any:
    gate, counter = files
    made = make_settings(cache={"enabled": True, "url": "memory://"})
    add_versions(made, tmp_path, "m", GATED_COUNTING.format(gate=str(gate), counter=str(counter)))
    return made


@pytest.fixture
async def parts(settings: Any) -> AsyncIterator[Components]:
    components = build_components(settings)
    await start_components(components)
    try:
        yield components
    finally:
        await stop_components(components)


def _predict(parts: Components, x: float) -> asyncio.Task[Answer]:
    loop = asyncio.get_running_loop()
    return asyncio.create_task(
        parts.pipeline.predict(
            "m", None, lambda decoder: decoder.rows([{"x": x}]), deadline=loop.time() + 60.0
        )
    )


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.005)


async def test_identical_concurrent_predictions_run_the_model_once(
    parts: Components, files: tuple[Path, Path]
) -> None:
    gate, counter = files
    requests = [_predict(parts, 3.0) for _ in range(5)]
    await _until(lambda: _count(counter) >= 1)  # the leader is in the model, the rest wait
    gate.touch()
    answers = await asyncio.gather(*requests)
    assert [a.values for a in answers] == [[30.0]] * 5
    assert _count(counter) == 1


async def test_a_cancelled_leader_does_not_fail_its_followers(
    parts: Components, files: tuple[Path, Path]
) -> None:
    gate, counter = files
    leader = _predict(parts, 4.0)
    await _until(lambda: _count(counter) >= 1)
    followers = [_predict(parts, 4.0) for _ in range(3)]
    await _until(lambda: parts.pipeline.coalescing() == 3)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.touch()
    answers = await asyncio.gather(*followers)
    assert [a.values for a in answers] == [[40.0]] * 3


async def test_a_cancelled_follower_leaves_the_others_alone(
    parts: Components, files: tuple[Path, Path]
) -> None:
    gate, counter = files
    leader = _predict(parts, 5.0)
    await _until(lambda: _count(counter) >= 1)
    leaving, staying = _predict(parts, 5.0), _predict(parts, 5.0)
    await _until(lambda: parts.pipeline.coalescing() == 2)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    gate.touch()
    assert (await leader).values == [50.0]
    assert (await staying).values == [50.0]
    assert _count(counter) == 1
