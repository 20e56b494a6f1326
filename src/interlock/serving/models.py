"""The models a serving process holds: loaded once, warmed, and swapped without a gap.

A *route* is what a client names: ``fraud`` (its ``champion`` alias, else its latest
version), ``fraud@challenger``, ``fraud@latest``. Each route points at a loaded version.
Every ``alias_refresh_s`` the manager re-reads the registry's aliases in one query (the
supervised ``alias-refresh`` loop: a failed read is logged once and retried with backoff);
when a route's target moved (here or on another node), the new version is loaded and
warmed *before* the route is switched, so requests never wait on a load and never fail
during a swap. A version no route points at any more is unloaded after its last
request has been answered.

Pinned versions (``/v2/models/{name}/versions/{v}``) load on first use and stay loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from interlock._core.schema import FeatureSchema, FeatureType
from interlock.errors import InterlockError, ModelNotFoundError, RuntimeLoadError
from interlock.registry import ModelRouting, ModelVersion, Registry
from interlock.resilience.supervisor import Supervised, Supervisor
from interlock.runtime.base import Predictor
from interlock.runtime.batcher import Batcher
from interlock.runtime.loaders import load_predictor
from interlock.runtime.pool import ProcessReplicas, Replicas, ScalePolicy, ThreadReplicas
from interlock.serving.decode import Decoder
from interlock.settings import ServingSettings
from interlock.store.artifacts import ArtifactStore

__all__ = ["LoadedModel", "ModelManager", "ServingObserver", "warm_input"]

log = logging.getLogger("interlock.serving")

UNLOAD_GRACE_S = 5.0
# Each prediction call uses one native thread; parallelism comes from the batcher's
# threads. Letting LightGBM/XGBoost fan out per call oversubscribes the cores (measured:
# 12 ms p99 with their default threading).
NATIVE_THREADS_PER_CALL = 1


class ServingObserver(Protocol):
    """What the manager reports, for metrics."""

    def model_loaded(self, model: str, version: int, seconds: float) -> None: ...

    def batch_done(self, model: str, version: int, rows: int) -> None: ...


@dataclass(slots=True)
class LoadedModel:
    """One version, ready: its predictor behind a batcher, and its request decoder."""

    version: ModelVersion
    predictor: Predictor
    batcher: Batcher
    decoder: Decoder
    load_seconds: float
    breaker: Any = None  # the pipeline's circuit breaker for this version, set on first use
    name: str = field(init=False)  # plain attributes, read on every request
    number: int = field(init=False)
    cache_prefix: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.version.model
        self.number = self.version.version
        self.cache_prefix = f"{self.name}\x00{self.number}\x00".encode()


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, sep, alias = ref.partition("@")
    if not name or (sep and not alias):
        raise ModelNotFoundError(f"{ref!r} is not a model reference; use NAME or NAME@ALIAS")
    return name, (alias or None)


def _target(routing: ModelRouting, alias: str | None) -> int | None:
    if alias is None:
        return routing.aliases.get("champion", routing.latest)
    if alias == "latest":
        return routing.latest
    return routing.aliases.get(alias)


def warm_input(schema: FeatureSchema | None, takes_rows: bool) -> Any:
    """One synthetic row inside the training ranges, to warm a freshly loaded model."""
    if schema is None:
        return None
    row: dict[str, Any] = {}
    codes: list[float] = []
    for feature in schema.features:
        lo, hi = feature.minimum, feature.maximum
        mid = (lo + hi) / 2 if lo is not None and hi is not None else (lo or hi or 0.0)
        if feature.type is FeatureType.CATEGORY:
            value: Any = feature.categories[0] if feature.categories else None
            code = 0.0
        elif feature.type is FeatureType.BOOL:
            value, code = False, 0.0
        elif feature.type is FeatureType.INT:
            value = int(mid)
            code = float(value)
        else:
            value = code = float(mid)
        row[feature.name] = value
        codes.append(code)
    if takes_rows:
        return [row]
    import numpy as np

    return np.array([codes], dtype=np.float64)


class ModelManager:
    """Loads, warms, routes and unloads model versions for one serving process."""

    def __init__(
        self,
        registry: Registry,
        artifacts: ArtifactStore,
        settings: ServingSettings,
        observer: ServingObserver | None = None,
        *,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._registry = registry
        self._artifacts = artifacts
        self._settings = settings
        self._observer = observer
        self._routes: dict[str, LoadedModel] = {}
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._loading: dict[tuple[str, int], asyncio.Task[LoadedModel]] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._refresh_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor = supervisor or Supervisor()
        self._refresher: Supervised | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the registry's aliases in the supervised ``alias-refresh`` loop."""
        self._refresher = self._supervisor.spawn(
            "alias-refresh", self.refresh, every_s=self._settings.alias_refresh_s
        )

    async def aclose(self) -> None:
        if self._refresher is not None:
            await self._refresher.stop()
        for task in list(self._tasks) + list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._loading.values(), return_exceptions=True)
        for loaded in list(self._loaded.values()):
            await self._close(loaded)
        self._loaded.clear()
        self._routes.clear()

    # -- the request path -------------------------------------------------------------

    async def get(self, ref: str, version: int | None = None) -> LoadedModel:
        """The loaded version that answers ``ref`` (or ``ref``'s pinned ``version``)."""
        if version is None:
            loaded = self._routes.get(ref)
            if loaded is not None:
                return loaded
            name, alias = _split_ref(ref)
            target = await self._registry.resolve(ref)
            loaded = await self._ensure_loaded(target)
            # Another request may have routed it meanwhile; either is the same version.
            return self._routes.setdefault(ref, loaded)
        name, alias = _split_ref(ref)
        if alias is not None:
            raise ModelNotFoundError(f"give either an alias or a version, not both: {ref!r}")
        loaded = self._loaded.get((name, version))
        if loaded is not None:
            return loaded
        return await self._ensure_loaded(await self._registry.get_version(name, version))

    def routed(self, ref: str) -> LoadedModel | None:
        """The loaded version a route points at now, if it is loaded; no await needed."""
        return self._routes.get(ref)

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def routes(self) -> dict[str, LoadedModel]:
        return dict(self._routes)

    # -- loading ---------------------------------------------------------------------

    async def _ensure_loaded(self, mv: ModelVersion) -> LoadedModel:
        key = (mv.model, mv.version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(mv), name=f"load-{mv.model}-{mv.version}")
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, mv: ModelVersion) -> LoadedModel:
        started = time.perf_counter()
        predictor = await asyncio.to_thread(self._load_blocking, mv)
        observer = self._observer
        on_batch: Callable[[int], None] | None = None
        if observer is not None:

            def on_batch(rows: int) -> None:
                observer.batch_done(mv.model, mv.version, rows)

        settings = self._settings
        name = f"{mv.model}-v{mv.version}"
        replicas: Replicas
        if predictor.takes_rows:
            # Python models hold the GIL: each replica is a process that loads its own copy.
            replicas = ProcessReplicas(
                str(mv.format),
                mv.artifact_path,
                schema=mv.schema,
                trusted=mv.trusted,
                threads=NATIVE_THREADS_PER_CALL,
                warm=warm_input(mv.schema, True),
                name=name,
                start_method="forkserver",
            )
        else:
            replicas = ThreadReplicas(predictor.predict, takes_rows=False, name=name)
        batcher = Batcher(
            replicas,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue_rows=settings.max_queue_rows,
            scaling=ScalePolicy(
                min_replicas=settings.min_replicas,
                max_replicas=max(settings.min_replicas, settings.max_replicas),
                target_queue_delay_s=settings.target_queue_delay_ms / 1000,
                cooldown_s=settings.scale_cooldown_s,
            ),
            name=name,
            on_batch=on_batch,
        )
        try:
            await batcher.start()
        except BaseException:
            await batcher.aclose()
            await asyncio.to_thread(predictor.close)
            raise
        seconds = time.perf_counter() - started
        decoder = Decoder(
            mv.schema, takes_rows=predictor.takes_rows, accepts_missing=predictor.accepts_missing
        )
        loaded = LoadedModel(mv, predictor, batcher, decoder, seconds)
        self._loaded[(mv.model, mv.version)] = loaded
        if observer is not None:
            observer.model_loaded(mv.model, mv.version, seconds)
        log.info(
            "model loaded",
            extra={"model": mv.model, "version": mv.version, "load_ms": round(seconds * 1000, 1)},
        )
        return loaded

    def _load_blocking(self, mv: ModelVersion) -> Predictor:
        """In a thread: check the artifact's bytes, load it, run one row through it."""
        try:
            self._artifacts.verify(mv.artifact_path, mv.artifact_sha256)
            predictor = load_predictor(
                mv.format,
                mv.artifact_path,
                schema=mv.schema,
                threads=NATIVE_THREADS_PER_CALL,
                trusted=mv.trusted,
            )
        except InterlockError as exc:
            raise RuntimeLoadError(f"{mv.model} version {mv.version} cannot load: {exc}") from exc
        warm = warm_input(mv.schema, predictor.takes_rows)
        if warm is not None:
            try:
                predictor.predict(warm)
            except Exception as exc:
                predictor.close()
                raise RuntimeLoadError(
                    f"{mv.model} version {mv.version} failed its warm-up prediction: {exc!r}"
                ) from exc
        return predictor

    async def _close(self, loaded: LoadedModel) -> None:
        await loaded.batcher.aclose()
        await asyncio.to_thread(loaded.predictor.close)

    # -- following the registry --------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the aliases; load and warm every moved target, then switch its route."""
        async with self._refresh_lock:
            routing = await self._registry.routing()
            retired: set[tuple[str, int]] = set()
            for ref, current in list(self._routes.items()):
                name, alias = _split_ref(ref)
                model = routing.get(name)
                target = None if model is None else _target(model, alias)
                if target is None:
                    del self._routes[ref]  # the next request resolves it, and gets a 404
                    retired.add((current.name, current.number))
                    continue
                if target == current.number:
                    continue
                key = (name, target)
                if time.monotonic() - self._failed.get(key, -1e9) < 30.0:
                    continue  # it failed to load recently; keep serving the current version
                try:
                    fresh = await self._ensure_loaded(
                        await self._registry.get_version(name, target)
                    )
                except (InterlockError, OSError) as exc:
                    self._failed[key] = time.monotonic()
                    log.error(
                        "new target failed to load; the current version keeps serving",
                        extra={"route": ref, "version": target, "error": str(exc)},
                    )
                    continue
                self._routes[ref] = fresh
                retired.add((current.name, current.number))
                log.info(
                    "route switched",
                    extra={"route": ref, "from_version": current.number, "to_version": target},
                )
            in_use = {(m.name, m.number) for m in self._routes.values()}
            for key in retired - in_use:
                loaded = self._loaded.pop(key, None)
                if loaded is not None:
                    task = asyncio.create_task(self._unload_later(loaded))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _unload_later(self, loaded: LoadedModel) -> None:
        await asyncio.sleep(UNLOAD_GRACE_S)
        await self._close(loaded)
        log.info("model unloaded", extra={"model": loaded.name, "version": loaded.number})
