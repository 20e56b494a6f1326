"""The LLM gateway: one call in, the most reliable and cheapest answer out.

A chat request goes, in order, through:

1. **Admission.** The model must be configured. The tenant's budget must not be spent,
   and the tenant's RPM/TPM must have room: the prompt's tokens (tiktoken) plus
   ``max_tokens`` are reserved, and reconciled with the real usage afterwards.
2. **Cache.** An exact hit (same canonical request, same tenant) answers at once; then a
   semantic hit when the model opted in. Identical concurrent misses share one call.
3. **Routing.** The model's deployments in the order its strategy gives, skipping open
   breakers and deployments whose own RPM/TPM is spent; each is retried on transient
   failures (backoff with full jitter, Retry-After honoured, a retry budget), all under
   the request's deadline. Then the model's fallback models, the same way.
4. **Last resort.** A stale cached answer (marked ``stale``), else
   :class:`~interlock.errors.UnavailableError` (503): never a hang.

A stream may change deployment until its first token is produced; after that a failure
ends it with an error event, never a clean finish. Usage, cost, budget spend and the
limit reconciliation are recorded behind the answer, never before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from interlock._core.clock import Clock, SystemClock
from interlock.errors import (
    AuthError,
    BudgetExceededError,
    ConfigError,
    DeadlineExceededError,
    InterlockError,
    MalformedInputError,
    ModelNotFoundError,
    RateLimitedError,
    UnavailableError,
    UpstreamError,
)
from interlock.llm.budgets import SpendLedger
from interlock.llm.cache import CacheControl, CachedAnswer, LLMCache, completion_to_chunks
from interlock.llm.cache import chunks_to_completion as assemble
from interlock.llm.limits import Limit, RateLimiter, Reservation, acquire_within
from interlock.llm.routing import DeploymentState, RetryBudget, backoff_s, order_deployments
from interlock.llm.tokens import (
    count_embedding_tokens,
    count_prompt_tokens,
    count_text_tokens,
    load_encoding,
)
from interlock.llm.types import Chunk, Provider, Usage
from interlock.llm.usage import UsageRecord, UsageRecorder
from interlock.monitoring.llm import LLMMetrics
from interlock.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from interlock.settings import LLMModel, LLMSettings

__all__ = [
    "CallInfo",
    "ChatResult",
    "ChatStream",
    "Gateway",
    "StreamFailure",
    "Tenant",
    "tenant_keys_from_env",
]

log = logging.getLogger("interlock.llm")

T = TypeVar("T")

# Upstream statuses that say "this deployment is misconfigured", not "your request is bad":
# the next deployment may well answer.
_DEPLOYMENT_FAULT = frozenset({401, 403, 404})


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    limit: Limit | None = None
    budget_day: float | None = None
    budget_month: float | None = None


@dataclass(slots=True)
class CallInfo:
    """How a request was answered: what the response headers report."""

    model: str  # the model that answered (a fallback's name after a fallback)
    deployment: str | None = None
    attempts: int = 0
    cache: str = "miss"  # hit | semantic | miss | stale | coalesced | off
    fallback: bool = False
    upstream_s: float = 0.0  # time spent waiting on upstreams
    started: float = 0.0  # perf_counter at arrival
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*
    usage: Usage = field(default_factory=Usage)
    reservations: list[Reservation] = field(default_factory=list)  # deployments' limits
    result: Any = None  # the answer, once there is one

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.upstream_s) * 1000.0)


@dataclass(slots=True)
class ChatResult:
    completion: dict[str, Any]
    info: CallInfo


@dataclass(frozen=True, slots=True)
class StreamFailure:
    """Ends a stream that broke after its first token: sent as an error event."""

    message: str
    kind: str


@dataclass(slots=True)
class _Admission:
    tenant: Tenant | None
    model: LLMModel
    tokens: int
    reservation: Reservation | None


class ChatStream:
    """A stream whose first token is in hand: ``info`` is final, iterate for the chunks.

    The iteration yields chunk dicts, and a :class:`StreamFailure` last when the
    upstream broke mid-way; its first ``ready`` items are already in hand (up to the first
    token; all of a cached answer's), so a server can send them in one write. Leaving the
    iteration early closes the upstream stream.
    """

    def __init__(
        self, info: CallInfo, chunks: AsyncIterator[Chunk | StreamFailure], ready: int = 0
    ) -> None:
        self.info = info
        self.ready = ready
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[Chunk | StreamFailure]:
        return self._chunks

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class Gateway:
    """Answers chat and embeddings requests for every configured LLM model.

    Built by :meth:`open`; use as ``async with``. Safe for one event loop.
    """

    def __init__(
        self,
        settings: LLMSettings,
        providers: dict[str, Provider],
        *,
        limiter: RateLimiter,
        ledger: SpendLedger,
        cache: LLMCache | None = None,
        usage: UsageRecorder | None = None,
        metrics: LLMMetrics | None = None,
        clock: Clock | None = None,
        tenant_keys: dict[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._providers = providers
        self._limiter = limiter
        self._ledger = ledger
        self._cache = cache
        self._usage = usage
        self.metrics = metrics or LLMMetrics()
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._models = {m.name: m for m in settings.models}
        breaker = BreakerConfig.from_settings(settings.breaker)
        self._states: dict[str, DeploymentState] = {}
        for dep in settings.deployments:
            self._states[dep.name] = DeploymentState(
                dep, CircuitBreaker(dep.name, breaker, self._clock, self._on_breaker)
            )
            self.metrics.breaker_changed(dep.name, BreakerState.CLOSED)
        self._dep_limits = {
            d.name: Limit(f"deployment:{d.name}", d.rpm, d.tpm)
            for d in settings.deployments
            if d.rpm or d.tpm
        }
        self._tenants: dict[str, Tenant] = {}
        for t in settings.tenants:
            limit = Limit(f"tenant:{t.name}", t.rpm, t.tpm) if (t.rpm or t.tpm) else None
            self._tenants[t.name] = Tenant(
                t.name, limit, t.budget_usd_per_day, t.budget_usd_per_month
            )
        self._keys = dict(tenant_keys or {})  # key -> tenant name
        self._needs_tokens = any(lim.tpm for lim in self._dep_limits.values()) or any(
            t.limit is not None and t.limit.tpm for t in self._tenants.values()
        )
        retry = settings.retry
        self._retry = retry
        self._budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_s, self._clock)
        self._flights: dict[bytes, asyncio.Future[tuple[dict[str, Any], CallInfo]] | None] = {}
        self._puts: list[tuple[bytes, dict[str, Any], dict[str, Any], _Admission]] = []
        self._children: dict[tuple[str, str, str, str], _Children] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        if self._needs_tokens:
            await asyncio.to_thread(load_encoding)  # ~0.3 s, once: not on a request
        if self._usage is not None:
            await self._usage.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        for provider in self._providers.values():
            await provider.aclose()
        if self._cache is not None:
            await self._cache.aclose()
        await self._limiter.aclose()
        await self._ledger.aclose()
        if self._usage is not None:
            await self._usage.aclose()

    # -- what clients may ask -------------------------------------------------------------

    @property
    def open(self) -> bool:
        """No tenants configured: every caller is welcome (the embedded demo)."""
        return not self._tenants

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        """The tenant a key belongs to; AuthError when tenants exist and the key is unknown."""
        if not self._tenants:
            return None
        if not key:
            raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
        name = self._keys.get(key)
        if name is None:
            raise AuthError("the API key is not valid")
        return self._tenants[name]

    def models(self) -> list[dict[str, Any]]:
        """The ``GET /models`` list, in OpenAI's shape."""
        return [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "interlock"}
            for m in self.settings.models
        ]

    def deployment_states(self) -> dict[str, DeploymentState]:
        return dict(self._states)

    async def flush_usage(self) -> None:
        if self._usage is not None:
            await self._usage.flush()

    # -- chat ---------------------------------------------------------------------------------

    async def chat(
        self,
        body: dict[str, Any],
        *,
        tenant: Tenant | None = None,
        control: CacheControl | None = None,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """A whole chat completion for ``body`` (OpenAI's request shape, ``stream`` ignored)."""
        info = CallInfo(model="", started=time.perf_counter())
        deadline = self._deadline(timeout_s)
        control = control or CacheControl()
        admission = await self._admit(body, tenant, info, deadline, kind="chat")
        model = admission.model
        status = "error"
        try:
            key = self._cache_key(body, admission, control)
            if key is not None and control.read:
                hit = await self._cache_get(key, body, admission)
                if hit is not None:
                    status = "ok"
                    return self._answer_from_cache(hit, admission, info)
            if key is None:
                completion, _ = await self._complete(body, model, deadline, info)
            else:
                coalesced = await self._coalesced(key, body, model, deadline, info)
                if coalesced is not None:
                    completion = coalesced
                    status = "ok"
                    self._settle(admission, info, status, cost=0.0)
                    return ChatResult(completion, info)
                completion = info.result
                if control.write:
                    self._store_later(key, body, completion, admission)
            status = "ok"
            return ChatResult(completion, info)
        except UnavailableError:
            stale = await self._stale(body, admission, control)
            if stale is None:
                raise
            status = "ok"
            return self._answer_from_cache(stale, admission, info)
        finally:
            if info.cache not in ("hit", "semantic", "stale", "coalesced"):
                self._settle(admission, info, status, cost=None)

    async def _coalesced(
        self, key: bytes, body: dict[str, Any], model: LLMModel, deadline: float, info: CallInfo
    ) -> dict[str, Any] | None:
        """Identical concurrent misses share one upstream call.

        The first request calls inline (no task, and no future unless another joins: the
        hot path) and leaves its answer in ``info.result``; returns None. A request with the
        same key arriving meanwhile waits for that answer and returns it (marked
        ``coalesced``); if the first request is cancelled, it calls on its own.
        """
        flights = self._flights
        if key in flights:
            waiter = flights[key]
            if waiter is None:
                waiter = flights[key] = asyncio.get_running_loop().create_future()
            try:
                completion, leader = await asyncio.shield(waiter)
            except asyncio.CancelledError:
                if not waiter.cancelled():
                    raise  # this request itself was cancelled
            else:
                info.model, info.deployment = leader.model, leader.deployment
                info.cache = "coalesced"
                self.metrics.cache.labels(model.name, "coalesced").inc()
                return completion
            info.result, _ = await self._complete(body, model, deadline, info)
            return None
        flights[key] = None
        try:
            info.result, _ = await self._complete(body, model, deadline, info)
        except BaseException as exc:
            waiter = flights.pop(key, None)
            if waiter is not None:
                if isinstance(exc, Exception):
                    waiter.set_exception(exc)
                    waiter.exception()  # retrieved, whether or not a follower still waits
                else:
                    waiter.cancel()
            raise
        waiter = flights.pop(key, None)
        if waiter is not None:
            waiter.set_result((info.result, info))
        return None

    def _store_later(
        self, key: bytes, body: dict[str, Any], completion: dict[str, Any], admission: _Admission
    ) -> None:
        """Store behind the answer: one task per loop turn for every answer of that turn.

        The answer is staged in the cache first, so the same call made as soon as this
        one is answered hits (the store has it a loop turn later).
        """
        if self._cache is not None:
            self._cache.stage(key, completion)
        if not self._puts:
            asyncio.get_running_loop().call_soon(self._flush_puts)
        self._puts.append((key, body, completion, admission))

    def _flush_puts(self) -> None:
        puts, self._puts = self._puts, []
        self._spawn(self._put_all(puts))

    async def _put_all(
        self, puts: list[tuple[bytes, dict[str, Any], dict[str, Any], _Admission]]
    ) -> None:
        for key, body, completion, admission in puts:
            await self._cache_put(key, body, completion, admission)

    async def stream(
        self,
        body: dict[str, Any],
        *,
        tenant: Tenant | None = None,
        control: CacheControl | None = None,
        timeout_s: float | None = None,
    ) -> ChatStream:
        """A streamed chat completion, returned once its first token is in hand.

        Errors before that raise as :meth:`chat` does; after it, the stream ends with a
        :class:`StreamFailure`.
        """
        info = CallInfo(model="", started=time.perf_counter())
        deadline = self._deadline(timeout_s)
        control = control or CacheControl()
        admission = await self._admit(body, tenant, info, deadline, kind="chat")
        try:
            key = self._cache_key(body, admission, control)
            if key is not None and control.read:
                hit = await self._cache_get(key, body, admission)
                if hit is not None:
                    result = self._answer_from_cache(hit, admission, info)
                    return _replay(info, result.completion)
            try:
                _, (state, chunks, first) = await self._walk(
                    admission.model, body, deadline, info, self._open_stream
                )
            except UnavailableError:
                stale = await self._stale(body, admission, control)
                if stale is None:
                    raise
                result = self._answer_from_cache(stale, admission, info)
                return _replay(info, result.completion)
        except BaseException:
            self._settle(admission, info, "error", cost=None)
            raise
        self.metrics.ttft.labels(info.model).observe(time.perf_counter() - info.started)
        return ChatStream(
            info,
            self._relay(
                state, chunks, first, body, admission, info, key if control.write else None
            ),
            ready=len(first),
        )

    async def _open_stream(
        self, state: DeploymentState, body: dict[str, Any], timeout_s: float
    ) -> tuple[DeploymentState, AsyncIterator[Chunk], list[Chunk]]:
        """Open the upstream stream and read up to its first token (or its end)."""
        provider = self._providers[state.name]
        chunks = provider.stream_chat(body, timeout_s=timeout_s).__aiter__()
        first: list[Chunk] = []
        try:
            async for chunk in chunks:
                first.append(chunk)
                if _has_token(chunk):
                    break
        except BaseException:
            await _close(chunks)
            raise
        if not first:
            await _close(chunks)
            raise UpstreamError(
                "the stream ended before any chunk", kind="stream_cut", transient=True
            )
        return state, chunks, first

    async def _relay(
        self,
        state: DeploymentState,
        chunks: AsyncIterator[Chunk],
        first: list[Chunk],
        body: dict[str, Any],
        admission: _Admission,
        info: CallInfo,
        cache_key: bytes | None,
    ) -> AsyncIterator[Chunk | StreamFailure]:
        seen: list[Chunk] = list(first)
        status = "error"
        finished = False
        started = time.perf_counter()
        state.in_flight += 1
        try:
            for chunk in first:
                yield chunk
            try:
                async for chunk in chunks:
                    seen.append(chunk)
                    yield chunk
                finished = True
            except UpstreamError as exc:
                state.failed()
                self.metrics.upstream_errors.labels(state.name, exc.kind).inc()
                log.warning(
                    "LLM stream broke after its first token",
                    extra={"deployment": state.name, "kind": exc.kind},
                )
                yield StreamFailure(
                    f"the upstream stream broke after it started ({exc.kind}); "
                    "the answer is incomplete",
                    exc.kind,
                )
            status = "ok" if finished else "error"
        finally:
            state.in_flight -= 1
            info.upstream_s += time.perf_counter() - started
            await _close(chunks)
            completion = assemble(seen) if seen else None
            if completion is not None:
                usage = Usage.from_openai(completion.get("usage"))
                if usage.total_tokens == 0:
                    usage = _estimate_usage(body, completion)
                info.usage = usage
            self._settle(admission, info, status, cost=None)
            if finished and cache_key is not None and completion is not None:
                self._store_later(cache_key, body, completion, admission)

    # -- embeddings ---------------------------------------------------------------------------

    async def embeddings(
        self, body: dict[str, Any], *, tenant: Tenant | None = None, timeout_s: float | None = None
    ) -> ChatResult:
        info = CallInfo(model="", started=time.perf_counter())
        deadline = self._deadline(timeout_s)
        admission = await self._admit(body, tenant, info, deadline, kind="embeddings")
        status = "error"
        try:

            async def call(state: DeploymentState, b: dict[str, Any], limit_s: float) -> Any:
                return await self._providers[state.name].embeddings(b, timeout_s=limit_s)

            _state, reply = await self._walk(admission.model, body, deadline, info, call)
            info.usage = reply.usage
            status = "ok"
            return ChatResult(reply.body, info)
        finally:
            self._settle(admission, info, status, cost=None, kind="embeddings")

    # -- admission ---------------------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (timeout_s if timeout_s is not None else self._retry.timeout_s)

    async def _admit(
        self,
        body: dict[str, Any],
        tenant: Tenant | None,
        info: CallInfo,
        deadline: float,
        *,
        kind: str,
    ) -> _Admission:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise MalformedInputError("model: a model name is required")
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model: no LLM model named {name!r} is configured")
        info.model = model.name
        if self.settings.log_prompts:  # off by default: prompts are the users' data
            log.info("LLM request", extra={"model": name, "body": body})
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise MalformedInputError("messages: a non-empty list of messages is required")
        elif "input" not in body:
            raise MalformedInputError("input: the text to embed is required")
        tokens = 0
        if self._needs_tokens:
            tokens = self._reserve_tokens(body, kind)
        reservation = None
        if tenant is not None:
            if tenant.budget_day is not None or tenant.budget_month is not None:
                try:
                    await self._ledger.check(
                        tenant.name, per_day=tenant.budget_day, per_month=tenant.budget_month
                    )
                except BudgetExceededError:
                    self.metrics.rejections.labels(f"tenant:{tenant.name}", "budget").inc()
                    raise
            if tenant.limit is not None:
                reservation, quota = await self._acquire([tenant.limit], tokens, deadline)
                info.headers = quota
        return _Admission(tenant, model, tokens, reservation)

    def _reserve_tokens(self, body: dict[str, Any], kind: str) -> int:
        if kind == "embeddings":
            return count_embedding_tokens(body.get("input", ""))
        prompt = count_prompt_tokens(body)
        most = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        return prompt + (int(most) if isinstance(most, int | float) else 0)

    async def _acquire(
        self, limits: Sequence[Limit], tokens: int, deadline: float
    ) -> tuple[Reservation, dict[str, str]]:
        """Take room under ``limits``; with ``limits.queue``, wait for it until ``deadline``."""
        try:
            if self.settings.limits.queue:
                reservation, quota = await acquire_within(
                    self._limiter, limits, tokens, timeout_s=deadline - time.monotonic()
                )
            else:
                reservation, quota = await self._limiter.acquire(limits, tokens)
        except RateLimitedError as exc:
            self.metrics.rejections.labels(exc.limit.rsplit(":", 1)[0], "rate").inc()
            raise
        return reservation, quota.headers()

    # -- the cache ---------------------------------------------------------------------------

    def _cache_key(
        self, body: dict[str, Any], admission: _Admission, control: CacheControl
    ) -> bytes | None:
        if self._cache is None:
            return None
        return self._cache.key(
            body,
            scope=_scope(admission),
            control=control,
            sampled_ok=self.settings.cache.cache_sampled,
        )

    async def _cache_get(
        self, key: bytes, body: dict[str, Any], admission: _Admission
    ) -> CachedAnswer | None:
        if self._cache is None:
            return None
        model = admission.model
        hit = await self._cache.get(
            key,
            body,
            scope=_scope(admission),
            semantic=model.semantic_cache,
            threshold=model.semantic_threshold,
        )
        if hit is None:
            self.metrics.cache.labels(model.name, "miss").inc()
        return hit

    async def _cache_put(
        self, key: bytes, body: dict[str, Any], completion: dict[str, Any], admission: _Admission
    ) -> None:
        if self._cache is None:
            return
        await self._cache.put(
            key, body, completion, scope=_scope(admission), semantic=admission.model.semantic_cache
        )

    async def _stale(
        self, body: dict[str, Any], admission: _Admission, control: CacheControl
    ) -> CachedAnswer | None:
        if self._cache is None:
            return None
        key = self._cache.key(body, scope=_scope(admission), control=control, sampled_ok=True)
        if key is None:
            return None
        stale = await self._cache.get_stale(key)
        if stale is not None:
            stale.stale = True
        return stale

    def _answer_from_cache(
        self, hit: CachedAnswer, admission: _Admission, info: CallInfo
    ) -> ChatResult:
        model = admission.model.name
        if hit.stale:
            info.cache = "stale"
            self.metrics.fallbacks.labels(model, "stale").inc()
        else:
            info.cache = "hit" if hit.similarity is None else "semantic"
        self.metrics.cache.labels(model, info.cache).inc()
        usage = Usage.from_openai(hit.completion.get("usage"))
        saved = self._cost(admission.model.deployments[0], usage)
        info.usage = Usage()
        self.metrics.saved.labels(model).inc(saved)
        self._settle(admission, info, "ok", cost=0.0, saved=saved)
        return ChatResult(hit.completion, info)

    # -- routing ----------------------------------------------------------------------------

    async def _complete(
        self, body: dict[str, Any], model: LLMModel, deadline: float, info: CallInfo
    ) -> tuple[dict[str, Any], CallInfo]:
        async def call(state: DeploymentState, b: dict[str, Any], limit_s: float) -> Any:
            return await self._providers[state.name].chat(b, timeout_s=limit_s)

        _state, reply = await self._walk(model, body, deadline, info, call)
        info.usage = reply.usage
        return reply.body, info

    async def _walk(
        self,
        model: LLMModel,
        body: dict[str, Any],
        deadline: float,
        info: CallInfo,
        call: Callable[[DeploymentState, dict[str, Any], float], Awaitable[T]],
    ) -> tuple[DeploymentState, T]:
        """Try the model's deployments, then its fallbacks', until one answers."""
        self._budget.request()
        last: InterlockError | None = None
        retry_after = 1.0
        chain = [model, *(self._models[name] for name in model.fallbacks)]
        for position, current in enumerate(chain):
            states = [self._states[name] for name in current.deployments]
            for state in order_deployments(current.strategy, states, self._rng):
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"the request's deadline passed after {info.attempts} attempts"
                    )
                try:
                    result = await self._try_deployment(state, body, deadline, info, call)
                except UpstreamError as exc:
                    if not exc.transient and exc.status not in _DEPLOYMENT_FAULT:
                        info.deployment = state.name  # it answered: usage names it
                        raise  # the request itself is wrong: another deployment won't help
                    last = exc
                    if exc.retry_after_s:
                        retry_after = min(retry_after, exc.retry_after_s)
                    continue
                except (RateLimitedError, _SkippedError) as exc:
                    last = exc if isinstance(exc, InterlockError) else last
                    retry_after = min(retry_after, getattr(exc, "retry_after_s", retry_after))
                    continue
                if position > 0:
                    info.fallback = True
                    info.model = current.name
                    self.metrics.fallbacks.labels(model.name, current.name).inc()
                return state, result
        reason = f" (last: {last})" if last is not None else " (every circuit is open)"
        raise UnavailableError(
            f"no deployment of {model.name!r} or its fallbacks could answer{reason}",
            retry_after_s=retry_after,
        )

    async def _try_deployment(
        self,
        state: DeploymentState,
        body: dict[str, Any],
        deadline: float,
        info: CallInfo,
        call: Callable[[DeploymentState, dict[str, Any], float], Awaitable[T]],
    ) -> T:
        """Attempts on one deployment, retried on transient failures while allowed."""
        breaker = state.breaker
        if not breaker.allow():
            raise _SkippedError(retry_after_s=breaker.retry_after_s())
        limit = self._dep_limits.get(state.name)
        reservation: Reservation | None = None
        if limit is not None:
            try:
                reservation, _quota = await self._acquire([limit], self._tokens_of(body), deadline)
            except RateLimitedError:
                breaker.release()
                raise
        upstream_body = {**body, "model": state.config.model}
        attempt = 0
        while True:
            attempt += 1
            info.attempts += 1
            if attempt > 1:
                self.metrics.retries.labels(state.name).inc()
            timeout = min(state.config.timeout_s, deadline - time.monotonic())
            started = time.perf_counter()
            state.in_flight += 1
            try:
                result = await call(state, upstream_body, max(timeout, 0.001))
            except UpstreamError as exc:
                elapsed = time.perf_counter() - started
                info.upstream_s += elapsed
                self.metrics.upstream_errors.labels(state.name, exc.kind).inc()
                faulty = exc.transient or exc.status in _DEPLOYMENT_FAULT
                breaker.record(elapsed, ok=not faulty)
                if faulty:
                    state.failed()
                if not exc.transient or attempt >= self._retry.max_attempts:
                    self._release(reservation)
                    raise
                delay = backoff_s(attempt, self._retry, self._rng)
                if exc.retry_after_s is not None:
                    delay = max(delay, exc.retry_after_s)
                if time.monotonic() + delay >= deadline or not self._budget.try_retry():
                    self._release(reservation)
                    raise
                await asyncio.sleep(delay)
                if not breaker.allow():
                    self._release(reservation)
                    raise
                continue
            except BaseException:
                breaker.release()
                self._release(reservation)
                raise
            finally:
                state.in_flight -= 1
            elapsed = time.perf_counter() - started
            info.upstream_s += elapsed
            breaker.record(elapsed, ok=True)
            state.succeeded(elapsed)
            info.deployment = state.name
            if reservation is not None:
                info.reservations.append(reservation)  # reconciled once the usage is known
            return result

    def _tokens_of(self, body: dict[str, Any]) -> int:
        if not self._needs_tokens:
            return 0
        return self._reserve_tokens(body, "chat" if "messages" in body else "embeddings")

    def _release(self, reservation: Reservation | None) -> None:
        if reservation is not None:
            self._spawn(self._limiter.reconcile(reservation, 0))

    # -- after the answer --------------------------------------------------------------------

    def _cost(self, deployment: str | None, usage: Usage) -> float:
        if deployment is None:
            return 0.0
        dep = self._states[deployment].config
        return (
            usage.prompt_tokens * dep.input_cost_per_1k
            + usage.completion_tokens * dep.output_cost_per_1k
        ) / 1000.0

    def _settle(
        self,
        admission: _Admission,
        info: CallInfo,
        status: str,
        *,
        cost: float | None,
        saved: float = 0.0,
        kind: str = "chat",
    ) -> None:
        """Record usage, spend, metrics and the tenant's reconciliation: never awaited."""
        usage = info.usage
        if cost is None:
            cost = self._cost(info.deployment, usage)
        tenant = admission.tenant
        tenant_name = tenant.name if tenant is not None else ""
        model = admission.model.name
        dep = info.deployment or ""
        children = self._children.get((model, dep, tenant_name, status))
        if children is None:
            children = self._children[(model, dep, tenant_name, status)] = _Children(
                self.metrics, model, dep, tenant_name, status
            )
        children.requests.inc()
        if usage.prompt_tokens:
            children.prompt_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            children.completion_tokens.inc(usage.completion_tokens)
        if cost:
            children.cost.inc(cost)
            if tenant is not None:
                self._spawn(self._ledger.add(tenant.name, cost))
        for reservation in (admission.reservation, *info.reservations):
            if reservation is not None:
                self._spawn(self._limiter.reconcile(reservation, usage.total_tokens))
        children.overhead.observe(info.overhead_ms() / 1000.0)
        if self._usage is not None:
            self._usage.record(
                UsageRecord(
                    at=datetime.now(UTC),
                    tenant=tenant.name if tenant is not None else None,
                    model=model,
                    deployment=info.deployment,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cost_usd=cost,
                    cache_hit=info.cache in ("hit", "semantic", "stale"),
                    saved_cost_usd=saved,
                    status=status,
                    latency_ms=(time.perf_counter() - info.started) * 1000.0,
                    kind=kind,
                )
            )

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("LLM bookkeeping failed", extra={"error": type(task.exception()).__name__})

    def _on_breaker(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.metrics.breaker_changed(name, new)
        log.warning(
            "LLM deployment circuit changed", extra={"deployment": name, "from": old, "to": new}
        )


class _Children:
    """The metric children of one (model, deployment, tenant, status): looked up once."""

    __slots__ = ("completion_tokens", "cost", "overhead", "prompt_tokens", "requests")

    def __init__(self, metrics: LLMMetrics, model: str, dep: str, tenant: str, status: str):
        self.requests = metrics.requests.labels(model, dep, tenant, status)
        self.prompt_tokens = metrics.tokens.labels(model, dep, "prompt")
        self.completion_tokens = metrics.tokens.labels(model, dep, "completion")
        self.cost = metrics.cost.labels(model, dep, tenant)
        self.overhead = metrics.overhead.labels(model)


class _SkippedError(Exception):
    """A deployment not tried: its breaker is open."""

    def __init__(self, *, retry_after_s: float) -> None:
        super().__init__("circuit open")
        self.retry_after_s = retry_after_s


def _scope(admission: _Admission) -> str:
    tenant = admission.tenant.name if admission.tenant is not None else ""
    return f"{tenant}\x00{admission.model.name}"


def _has_token(chunk: Chunk) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return bool(chunk.get("usage")) and not chunk.get("choices")


async def _close(chunks: AsyncIterator[Chunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):  # a broken stream may fail to close: nothing to do
            await aclose()


def _replay(info: CallInfo, completion: dict[str, Any]) -> ChatStream:
    """A cached answer as a stream: every chunk ready at once."""
    chunks = completion_to_chunks(completion)

    async def iterate() -> AsyncIterator[Chunk | StreamFailure]:
        for chunk in chunks:
            yield chunk

    return ChatStream(info, iterate(), ready=len(chunks))


def _estimate_usage(body: dict[str, Any], completion: dict[str, Any]) -> Usage:
    """Usage counted here when an upstream stream did not report it."""
    text = ""
    for choice in completion.get("choices") or ():
        text += (choice.get("message") or {}).get("content") or ""
    return Usage(count_prompt_tokens(body), count_text_tokens(text))


def tenant_keys_from_env(settings: LLMSettings, environ: dict[str, str]) -> dict[str, str]:
    """Each tenant's key read from its variable; ConfigError names a missing variable."""
    keys: dict[str, str] = {}
    for tenant in settings.tenants:
        key = environ.get(tenant.key_env)
        if not key:
            raise ConfigError(
                f"tenant {tenant.name!r}: the variable {tenant.key_env} holding its key is not set"
            )
        keys[key] = tenant.name
    return keys
