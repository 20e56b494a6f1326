"""What one gateway call is and returns: its tenant, what happened on the way (the
response headers' facts), and the answer, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from interlock.llm.limits import Limit, Reservation
from interlock.llm.types import Chunk, Usage

__all__ = ["CallInfo", "ChatResult", "ChatStream", "StreamFailure", "Tenant"]


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
