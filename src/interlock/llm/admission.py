"""Admission: who may ask what, and whether there is room for it now.

A request names a configured model; a tenant (when tenants are configured) is found by
its key. The tenant's budget must not be spent, and its RPM/TPM must have room: the
prompt's tokens (tiktoken) plus ``max_tokens`` are reserved, and reconciled with the
real usage once it is known (:mod:`interlock.llm.accounting`). Deployments' own limits
are taken here too, by the attempt loop, with :meth:`Admission.acquire`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from interlock.errors import (
    AuthError,
    BudgetExceededError,
    MalformedInputError,
    ModelNotFoundError,
    RateLimitedError,
)
from interlock.llm.budgets import SpendLedger
from interlock.llm.calls import CallInfo, Tenant
from interlock.llm.limits import Limit, RateLimiter, Reservation, acquire_within
from interlock.llm.observer import GatewayObserver
from interlock.llm.tokens import count_embedding_tokens, count_prompt_tokens
from interlock.llm.wire import ChatRequest, EmbeddingsRequest
from interlock.settings import LLMModel, LLMSettings

__all__ = ["Admission", "Admitted"]

log = logging.getLogger("interlock.llm")


@dataclass(slots=True)
class Admitted:
    """A request let in: its tenant, its model, the tokens reserved for it, and the
    tenant's reservation to reconcile."""

    tenant: Tenant | None
    model: LLMModel
    tokens: int
    reservation: Reservation | None

    @property
    def scope(self) -> str:
        """What cached answers are shared within: the tenant and the model asked for."""
        tenant = self.tenant.name if self.tenant is not None else ""
        return f"{tenant}\x00{self.model.name}"


class Admission:
    """Tenants, their keys, budgets and limits; the models a request may name."""

    def __init__(
        self,
        settings: LLMSettings,
        *,
        limiter: RateLimiter,
        ledger: SpendLedger,
        observer: GatewayObserver,
        tenant_keys: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._limiter = limiter
        self._ledger = ledger
        self._observer = observer
        self.models = {m.name: m for m in settings.models}
        self.tenants: dict[str, Tenant] = {}
        for t in settings.tenants:
            limit = Limit(f"tenant:{t.name}", t.rpm, t.tpm) if (t.rpm or t.tpm) else None
            self.tenants[t.name] = Tenant(
                t.name, limit, t.budget_usd_per_day, t.budget_usd_per_month
            )
        self._keys = dict(tenant_keys or {})  # key -> tenant name
        # Tokens are counted only when some TPM limit needs them (tiktoken costs CPU).
        self.needs_tokens = any(d.tpm for d in settings.deployments) or any(
            t.limit is not None and t.limit.tpm for t in self.tenants.values()
        )

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        """The tenant a key belongs to; AuthError when tenants exist and the key is unknown."""
        if not self.tenants:
            return None
        if not key:
            raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
        name = self._keys.get(key)
        if name is None:
            raise AuthError("the API key is not valid")
        return self.tenants[name]

    def deadline(self, timeout_s: float | None) -> float:
        """The request's deadline on the monotonic clock (the retry settings' by default)."""
        if timeout_s is None:
            timeout_s = self._settings.retry.timeout_s
        return time.monotonic() + timeout_s

    async def admit(
        self,
        body: dict[str, Any],
        tenant: Tenant | None,
        info: CallInfo,
        deadline: float,
        *,
        kind: str,
    ) -> Admitted:
        """Check the request's shape, the tenant's budget, and take room under its limit."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise MalformedInputError("model: a model name is required")
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model: no LLM model named {name!r} is configured")
        info.model = model.name
        if self._settings.log_prompts:  # off by default: prompts are the users' data
            log.info("LLM request", extra={"model": name, "body": body})
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise MalformedInputError("messages: a non-empty list of messages is required")
        elif "input" not in body:
            raise MalformedInputError("input: the text to embed is required")
        tokens = 0
        if self.needs_tokens:
            tokens = self._reserve_tokens(body, kind)
        reservation = None
        if tenant is not None:
            if tenant.budget_day is not None or tenant.budget_month is not None:
                try:
                    await self._ledger.check(
                        tenant.name, per_day=tenant.budget_day, per_month=tenant.budget_month
                    )
                except BudgetExceededError:
                    self._observer.rejected(f"tenant:{tenant.name}", "budget")
                    raise
            if tenant.limit is not None:
                reservation, quota = await self.acquire([tenant.limit], tokens, deadline)
                info.headers = quota
        return Admitted(tenant, model, tokens, reservation)

    def tokens_of(self, body: dict[str, Any]) -> int:
        """The tokens to reserve for ``body`` under a TPM limit (0 when none counts them)."""
        if not self.needs_tokens:
            return 0
        return self._reserve_tokens(body, "chat" if "messages" in body else "embeddings")

    def _reserve_tokens(self, body: dict[str, Any], kind: str) -> int:
        """The prompt's tokens plus the most the answer may use (an admitted body)."""
        if kind == "embeddings":
            return count_embedding_tokens(cast(EmbeddingsRequest, body)["input"])
        request = cast(ChatRequest, body)
        # The wire may hold anything there: a number counts, anything else is 0.
        most: object = request.get("max_completion_tokens") or request.get("max_tokens") or 0
        return count_prompt_tokens(request) + (int(most) if isinstance(most, int | float) else 0)

    async def acquire(
        self, limits: Sequence[Limit], tokens: int, deadline: float
    ) -> tuple[Reservation, dict[str, str]]:
        """Take room under ``limits``; with ``limits.queue``, wait for it until ``deadline``."""
        try:
            if self._settings.limits.queue:
                reservation, quota = await acquire_within(
                    self._limiter, limits, tokens, timeout_s=deadline - time.monotonic()
                )
            else:
                reservation, quota = await self._limiter.acquire(limits, tokens)
        except RateLimitedError as exc:
            self._observer.rejected(exc.limit.rsplit(":", 1)[0], "rate")
            raise
        return reservation, quota.headers()
