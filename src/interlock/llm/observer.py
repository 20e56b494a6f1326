"""What the LLM gateway reports as it answers: a protocol, so that ``llm`` imports no
metrics library. :class:`~interlock.monitoring.llm.LLMMetrics` implements it (wired in
``app.py``); :class:`NullObserver` drops everything (the default of a bare gateway).

Every method is called on the event loop, on the request's path: keep them O(1).
"""

from __future__ import annotations

from typing import Protocol

from interlock.resilience.breaker import BreakerState

__all__ = ["GatewayObserver", "NullObserver"]


class GatewayObserver(Protocol):
    def answered(
        self,
        model: str,
        deployment: str,
        tenant: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        overhead_s: float,
    ) -> None:
        """A request ended (``status`` ok or error); ``deployment`` "" when none answered."""

    def cache_result(self, model: str, result: str) -> None:
        """A lookup's result: hit, semantic, miss, stale or coalesced."""

    def cache_saved(self, model: str, usd: float) -> None:
        """What an answer from the cache would have cost upstream."""

    def fallback_used(self, model: str, to: str) -> None:
        """``model`` was answered by the fallback model ``to``, or ``"stale"``."""

    def first_token(self, model: str, seconds: float) -> None:
        """A stream's first token arrived ``seconds`` after the request."""

    def retried(self, deployment: str) -> None:
        """An attempt after the first on ``deployment``."""

    def upstream_failed(self, deployment: str, kind: str) -> None:
        """A failed upstream attempt (http, timeout, connect, malformed, stream_cut)."""

    def rejected(self, limit: str, kind: str) -> None:
        """A request refused by a ``limit`` (``tenant:NAME``, ``deployment``) of ``kind``
        rate or budget."""

    def breaker_changed(self, deployment: str, state: BreakerState) -> None:
        """The deployment's circuit is now in ``state``."""


class NullObserver:
    """Observes nothing."""

    def answered(
        self,
        model: str,
        deployment: str,
        tenant: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        overhead_s: float,
    ) -> None:
        pass

    def cache_result(self, model: str, result: str) -> None:
        pass

    def cache_saved(self, model: str, usd: float) -> None:
        pass

    def fallback_used(self, model: str, to: str) -> None:
        pass

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def retried(self, deployment: str) -> None:
        pass

    def upstream_failed(self, deployment: str, kind: str) -> None:
        pass

    def rejected(self, limit: str, kind: str) -> None:
        pass

    def breaker_changed(self, deployment: str, state: BreakerState) -> None:
        pass
