"""The gateway's side of the answer cache (:mod:`interlock.llm.cache`).

An exact hit (same canonical request, same tenant and model) answers at once; then a
semantic hit when the model opted in. A fresh answer is stored *behind* the response:
staged in the cache at once (the same call made right after it hits), and written to the
store by one task per loop turn for every answer of that turn. When nothing upstream
answers, a stale entry is the last resort (marked ``stale``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from interlock.llm.accounting import Accounting, Background
from interlock.llm.admission import Admitted
from interlock.llm.cache import CacheControl, CachedAnswer, LLMCache
from interlock.llm.calls import CallInfo, ChatResult
from interlock.llm.observer import GatewayObserver
from interlock.llm.types import Usage
from interlock.llm.wire import ChatRequest

__all__ = ["GatewayCache"]

_Put = tuple[bytes, ChatRequest, dict[str, Any], Admitted]


class GatewayCache:
    """Cache lookups, hits, stores and stale answers, for the gateway's calls."""

    def __init__(
        self,
        cache: LLMCache | None,
        *,
        cache_sampled: bool,
        accounting: Accounting,
        observer: GatewayObserver,
        background: Background,
    ) -> None:
        self.cache = cache
        self._cache_sampled = cache_sampled
        self._accounting = accounting
        self._observer = observer
        self._background = background
        self._puts: list[_Put] = []

    def key(self, body: ChatRequest, admitted: Admitted, control: CacheControl) -> bytes | None:
        """The request's key, or None when it is not cached (or there is no cache)."""
        if self.cache is None:
            return None
        return self.cache.key(
            body, scope=admitted.scope, control=control, sampled_ok=self._cache_sampled
        )

    async def get(self, key: bytes, body: ChatRequest, admitted: Admitted) -> CachedAnswer | None:
        if self.cache is None:
            return None
        model = admitted.model
        hit = await self.cache.get(
            key,
            body,
            scope=admitted.scope,
            semantic=model.semantic_cache,
            threshold=model.semantic_threshold,
        )
        if hit is None:
            self._observer.cache_result(model.name, "miss")
        return hit

    async def stale(
        self, body: ChatRequest, admitted: Admitted, control: CacheControl
    ) -> CachedAnswer | None:
        """The stored answer however old, for when nothing upstream answers."""
        if self.cache is None:
            return None
        key = self.cache.key(body, scope=admitted.scope, control=control, sampled_ok=True)
        if key is None:
            return None
        stale = await self.cache.get_stale(key)
        if stale is not None:
            stale.stale = True
        return stale

    def answer(self, hit: CachedAnswer, admitted: Admitted, info: CallInfo) -> ChatResult:
        """Answer from the cache: counted, costing nothing, and what it saved recorded."""
        model = admitted.model.name
        if hit.stale:
            info.cache = "stale"
            self._observer.fallback_used(model, "stale")
        else:
            info.cache = "hit" if hit.similarity is None else "semantic"
        self._observer.cache_result(model, info.cache)
        usage = Usage.from_openai(hit.completion.get("usage"))
        saved = self._accounting.cost(admitted.model.deployments[0], usage)
        info.usage = Usage()
        self._observer.cache_saved(model, saved)
        self._accounting.settle(
            admitted.tenant,
            model,
            admitted.reservation,
            info,
            "ok",
            cost=0.0,
            saved=saved,
        )
        return ChatResult(hit.completion, info)

    def store_later(
        self, key: bytes, body: ChatRequest, completion: dict[str, Any], admitted: Admitted
    ) -> None:
        """Store behind the answer: one task per loop turn for every answer of that turn.

        The answer is staged in the cache first, so the same call made as soon as this
        one is answered hits (the store has it a loop turn later).
        """
        if self.cache is not None:
            self.cache.stage(key, completion)
        if not self._puts:
            asyncio.get_running_loop().call_soon(self._flush)
        self._puts.append((key, body, completion, admitted))

    def _flush(self) -> None:
        puts, self._puts = self._puts, []
        self._background.spawn(self._put_all(puts))

    async def _put_all(self, puts: list[_Put]) -> None:
        cache = self.cache
        if cache is None:
            return
        for key, body, completion, admitted in puts:
            await cache.put(
                key,
                body,
                completion,
                scope=admitted.scope,
                semantic=admitted.model.semantic_cache,
            )
