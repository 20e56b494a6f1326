"""Build a :class:`~interlock.llm.gateway.Gateway` from the settings.

Nothing connects here: providers open their connections on first use, and the limiter,
the ledger and the cache connect to Redis lazily. The gateway's usage recorder starts
when the gateway is entered (``async with``).
"""

from __future__ import annotations

from collections.abc import Sequence

from interlock._core.clock import Clock, SystemClock
from interlock.llm.budgets import open_ledger
from interlock.llm.cache import open_llm_cache
from interlock.llm.gateway import Gateway
from interlock.llm.limits import open_limiter
from interlock.llm.observer import GatewayObserver
from interlock.llm.providers import make_provider
from interlock.llm.semantic import CallableEmbedder, Embedder, LocalEmbedder
from interlock.llm.usage import UsageRecorder
from interlock.resilience.supervisor import Supervisor
from interlock.settings import Settings
from interlock.store.db import Database

__all__ = ["open_gateway"]


def open_gateway(
    settings: Settings,
    *,
    database: Database | None = None,
    metrics: GatewayObserver | None = None,
    clock: Clock | None = None,
    supervisor: Supervisor | None = None,
) -> Gateway:
    """The gateway of ``settings.llm``; usage is recorded when ``database`` is given.

    The usage writer runs under ``supervisor`` (the process's, for readiness) when given.

    The keys of deployments and tenants come from the settings (the variables they name).

    Raises ConfigError when a deployment's or tenant's key variable is not set, or a
    backend URL cannot be used.
    """
    llm = settings.llm
    clock = clock or SystemClock()
    providers = {d.name: make_provider(d, d.api_key()) for d in llm.deployments}
    tenant_keys = {t.key().get_secret_value(): t.name for t in llm.tenants}
    limiter = open_limiter(llm.limits.url, clock=clock)
    ledger = open_ledger(llm.limits.url, clock=clock)
    holder: list[Gateway] = []
    cache = None
    if llm.cache.enabled:
        embedder: Embedder | None = None
        if any(m.semantic_cache for m in llm.models):
            name = llm.cache.semantic_embeddings
            if name is None:
                embedder = LocalEmbedder()
            else:

                async def embed(texts: list[str]) -> Sequence[Sequence[float]]:
                    reply = await holder[0].embeddings({"model": name, "input": texts})
                    data = sorted(reply.completion["data"], key=lambda d: d["index"])
                    return [d["embedding"] for d in data]

                embedder = CallableEmbedder(embed)
        cache = open_llm_cache(llm.cache, clock=clock, embedder=embedder, timeout_s=0.05)
    usage = (
        UsageRecorder(database, flush_s=llm.usage_flush_s, supervisor=supervisor)
        if database is not None
        else None
    )
    gateway = Gateway(
        llm,
        providers,
        limiter=limiter,
        ledger=ledger,
        cache=cache,
        usage=usage,
        observer=metrics,
        clock=clock,
        tenant_keys=tenant_keys,
    )
    holder.append(gateway)
    return gateway
