"""The LLM gateway: one call in, the most reliable and cheapest answer out.

A chat request goes, in order, through:

1. **Admission** (:mod:`~interlock.llm.admission`). The model must be configured. The
   tenant's budget must not be spent, and the tenant's RPM/TPM must have room.
2. **Cache** (:mod:`~interlock.llm.caching`). An exact hit answers at once; then a
   semantic hit when the model opted in. Identical concurrent misses share one call
   (:class:`~interlock.resilience.coalesce.SingleFlight`: a cancelled request hands the
   call to one still waiting, never failing it).
3. **Routing** (:mod:`~interlock.llm.attempts`). The model's deployments in the order
   its strategy gives, with retries, breakers and per-deployment limits, all under the
   request's deadline; then the model's fallback models, the same way.
4. **Last resort.** A stale cached answer (marked ``stale``), else
   :class:`~interlock.errors.UnavailableError` (503): never a hang.

Streams (:mod:`~interlock.llm.streaming`) may change deployment until their first
token. Usage, cost, budget spend and the limit reconciliation
(:mod:`~interlock.llm.accounting`) are recorded behind the answer, never before it.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, cast

from interlock._core.clock import Clock, SystemClock
from interlock.errors import UnavailableError
from interlock.llm.accounting import Accounting, Background
from interlock.llm.admission import Admission
from interlock.llm.attempts import Attempts
from interlock.llm.budgets import SpendLedger
from interlock.llm.cache import CacheControl, LLMCache
from interlock.llm.caching import GatewayCache
from interlock.llm.calls import CallInfo, ChatResult, ChatStream, StreamFailure, Tenant
from interlock.llm.limits import RateLimiter
from interlock.llm.observer import GatewayObserver, NullObserver
from interlock.llm.routing import DeploymentState
from interlock.llm.streaming import Streams, replay
from interlock.llm.tokens import load_encoding
from interlock.llm.types import Provider
from interlock.llm.usage import UsageRecorder
from interlock.llm.wire import ChatRequest
from interlock.resilience.coalesce import SingleFlight
from interlock.settings import LLMSettings

__all__ = [
    "CallInfo",
    "ChatResult",
    "ChatStream",
    "Gateway",
    "StreamFailure",
    "Tenant",
]

_CACHED = frozenset({"hit", "semantic", "stale", "coalesced"})


class Gateway:
    """Answers chat and embeddings requests for every configured LLM model.

    Built by :func:`~interlock.llm.open_gateway`; use as ``async with``. Safe for one
    event loop.
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
        observer: GatewayObserver | None = None,
        clock: Clock | None = None,
        tenant_keys: dict[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        observer = observer or NullObserver()
        clock = clock or SystemClock()
        self._providers = providers
        self._limiter = limiter
        self._ledger = ledger
        self._usage = usage
        self._background = Background()
        self._accounting = Accounting(
            settings,
            limiter=limiter,
            ledger=ledger,
            usage=usage,
            observer=observer,
            background=self._background,
        )
        self._admission = Admission(
            settings,
            limiter=limiter,
            ledger=ledger,
            observer=observer,
            tenant_keys=tenant_keys,
        )
        self._attempts = Attempts(
            settings,
            providers,
            admission=self._admission,
            accounting=self._accounting,
            observer=observer,
            clock=clock,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not secrets
        )
        self._caching = GatewayCache(
            cache,
            cache_sampled=settings.cache.cache_sampled,
            accounting=self._accounting,
            observer=observer,
            background=self._background,
        )
        self._streams = Streams(
            providers, accounting=self._accounting, caching=self._caching, observer=observer
        )
        self._observer = observer
        self._flight: SingleFlight[bytes, tuple[dict[str, Any], CallInfo]] = SingleFlight()

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        if self._admission.needs_tokens:
            await asyncio.to_thread(load_encoding)  # ~0.3 s, once: not on a request
        if self._usage is not None:
            await self._usage.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._background.wait()
        for provider in self._providers.values():
            await provider.aclose()
        if self._caching.cache is not None:
            await self._caching.cache.aclose()
        await self._limiter.aclose()
        await self._ledger.aclose()
        if self._usage is not None:
            await self._usage.aclose()

    # -- what clients may ask -------------------------------------------------------------

    @property
    def open(self) -> bool:
        """No tenants configured: every caller is welcome (the embedded demo)."""
        return not self._admission.tenants

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        """The tenant a key belongs to; AuthError when tenants exist and the key is unknown."""
        return self._admission.tenant_for_key(key)

    def models(self) -> list[dict[str, Any]]:
        """The ``GET /models`` list, in OpenAI's shape."""
        return [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "interlock"}
            for m in self.settings.models
        ]

    def deployment_states(self) -> dict[str, DeploymentState]:
        return dict(self._attempts.states)

    def coalescing(self) -> int:
        """How many requests wait now on an identical call already upstream."""
        return self._flight.followers

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
        deadline = self._admission.deadline(timeout_s)
        control = control or CacheControl()
        admitted = await self._admission.admit(body, tenant, info, deadline, kind="chat")
        request = cast(ChatRequest, body)  # admitted: its model and messages are checked
        model = admitted.model
        caching = self._caching
        status = "error"
        try:
            key = caching.key(request, admitted, control)
            if key is None:
                completion, _ = await self._attempts.chat(body, model, deadline, info)
            else:
                if control.read:
                    hit = await caching.get(key, request, admitted)
                    if hit is not None:
                        status = "ok"
                        return caching.answer(hit, admitted, info)
                completion, source = await self._flight.do(
                    key, self._attempts.chat(body, model, deadline, info)
                )
                if source is not info:  # another request's call answered this one
                    info.model, info.deployment = source.model, source.deployment
                    info.cache = "coalesced"
                    self._observer.cache_result(model.name, "coalesced")
                    status = "ok"
                    self._accounting.settle(
                        admitted.tenant, model.name, admitted.reservation, info, status, cost=0.0
                    )
                    return ChatResult(completion, info)
                if control.write:
                    caching.store_later(key, request, completion, admitted)
            status = "ok"
            return ChatResult(completion, info)
        except UnavailableError:
            stale = await caching.stale(request, admitted, control)
            if stale is None:
                raise
            status = "ok"
            return caching.answer(stale, admitted, info)
        finally:
            if info.cache not in _CACHED:
                self._accounting.settle(
                    admitted.tenant, model.name, admitted.reservation, info, status, cost=None
                )

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
        deadline = self._admission.deadline(timeout_s)
        control = control or CacheControl()
        admitted = await self._admission.admit(body, tenant, info, deadline, kind="chat")
        request = cast(ChatRequest, body)  # admitted: its model and messages are checked
        caching = self._caching
        try:
            key = caching.key(request, admitted, control)
            if key is not None and control.read:
                hit = await caching.get(key, request, admitted)
                if hit is not None:
                    return replay(info, caching.answer(hit, admitted, info).completion)
            try:
                _, opened = await self._attempts.walk(
                    admitted.model, body, deadline, info, self._streams.open
                )
            except UnavailableError:
                stale = await caching.stale(request, admitted, control)
                if stale is None:
                    raise
                return replay(info, caching.answer(stale, admitted, info).completion)
        except BaseException:
            self._accounting.settle(
                admitted.tenant, admitted.model.name, admitted.reservation, info, "error", cost=None
            )
            raise
        self._observer.first_token(info.model, time.perf_counter() - info.started)
        relay = self._streams.relay(opened, request, admitted, info, key if control.write else None)
        return ChatStream(info, relay, ready=len(opened[2]))

    # -- embeddings ---------------------------------------------------------------------------

    async def embeddings(
        self, body: dict[str, Any], *, tenant: Tenant | None = None, timeout_s: float | None = None
    ) -> ChatResult:
        info = CallInfo(model="", started=time.perf_counter())
        deadline = self._admission.deadline(timeout_s)
        admitted = await self._admission.admit(body, tenant, info, deadline, kind="embeddings")
        status = "error"
        try:
            result = await self._attempts.embeddings(body, admitted.model, deadline, info)
            status = "ok"
            return ChatResult(result, info)
        finally:
            self._accounting.settle(
                admitted.tenant,
                admitted.model.name,
                admitted.reservation,
                info,
                status,
                cost=None,
                kind="embeddings",
            )
