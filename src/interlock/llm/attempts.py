"""The attempt loop: which deployment answers, and how often it is asked.

The model's deployments are tried in the order its strategy gives
(:func:`~interlock.llm.routing.order_deployments`), skipping open breakers and
deployments whose own RPM/TPM is spent; each is retried on transient failures (backoff
with full jitter, Retry-After honoured, a retry budget), all under the request's
deadline. Then the model's fallback models, the same way. A request the upstream calls
wrong (a 4xx other than 401/403/404) is not tried elsewhere. When nothing answers:
:class:`~interlock.errors.UnavailableError`, whose Retry-After is the soonest hint seen.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from interlock._core.clock import Clock
from interlock.errors import (
    DeadlineExceededError,
    InterlockError,
    RateLimitedError,
    UnavailableError,
    UpstreamError,
)
from interlock.llm.accounting import Accounting
from interlock.llm.admission import Admission
from interlock.llm.calls import CallInfo
from interlock.llm.limits import Limit, Reservation
from interlock.llm.observer import GatewayObserver
from interlock.llm.routing import DeploymentState, RetryBudget, backoff_s, order_deployments
from interlock.llm.types import Provider, Reply
from interlock.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from interlock.settings import LLMModel, LLMSettings

__all__ = ["Attempts", "Call"]

log = logging.getLogger("interlock.llm")

T = TypeVar("T")

Call = Callable[[DeploymentState, dict[str, Any], float], Awaitable[T]]
"""One attempt on a deployment: its state, the upstream body, the time allowed (s)."""

# Upstream statuses that say "this deployment is misconfigured", not "your request is bad":
# the next deployment may well answer.
_DEPLOYMENT_FAULT = frozenset({401, 403, 404})


class _SkippedError(Exception):
    """A deployment not tried: its breaker is open."""

    def __init__(self, *, retry_after_s: float) -> None:
        super().__init__("circuit open")
        self.retry_after_s = retry_after_s


class Attempts:
    """Routes a call over deployments and fallbacks, with retries and breakers."""

    def __init__(
        self,
        settings: LLMSettings,
        providers: Mapping[str, Provider],
        *,
        admission: Admission,
        accounting: Accounting,
        observer: GatewayObserver,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self._providers = providers
        self._admission = admission
        self._accounting = accounting
        self._observer = observer
        self._rng = rng
        self._retry = settings.retry
        self._budget = RetryBudget(
            settings.retry.budget_ratio, settings.retry.budget_min_per_s, clock
        )
        self._models = admission.models
        breaker = BreakerConfig.from_settings(settings.breaker)
        self.states: dict[str, DeploymentState] = {}
        for dep in settings.deployments:
            self.states[dep.name] = DeploymentState(
                dep, CircuitBreaker(dep.name, breaker, clock, self._on_breaker)
            )
            observer.breaker_changed(dep.name, BreakerState.CLOSED)
        self.limits = {
            d.name: Limit(f"deployment:{d.name}", d.rpm, d.tpm)
            for d in settings.deployments
            if d.rpm or d.tpm
        }

    async def chat(
        self, body: dict[str, Any], model: LLMModel, deadline: float, info: CallInfo
    ) -> tuple[dict[str, Any], CallInfo]:
        """A whole chat completion, and ``info`` (whose call made it: see coalescing)."""
        _state, reply = await self.walk(model, body, deadline, info, self._chat)
        info.usage = reply.usage
        return reply.body, info

    async def embeddings(
        self, body: dict[str, Any], model: LLMModel, deadline: float, info: CallInfo
    ) -> dict[str, Any]:
        _state, reply = await self.walk(model, body, deadline, info, self._embeddings)
        info.usage = reply.usage
        return reply.body

    async def _chat(self, state: DeploymentState, body: dict[str, Any], limit_s: float) -> Reply:
        return await self._providers[state.name].chat(body, timeout_s=limit_s)

    async def _embeddings(
        self, state: DeploymentState, body: dict[str, Any], limit_s: float
    ) -> Reply:
        return await self._providers[state.name].embeddings(body, timeout_s=limit_s)

    async def walk(
        self,
        model: LLMModel,
        body: dict[str, Any],
        deadline: float,
        info: CallInfo,
        call: Call[T],
    ) -> tuple[DeploymentState, T]:
        """Try the model's deployments, then its fallbacks', until one answers."""
        self._budget.request()
        last: InterlockError | None = None
        retry_after = 1.0
        chain = [model, *(self._models[name] for name in model.fallbacks)]
        for position, current in enumerate(chain):
            states = [self.states[name] for name in current.deployments]
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
                    self._observer.fallback_used(model.name, current.name)
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
        call: Call[T],
    ) -> T:
        """Attempts on one deployment, retried on transient failures while allowed."""
        breaker = state.breaker
        if not breaker.allow():
            raise _SkippedError(retry_after_s=breaker.retry_after_s())
        limit = self.limits.get(state.name)
        reservation: Reservation | None = None
        if limit is not None:
            try:
                reservation, _quota = await self._admission.acquire(
                    [limit], self._admission.tokens_of(body), deadline
                )
            except RateLimitedError:
                breaker.release()
                raise
        release = self._accounting.release
        upstream_body = {**body, "model": state.config.model}
        attempt = 0
        while True:
            attempt += 1
            info.attempts += 1
            if attempt > 1:
                self._observer.retried(state.name)
            timeout = min(state.config.timeout_s, deadline - time.monotonic())
            started = time.perf_counter()
            state.in_flight += 1
            try:
                result = await call(state, upstream_body, max(timeout, 0.001))
            except UpstreamError as exc:
                elapsed = time.perf_counter() - started
                info.upstream_s += elapsed
                self._observer.upstream_failed(state.name, exc.kind)
                faulty = exc.transient or exc.status in _DEPLOYMENT_FAULT
                breaker.record(elapsed, ok=not faulty)
                if faulty:
                    state.failed()
                if not exc.transient or attempt >= self._retry.max_attempts:
                    release(reservation)
                    raise
                delay = backoff_s(attempt, self._retry, self._rng)
                if exc.retry_after_s is not None:
                    delay = max(delay, exc.retry_after_s)
                if time.monotonic() + delay >= deadline or not self._budget.try_retry():
                    release(reservation)
                    raise
                await asyncio.sleep(delay)
                if not breaker.allow():
                    release(reservation)
                    raise
                continue
            except BaseException:
                breaker.release()
                release(reservation)
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

    def _on_breaker(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self._observer.breaker_changed(name, new)
        log.warning(
            "LLM deployment circuit changed", extra={"deployment": name, "from": old, "to": new}
        )
