"""Fixtures for the registry tests: a real registry on SQLite and on PostgreSQL.

The registry is wired as the application wires it: a migrated :class:`Database`, an
:class:`ArtifactStore` under tmp_path, and the real ``inspect_artifact`` of the runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from interlock.registry import Registry
from interlock.runtime.loaders import inspect_artifact
from interlock.store import ArtifactStore, Database
from tests.registry.sample_models import START, SUM_MODEL


class StepClock:
    """A clock that starts at START and moves one second each time it is read."""

    def __init__(self) -> None:
        self.current = START - timedelta(seconds=1)

    def now(self) -> datetime:
        self.current += timedelta(seconds=1)
        return self.current

    def monotonic(self) -> float:
        return (self.current - START).total_seconds()


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
async def registry(database_url: str, tmp_path: Path, clock: StepClock) -> AsyncIterator[Registry]:
    async with Database(database_url) as db:
        db.migrate()
        yield Registry(db, ArtifactStore(tmp_path / "artifacts"), inspect_artifact, clock)


@pytest.fixture
def model_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a ``python``-format model file and return its path.

    Without ``source``, each file is :data:`SUM_MODEL` plus a numbered comment: the
    same model in new bytes, as registering identical bytes again is refused.
    """
    counter = iter(range(1_000_000))

    def write(source: str | None = None, name: str | None = None) -> Path:
        number = next(counter)
        folder = tmp_path / "src" / str(number)
        folder.mkdir(parents=True)
        path = folder / (name or "model.py")
        path.write_text(SUM_MODEL + f"# file {number}\n" if source is None else source)
        return path

    return write
