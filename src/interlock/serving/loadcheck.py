"""Loading the versions a traffic change names before the change is accepted.

``traffic set`` and ``traffic canary`` (CLI and admin API) hand a :class:`VersionLoader`
to the :class:`~interlock.serving.policies.PolicyStore`; the store calls it once the
versions are known to exist and before anything is written, so a version that cannot
load and answer one warm-up row is refused with the cause, instead of a policy that no
node can apply.

- :class:`ManagerLoader`, in a serving process: loads through its
  :class:`~interlock.serving.models.ModelManager`, so the version is also warm when the
  router switches to it.
- :class:`ArtifactLoader`, in a one-off process (the CLI): verifies the artifact's bytes,
  loads it with the runtime loader, predicts the warm-up row, and closes it again. No
  server needs to run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from interlock.errors import InterlockError, TrafficError
from interlock.registry import ModelVersion, Registry
from interlock.runtime.loaders import load_predictor
from interlock.serving.models import NATIVE_THREADS_PER_CALL, ModelManager, warm_input
from interlock.store.artifacts import ArtifactStore

__all__ = ["ArtifactLoader", "ManagerLoader", "VersionLoader", "refusal"]


class VersionLoader(Protocol):
    """Loads and warms ``versions`` of ``model``; :class:`TrafficError` with the cause if not."""

    async def __call__(self, model: str, versions: Sequence[int]) -> None: ...


def refusal(model: str, version: int, cause: BaseException) -> TrafficError:
    """The one-line error that refuses a change naming a version that cannot load."""
    lines = str(cause).strip().splitlines()
    text = lines[0] if lines else type(cause).__name__
    return TrafficError(f"{model}: version {version} cannot serve, change refused: {text}")


class ManagerLoader:
    """Loads through the serving process's model manager (the version stays loaded)."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    async def __call__(self, model: str, versions: Sequence[int]) -> None:
        for version in versions:
            try:
                await self._manager.get(model, version)
            except (InterlockError, OSError) as exc:
                raise refusal(model, version, exc) from exc


class ArtifactLoader:
    """Loads each version in a worker thread, warms it with one row, then closes it."""

    def __init__(self, registry: Registry, artifacts: ArtifactStore) -> None:
        self._registry = registry
        self._artifacts = artifacts

    async def __call__(self, model: str, versions: Sequence[int]) -> None:
        for version in versions:
            mv = await self._registry.get_version(model, version)
            try:
                await asyncio.to_thread(self._load_and_warm, mv)
            except Exception as exc:  # any failure to load or answer refuses the change
                raise refusal(model, version, exc) from exc

    def _load_and_warm(self, mv: ModelVersion) -> None:
        self._artifacts.verify(mv.artifact_path, mv.artifact_sha256)
        predictor = load_predictor(
            mv.format,
            mv.artifact_path,
            schema=mv.schema,
            threads=NATIVE_THREADS_PER_CALL,
            trusted=mv.trusted,
        )
        try:
            warm = warm_input(mv.schema, predictor.takes_rows)
            if warm is not None:
                try:
                    predictor.predict(warm)
                except Exception as exc:
                    raise TrafficError(f"its warm-up prediction failed: {exc!r}") from exc
        finally:
            predictor.close()
