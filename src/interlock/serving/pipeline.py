"""The prediction pipeline: route → cache → breaker → batcher → fallback → shadow.

One call answers one request, over HTTP or from the bus:

1. **Route.** A bare model name follows its traffic policy (weights, sticky route key,
   canary); ``name@alias`` and pinned versions go where they say.
2. **Cache.** Each row is looked up by version + its canonical bytes; only the rows that
   miss go to the model, and identical concurrent misses share one prediction
   (:class:`~interlock.resilience.coalesce.SingleFlight`: a cancelled request never
   fails the others waiting on its prediction).
3. **Breaker.** A version whose breaker is open is not called.
4. **Batcher.** The rows queue for the version's workers under the request's deadline;
   a full queue sheds the request with a 429.
5. **Fallback.** When the chosen version fails, times out or is open: the stable version
   (the canary's, else the champion), else the policy's static answer marked
   ``degraded``, else 503 with Retry-After. A failing canary costs the client nothing.
6. **Shadow.** After the answer, a copy goes to the shadow version in the background.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from interlock._core.clock import Clock
from interlock.cache import Cache, MemoryCache
from interlock.errors import (
    CircuitOpenError,
    DeadlineExceededError,
    InterlockError,
    PredictionError,
    RuntimeLoadError,
    UnavailableError,
)
from interlock.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from interlock.resilience.coalesce import SingleFlight
from interlock.serving.decode import Decoder
from interlock.serving.models import LoadedModel, ModelManager
from interlock.serving.router import TrafficRouter
from interlock.serving.shadow import ShadowRunner

__all__ = ["Answer", "Pipeline", "PipelineObserver"]

Decode = Callable[[Decoder], tuple[Any, int]]

# Failures that make the pipeline try the fallback; a client's own mistakes
# (FeatureError, MalformedInputError) and shedding (OverloadedError) do not.
_FALL_BACK_ON = (PredictionError, DeadlineExceededError, CircuitOpenError, RuntimeLoadError)


@dataclass(slots=True)
class Answer:
    values: list[Any]
    model: str
    version: int
    cache: str = "miss"  # hit | miss | partial | off
    fallback: str | None = None  # stable | static
    degraded: bool = False


class PipelineObserver(Protocol):
    def cache_lookup(self, model: str, hits: int, misses: int) -> None: ...

    def fallback_used(self, model: str, failed_version: int, kind: str) -> None: ...

    def breaker_changed(self, model: str, version: int, state: BreakerState) -> None: ...


class Pipeline:
    """Answers predictions for every model of one serving process."""

    def __init__(
        self,
        manager: ModelManager,
        router: TrafficRouter,
        shadow: ShadowRunner,
        observer: PipelineObserver,
        clock: Clock,
        *,
        breaker: BreakerConfig,
        cache: Cache | None = None,
        cache_ttl_s: float = 60.0,
    ) -> None:
        self._manager = manager
        self._router = router
        self._shadow = shadow
        self._observer = observer
        self._clock = clock
        self._breaker_config = breaker
        self._breakers: dict[tuple[str, int], CircuitBreaker] = {}
        self._cache = cache
        self._inline_writes = isinstance(cache, MemoryCache)
        self._ttl = cache_ttl_s
        self._flight: SingleFlight[bytes, list[Any]] = SingleFlight()
        self._writes: set[asyncio.Task[None]] = set()
        self._pending: list[tuple[bytes, bytes]] = []

    # -- public ---------------------------------------------------------------------------

    async def predict(
        self,
        ref: str,
        version: int | None,
        decode: Decode,
        *,
        deadline: float,
        route_key: bytes | None = None,
        request_id: str | None = None,
    ) -> Answer:
        policy = None
        if version is None and "@" not in ref:
            policy = self._router.policies.get(ref)
        if policy is not None:
            primary = await self._manager.get(ref, self._router.choose(policy, route_key))
        else:
            # The common case, routed without a coroutine: a loaded default route.
            routed = self._manager.routed(ref) if version is None else None
            primary = routed if routed is not None else await self._manager.get(ref, version)
        batch, rows = decode(primary.decoder)
        try:
            if self._cache is None:
                values = await self._call(primary, batch, rows, deadline)
                answer = Answer(values, primary.name, primary.number, cache="off")
            else:
                values, cache_status = await self._run(primary, batch, rows, deadline)
                answer = Answer(values, primary.name, primary.number, cache=cache_status)
        except _FALL_BACK_ON as exc:
            answer = await self._fallback(primary, decode, deadline, exc)
        if policy is not None and policy.shadow is not None and policy.shadow != answer.version:
            self._start_shadow(answer, policy.shadow, decode, request_id)
        return answer

    def routes_by_key(self, ref: str) -> bool:
        """Whether ``ref`` is routed per request (its model has a traffic policy); if not,
        requests for it may be predicted together, whatever their route keys."""
        return "@" not in ref and ref in self._router.policies

    def breaker(self, model: str, version: int) -> CircuitBreaker:
        key = (model, version)
        breaker = self._breakers.get(key)
        if breaker is None:
            observer = self._observer

            def changed(_name: str, _old: BreakerState, new: BreakerState) -> None:
                observer.breaker_changed(model, version, new)

            breaker = CircuitBreaker(
                f"{model}@{version}", self._breaker_config, self._clock, on_transition=changed
            )
            self._breakers[key] = breaker
        return breaker

    def breakers(self) -> dict[tuple[str, int], CircuitBreaker]:
        return dict(self._breakers)

    def coalescing(self) -> int:
        """How many requests wait now on an identical prediction already running."""
        return self._flight.followers

    async def aclose(self) -> None:
        await asyncio.gather(*list(self._writes), return_exceptions=True)

    # -- one version ---------------------------------------------------------------------

    async def _run(
        self, loaded: LoadedModel, batch: Any, rows: int, deadline: float
    ) -> tuple[list[Any], str]:
        cache = self._cache
        if cache is None:
            return await self._call(loaded, batch, rows, deadline), "off"
        keys = _row_keys(loaded, batch, rows)
        cached = await cache.get_many(keys)
        missing = [i for i, value in enumerate(cached) if value is None]
        self._observer.cache_lookup(loaded.name, rows - len(missing), len(missing))
        if not missing:
            return [orjson.loads(v) for v in cached if v is not None], "hit"
        if len(missing) == rows:
            sub, sub_rows = batch, rows
        else:
            sub = [batch[i] for i in missing] if loaded.decoder.takes_rows else batch[missing]
            sub_rows = len(missing)
        # Identical concurrent misses share one prediction (a cancelled leader hands it over).
        fresh = await self._flight.do(
            b"\x00".join(keys[i] for i in missing), self._call(loaded, sub, sub_rows, deadline)
        )
        items = [(keys[i], orjson.dumps(v)) for i, v in zip(missing, fresh, strict=True)]
        if self._inline_writes:
            await cache.set_many(items, self._ttl)  # in memory: no I/O, visible at once
        else:
            self._store(cache, items)
        if len(missing) == rows:
            return fresh, "miss"
        out = [orjson.loads(v) if v is not None else None for v in cached]
        for i, value in zip(missing, fresh, strict=True):
            out[i] = value
        return out, "partial"

    async def _call(self, loaded: LoadedModel, batch: Any, rows: int, deadline: float) -> list[Any]:
        breaker = loaded.breaker
        if breaker is None:
            breaker = loaded.breaker = self.breaker(loaded.name, loaded.number)
        if not breaker.allow():
            raise CircuitOpenError(
                f"{loaded.name} version {loaded.number} is failing; its circuit is open",
                retry_after_s=breaker.retry_after_s(),
            )
        started = time.perf_counter()
        try:
            values = await loaded.batcher.submit(batch, rows, deadline)
        except (PredictionError, DeadlineExceededError):
            elapsed = time.perf_counter() - started
            breaker.record(elapsed, ok=False)
            if self._router.watching:
                self._router.record(loaded.name, loaded.number, elapsed, ok=False)
            raise
        except BaseException:
            breaker.release()
            raise
        elapsed = time.perf_counter() - started
        breaker.record(elapsed, ok=True)
        if self._router.watching:
            self._router.record(loaded.name, loaded.number, elapsed, ok=True)
        return values

    def _store(self, cache: Cache, items: list[tuple[bytes, bytes]]) -> None:
        """Write the misses behind the answer (a shared cache: one round trip per loop turn,
        for every request answered in it)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush, cache)
        self._pending.extend(items)

    def _flush(self, cache: Cache) -> None:
        items, self._pending = self._pending, []
        task = asyncio.create_task(cache.set_many(items, self._ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # -- when the chosen version cannot answer ----------------------------------------------

    async def _fallback(
        self, failed: LoadedModel, decode: Decode, deadline: float, error: InterlockError
    ) -> Answer:
        name = failed.name
        policy = self._router.policy(name)
        stable = await self._stable_version(name, failed.number)
        if stable is not None:
            try:
                loaded = await self._manager.get(name, stable)
                batch, rows = decode(loaded.decoder)
                values, cache_status = await self._run(loaded, batch, rows, deadline)
            except _FALL_BACK_ON:
                pass
            else:
                self._observer.fallback_used(name, failed.number, "stable")
                return Answer(values, name, stable, cache=cache_status, fallback="stable")
        if policy is not None and policy.fallback is not None:
            batch, rows = decode(failed.decoder)
            self._observer.fallback_used(name, failed.number, "static")
            static = policy.fallback.static
            return Answer(
                [static] * rows, name, failed.number, "off", fallback="static", degraded=True
            )
        retry = getattr(error, "retry_after_s", 1.0)
        raise UnavailableError(
            f"{name} version {failed.number} cannot answer ({error}) and no fallback can",
            retry_after_s=retry,
        ) from error

    async def _stable_version(self, name: str, failed: int) -> int | None:
        policy = self._router.policy(name)
        if policy is not None and policy.canary is not None and policy.canary.stable != failed:
            return policy.canary.stable
        try:
            default = await self._manager.get(name)
        except InterlockError:
            return None
        return default.number if default.number != failed else None

    # -- shadow ----------------------------------------------------------------------------

    def _start_shadow(
        self, answer: Answer, shadow: int, decode: Decode, request_id: str | None
    ) -> None:
        async def predict() -> list[Any]:
            loaded = await self._manager.get(answer.model, shadow)
            batch, rows = decode(loaded.decoder)
            return await loaded.batcher.submit(batch, rows, None)

        self._shadow.submit(
            answer.model, answer.version, shadow, answer.values, predict, request_id
        )


def _row_keys(loaded: LoadedModel, batch: Any, rows: int) -> list[bytes]:
    """One cache key per row: model, version and the row's canonical bytes."""
    prefix = loaded.cache_prefix
    if loaded.decoder.takes_rows:
        return [prefix + orjson.dumps(row, option=orjson.OPT_SORT_KEYS) for row in batch]
    raw = batch.tobytes() if batch.flags.c_contiguous else np.ascontiguousarray(batch).tobytes()
    if rows == 1:
        return [prefix + raw]
    width = len(raw) // rows
    return [prefix + raw[i * width : (i + 1) * width] for i in range(rows)]
