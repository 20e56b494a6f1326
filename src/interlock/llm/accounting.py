"""After the answer: usage, cost, budget spend, the limits' reconciliation and metrics.

Nothing here is awaited on a request's path: :meth:`Accounting.settle` counts in memory
and hands the writes (the spend ledger, the limiter's reconciliation) to background
tasks, which :class:`Background` keeps until they end and waits for on close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime

from interlock.llm.budgets import SpendLedger
from interlock.llm.calls import CallInfo, Tenant
from interlock.llm.limits import RateLimiter, Reservation
from interlock.llm.observer import GatewayObserver
from interlock.llm.types import Usage
from interlock.llm.usage import UsageRecord, UsageRecorder
from interlock.settings import LLMSettings

__all__ = ["Accounting", "Background"]

log = logging.getLogger("interlock.llm")


class Background:
    """The gateway's bookkeeping tasks: kept until done; a failure is logged once."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("LLM bookkeeping failed", extra={"error": type(task.exception()).__name__})

    async def wait(self) -> None:
        """Until every task spawned so far has ended."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Accounting:
    """Costs a call and records it: metrics, spend, usage rows, limit reconciliation."""

    def __init__(
        self,
        settings: LLMSettings,
        *,
        limiter: RateLimiter,
        ledger: SpendLedger,
        usage: UsageRecorder | None,
        observer: GatewayObserver,
        background: Background,
    ) -> None:
        self._deployments = {d.name: d for d in settings.deployments}
        self._limiter = limiter
        self._ledger = ledger
        self._usage = usage
        self._observer = observer
        self._background = background

    def cost(self, deployment: str | None, usage: Usage) -> float:
        """What ``usage`` costs on ``deployment`` in USD (0 when no deployment answered)."""
        if deployment is None:
            return 0.0
        dep = self._deployments[deployment]
        return (
            usage.prompt_tokens * dep.input_cost_per_1k
            + usage.completion_tokens * dep.output_cost_per_1k
        ) / 1000.0

    def release(self, reservation: Reservation | None) -> None:
        """Give a reservation back unused (the attempt it was for did not happen)."""
        if reservation is not None:
            self._background.spawn(self._limiter.reconcile(reservation, 0))

    def settle(
        self,
        tenant: Tenant | None,
        model: str,
        reservation: Reservation | None,
        info: CallInfo,
        status: str,
        *,
        cost: float | None,
        saved: float = 0.0,
        kind: str = "chat",
    ) -> None:
        """Record usage, spend, metrics and the reconciliations: never awaited."""
        usage = info.usage
        if cost is None:
            cost = self.cost(info.deployment, usage)
        tenant_name = tenant.name if tenant is not None else ""
        self._observer.answered(
            model,
            info.deployment or "",
            tenant_name,
            status,
            usage.prompt_tokens,
            usage.completion_tokens,
            cost,
            info.overhead_ms() / 1000.0,
        )
        spawn = self._background.spawn
        if cost and tenant is not None:
            spawn(self._ledger.add(tenant.name, cost))
        if reservation is not None:
            spawn(self._limiter.reconcile(reservation, usage.total_tokens))
        for taken in info.reservations:
            spawn(self._limiter.reconcile(taken, usage.total_tokens))
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
