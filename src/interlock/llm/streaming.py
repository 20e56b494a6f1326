"""Streams: open upstream up to the first token, then relay to the end.

A stream may change deployment until its first token is produced (the attempt loop
opens it, reading up to that token); after that a failure ends it with a
:class:`~interlock.llm.calls.StreamFailure`, never a clean finish. The relayed chunks
are assembled into a whole completion at the end, for the usage (counted here when the
upstream did not report it) and the cache.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from interlock.errors import UpstreamError
from interlock.llm.accounting import Accounting
from interlock.llm.admission import Admitted
from interlock.llm.caching import GatewayCache
from interlock.llm.calls import CallInfo, ChatStream, StreamFailure
from interlock.llm.chunks import chunks_to_completion, completion_to_chunks
from interlock.llm.observer import GatewayObserver
from interlock.llm.routing import DeploymentState
from interlock.llm.tokens import count_prompt_tokens, count_text_tokens
from interlock.llm.types import Chunk, Provider, Usage
from interlock.llm.wire import ChatRequest

__all__ = ["Opened", "Streams", "replay"]

log = logging.getLogger("interlock.llm")

Opened = tuple[DeploymentState, AsyncIterator[Chunk], list[Chunk]]
"""A stream open upstream: its deployment, the rest of its chunks, the chunks read so far."""


class Streams:
    """Opens upstream streams and relays them, settling the call at the end."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        accounting: Accounting,
        caching: GatewayCache,
        observer: GatewayObserver,
    ) -> None:
        self._providers = providers
        self._accounting = accounting
        self._caching = caching
        self._observer = observer

    async def open(self, state: DeploymentState, body: dict[str, Any], timeout_s: float) -> Opened:
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

    async def relay(
        self,
        opened: Opened,
        body: ChatRequest,
        admitted: Admitted,
        info: CallInfo,
        cache_key: bytes | None,
    ) -> AsyncIterator[Chunk | StreamFailure]:
        """The chunks to the client; then usage, cost and the cache store (if finished)."""
        state, chunks, first = opened
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
                self._observer.upstream_failed(state.name, exc.kind)
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
            completion = chunks_to_completion(seen) if seen else None
            if completion is not None:
                usage = Usage.from_openai(completion.get("usage"))
                if usage.total_tokens == 0:
                    usage = _estimate_usage(body, completion)
                info.usage = usage
            self._accounting.settle(
                admitted.tenant,
                admitted.model.name,
                admitted.reservation,
                info,
                status,
                cost=None,
            )
            if finished and cache_key is not None and completion is not None:
                self._caching.store_later(cache_key, body, completion, admitted)


def replay(info: CallInfo, completion: dict[str, Any]) -> ChatStream:
    """A cached answer as a stream: every chunk ready at once."""
    chunks = completion_to_chunks(completion)

    async def iterate() -> AsyncIterator[Chunk | StreamFailure]:
        for chunk in chunks:
            yield chunk

    return ChatStream(info, iterate(), ready=len(chunks))


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


def _estimate_usage(body: ChatRequest, completion: dict[str, Any]) -> Usage:
    """Usage counted here when an upstream stream did not report it."""
    text = ""
    for choice in completion.get("choices") or ():
        text += (choice.get("message") or {}).get("content") or ""
    return Usage(count_prompt_tokens(body), count_text_tokens(text))
