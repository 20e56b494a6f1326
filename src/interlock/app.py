"""The composition root: builds every component from the settings and wires them.

Only entrypoints (the CLI, tests, benchmarks) import this module. Nothing here runs on
import: components are built by :func:`create_app` and started in the ASGI lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from interlock import __version__
from interlock._core.clock import SystemClock
from interlock.api.admin import build_admin_router
from interlock.api.errors import status_for, validation_error
from interlock.api.guard import AdminGuard
from interlock.api.inference import build_inference_router
from interlock.api.llm import LLMApp
from interlock.api.openapi import install_openapi
from interlock.api.predict import ASGIApp, PredictionApp
from interlock.api.request_ids import RequestIds
from interlock.api.traffic import build_traffic_router
from interlock.bus import EventBus, bus_options, open_bus
from interlock.cache import Cache, open_cache
from interlock.errors import InterlockError
from interlock.llm.factory import open_gateway
from interlock.llm.gateway import Gateway
from interlock.llm.usage import usage_summary
from interlock.monitoring.events import WorkerMetrics
from interlock.monitoring.llm import LLMMetrics
from interlock.monitoring.metrics import ServingMetrics
from interlock.registry import Registry
from interlock.resilience.breaker import BreakerConfig
from interlock.resilience.supervisor import Supervisor
from interlock.runtime.loaders import inspect_artifact
from interlock.serving.announce import Announcer
from interlock.serving.dedupe import Dedupe, open_dedupe
from interlock.serving.loadcheck import ArtifactLoader, ManagerLoader
from interlock.serving.models import ModelManager
from interlock.serving.pipeline import Pipeline
from interlock.serving.policies import PolicyStore
from interlock.serving.router import RouterObserver, TrafficRouter
from interlock.serving.shadow import ShadowRunner
from interlock.serving.worker import PredictionWorker
from interlock.settings import Settings
from interlock.store.artifacts import ArtifactStore
from interlock.store.db import Database
from interlock.store.redis import observe as observe_redis

__all__ = [
    "Components",
    "WorkerProcess",
    "build_components",
    "build_worker",
    "close_worker",
    "create_app",
    "open_database",
    "open_event_bus",
    "open_registry",
    "open_traffic_admin",
    "start_components",
    "stop_components",
]

log = logging.getLogger("interlock")


@dataclass(slots=True)
class Components:
    """The long-lived parts of one serving process."""

    settings: Settings
    database: Database
    artifacts: ArtifactStore
    registry: Registry
    metrics: ServingMetrics
    manager: ModelManager
    policies: PolicyStore
    router: TrafficRouter
    shadow: ShadowRunner
    cache: Cache | None
    pipeline: Pipeline
    gateway: Gateway | None = None
    announcer: Announcer | None = None
    supervisor: Supervisor = field(default_factory=Supervisor)  # every background loop


class _Observers:
    """Canary decisions to the metrics and to the bus."""

    def __init__(self, metrics: ServingMetrics, announcer: Announcer) -> None:
        self._metrics = metrics
        self._announcer = announcer

    def canary_changed(
        self, model: str, version: int, weight: float, action: str, reason: str = ""
    ) -> None:
        self._metrics.canary_changed(model, version, weight, action, reason)
        self._announcer.canary_changed(model, version, weight, action, reason)


def _registry(settings: Settings) -> tuple[Database, ArtifactStore, Registry]:
    database = Database(settings.effective_database_url)
    artifacts = ArtifactStore(settings.effective_artifacts_dir)
    registry = Registry(database, artifacts, inspect_artifact, SystemClock())
    return database, artifacts, registry


@contextlib.asynccontextmanager
async def open_registry(settings: Settings) -> AsyncIterator[Registry]:
    """A migrated registry for one-off work (the CLI), closed on exit."""
    database, _artifacts, registry = _registry(settings)
    try:
        await asyncio.to_thread(database.migrate)
        yield registry
    finally:
        await database.aclose()


def _keys(secrets: Any) -> tuple[bytes, ...]:
    return tuple(s.get_secret_value().encode() for s in secrets)


def build_components(settings: Settings) -> Components:
    clock = SystemClock()
    database, artifacts, registry = _registry(settings)
    metrics = ServingMetrics()
    observe_redis(metrics)  # outages of every Redis caller: failures and a down gauge
    supervisor = Supervisor(observer=metrics)  # failing loops: the metric and readiness
    manager = ModelManager(registry, artifacts, settings.serving, metrics, supervisor=supervisor)
    policies = PolicyStore(database, registry, clock, loader=ManagerLoader(manager))
    announcer = None
    observer: RouterObserver = metrics
    if not settings.bus.url.startswith("memory:"):
        bus = open_event_bus(settings)
        announcer = Announcer(bus, completed_topic=settings.bus.completed_topic)
        observer = _Observers(metrics, announcer)
    router = TrafficRouter(
        policies,
        manager,
        clock,
        registry=registry,
        refresh_s=settings.serving.alias_refresh_s,
        observer=observer,
        supervisor=supervisor,
    )
    shadow = ShadowRunner(metrics, clock)
    cache = (
        open_cache(
            settings.cache.url,
            max_bytes=settings.cache.max_bytes,
            timeout_s=settings.cache.timeout_ms / 1000,
            clock=clock,
        )
        if settings.cache.enabled
        else None
    )
    pipeline = Pipeline(
        manager,
        router,
        shadow,
        metrics,
        clock,
        breaker=BreakerConfig.from_settings(settings.breaker),
        cache=cache,
        cache_ttl_s=settings.cache.ttl_s,
    )
    metrics.watch_queues(
        lambda: [
            (
                m.name,
                m.number,
                m.batcher.queued_rows,
                m.batcher.busy,
                m.batcher.replicas,
                m.batcher.queue_delay_s,
            )
            for m in manager.loaded()
        ]
    )
    gateway = None
    if settings.llm.models:
        gateway = open_gateway(
            settings,
            database=database,
            metrics=LLMMetrics(metrics.registry),
            clock=clock,
            supervisor=supervisor,
        )
    return Components(
        settings,
        database,
        artifacts,
        registry,
        metrics,
        manager,
        policies,
        router,
        shadow,
        cache,
        pipeline,
        gateway,
        announcer,
        supervisor=supervisor,
    )


async def _preload(components: Components) -> None:
    """Load every model's default route before taking traffic; failures are only logged."""
    for name in await components.registry.routing():
        try:
            await components.manager.get(name)
        except InterlockError as exc:
            log.error("model failed to preload", extra={"model": name, "error": str(exc)})


async def start_components(parts: Components) -> None:
    """Migrate, load every model's default route, start the background work."""
    await asyncio.to_thread(parts.database.migrate)
    await _preload(parts)
    await parts.manager.start()
    await parts.router.start()
    if parts.gateway is not None:
        await parts.gateway.__aenter__()


async def stop_components(parts: Components) -> None:
    """Stop what :func:`start_components` started and release every connection."""
    if parts.gateway is not None:
        await parts.gateway.aclose()
    await parts.router.aclose()
    await parts.shadow.aclose()
    await parts.pipeline.aclose()
    if parts.cache is not None:
        await parts.cache.aclose()
    await parts.manager.aclose()
    if parts.announcer is not None:
        await parts.announcer.aclose()
    await parts.supervisor.aclose()  # any loop its owner did not stop
    await parts.database.aclose()


def create_app(settings: Settings, components: Components | None = None) -> ASGIApp:
    """The ASGI app of ``interlock serve``."""
    parts = components or build_components(settings)
    admin_keys = _keys([settings.auth.admin_key] if settings.auth.admin_key else [])
    client_keys = _keys(settings.auth.client_keys) + admin_keys if settings.auth.client_keys else ()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await start_components(parts)
        log.info("interlock is serving", extra={"version": __version__})
        try:
            yield {"components": parts}
        finally:
            await stop_components(parts)

    api = FastAPI(
        title="interlock",
        version=__version__,
        lifespan=lifespan,
    )

    @api.exception_handler(InterlockError)
    async def interlock_error(_request: Request, exc: InterlockError) -> JSONResponse:
        status = status_for(exc)
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = validation_error(exc.errors())
        return JSONResponse({"error": message}, status_code=status)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    async def versions_of(name: str) -> list[int]:
        return (await parts.registry.get_model(name)).versions

    api.include_router(
        build_inference_router(
            parts.manager,
            parts.metrics,
            versions_of,
            client_keys,
            failing_loops=parts.supervisor.failing,
        )
    )
    api.include_router(
        build_admin_router(
            parts.registry,
            parts.manager,
            parts.shadow,
            admin_keys,
            allow_code_uploads=settings.auth.allow_code_uploads,
        )
    )
    api.include_router(build_traffic_router(parts.policies, parts.router.refresh, admin_keys))
    install_openapi(
        api,
        client_auth=bool(client_keys),
        llm_models=[m.name for m in settings.llm.models] if parts.gateway is not None else None,
        llm_auth=bool(settings.llm.tenants),
    )
    # Browser and loopback checks before any admin route; a request id on every answer.
    inner: ASGIApp = RequestIds(AdminGuard(api, open_admin=not admin_keys))
    if parts.gateway is not None:

        async def usage(**query: object) -> dict[str, object]:
            return await usage_summary(parts.database, **query)  # type: ignore[arg-type]

        admin_key = settings.auth.admin_key
        inner = LLMApp(
            parts.gateway,
            inner,
            usage=usage,
            admin_key=admin_key.get_secret_value().encode() if admin_key else None,
            max_body_bytes=settings.server.max_body_bytes,
        )
    return PredictionApp(
        parts.pipeline,
        parts.metrics,
        inner,
        max_body_bytes=settings.server.max_body_bytes,
        default_timeout_ms=settings.serving.default_timeout_ms,
        client_keys=client_keys,
        announce=(
            parts.announcer.prediction
            if parts.announcer is not None and settings.bus.publish_http
            else None
        ),
    )


# -- one-off and worker processes (the CLI) ---------------------------------------------


def open_event_bus(settings: Settings) -> EventBus:
    """The bus of ``settings.bus.url``, with its options; it connects on first use."""
    return open_bus(settings.bus.url, **bus_options(settings.bus))


@contextlib.asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    """The migrated metadata database for one-off work (the CLI), closed on exit."""
    database = Database(settings.effective_database_url)
    try:
        await asyncio.to_thread(database.migrate)
        yield database
    finally:
        await database.aclose()


@contextlib.asynccontextmanager
async def open_traffic_admin(settings: Settings) -> AsyncIterator[PolicyStore]:
    """A policy store for ``interlock traffic``: it loads versions in this process.

    ``set`` and ``canary`` warm each version they send requests to with an
    :class:`ArtifactLoader` before the change is written (no model manager runs here).
    """
    database, artifacts, registry = _registry(settings)
    try:
        await asyncio.to_thread(database.migrate)
        loader = ArtifactLoader(registry, artifacts)
        yield PolicyStore(database, registry, SystemClock(), loader=loader)
    finally:
        await database.aclose()


@dataclass(slots=True)
class WorkerProcess:
    """What ``interlock worker`` runs: the serving components and the bus consumer."""

    components: Components
    bus: EventBus
    dedupe: Dedupe
    metrics: WorkerMetrics
    worker: PredictionWorker


def build_worker(settings: Settings, *, consumer: str) -> WorkerProcess:
    """The event worker of ``settings.bus`` as ``consumer``; nothing connects yet.

    The idempotency records go to ``bus.dedupe_url``, else the bus's Redis when the bus
    is Redis, else the metadata database.
    """
    parts = build_components(settings)
    bus = open_event_bus(settings)
    dedupe_url = settings.bus.dedupe_url
    if dedupe_url is None and settings.bus.url.split(":", 1)[0] in ("redis", "rediss", "unix"):
        dedupe_url = settings.bus.url
    dedupe = open_dedupe(dedupe_url, settings.bus.dedupe_ttl_s, database=parts.database)
    metrics = WorkerMetrics(parts.metrics.registry)
    worker = PredictionWorker(
        bus, parts.pipeline, dedupe, settings.bus, consumer=consumer, observer=metrics
    )
    return WorkerProcess(parts, bus, dedupe, metrics, worker)


async def close_worker(process: WorkerProcess) -> None:
    """Release the bus, the idempotency store and the components (started or not)."""
    await process.bus.aclose()
    await process.dedupe.aclose()
    await stop_components(process.components)
