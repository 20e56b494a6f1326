"""The admin API for traffic policies: ``/admin/models/{name}/traffic``.

- ``GET``: the policy, its effective weights, the nodes seen recently with the revision
  each applies (``pending`` when none applies the stored one), the last rollback and
  recent events;
- ``PUT``: set the weights (a running canary is cancelled); ``shadow`` and ``fallback``
  are kept when absent from the body and removed when ``null``;
- ``POST /canary``: start a canary against the version taking the most traffic; it needs
  ``max_error_rate`` or ``max_p99_ms``, or ``"unguarded": true``;
- ``DELETE``: remove the policy, so requests follow the model's aliases again.

Every route needs the admin key when one is configured, as in :mod:`interlock.api.admin`.
After each change ``on_change`` runs (the application passes the serving refresh), so
this node routes by the new policy before answering; other nodes follow within a second.
The store given loads and warms the versions a change names before accepting it (the
application gives it a :class:`~interlock.serving.loadcheck.ManagerLoader`): a version
that cannot load gets 422 with the cause.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from interlock.api.predict import check_key
from interlock.errors import TrafficError
from interlock.serving.policies import KEEP, Keep, PolicyStore
from interlock.serving.traffic import Fallback

__all__ = ["build_traffic_router"]

_STRICT = ConfigDict(extra="forbid")


class _FallbackBody(BaseModel):
    model_config = _STRICT

    static: JsonValue = Field(None, description="the answer given for each row, marked degraded")


class _PolicyBody(BaseModel):
    model_config = _STRICT

    weights: dict[int, int] = Field(description='version → weight, e.g. {"1": 80, "2": 20}')
    shadow: int | None = Field(
        None, ge=1, description="a version that gets copies only; absent: kept, null: removed"
    )
    fallback: _FallbackBody | None = Field(
        None, description="the static fallback; absent: kept, null: removed"
    )


class _CanaryBody(BaseModel):
    model_config = _STRICT

    version: int = Field(ge=1, description="the version rolled out")
    weight: int | None = Field(None, ge=1, le=100, description="first step, in percent")
    steps: list[int] | None = Field(None, description="percents of traffic, e.g. [5, 25, 50, 100]")
    interval_s: float = Field(60.0, gt=0, description="time at each step before the next")
    max_error_rate: float | None = Field(None, ge=0, le=1)
    max_p99_ms: float | None = Field(None, gt=0)
    min_requests: int = Field(100, ge=1, description="canary requests before any decision")
    unguarded: bool = Field(
        False, description="allow no guard: the canary then promotes itself on time alone"
    )


def build_traffic_router(
    store: PolicyStore,
    on_change: Callable[[], Awaitable[None]],
    admin_keys: tuple[bytes, ...],
) -> APIRouter:
    """The traffic routes; ``on_change`` is awaited after every change."""

    async def admin(request: Request) -> None:
        check_key(dict(request.scope["headers"]), admin_keys)

    router = APIRouter(
        prefix="/admin/models/{name}/traffic", dependencies=[Depends(admin)], tags=["admin"]
    )

    @router.get("")
    async def show(
        name: str, limit: Annotated[int, Query(ge=1, le=1000, description="events")] = 20
    ) -> dict[str, Any]:
        return await store.describe(name, limit)

    @router.put("")
    async def set_policy(name: str, body: _PolicyBody) -> dict[str, Any]:
        given = body.model_fields_set
        shadow: int | Keep | None = body.shadow if "shadow" in given else KEEP
        fallback: Fallback | Keep | None = KEEP
        if "fallback" in given:
            fallback = Fallback(body.fallback.static) if body.fallback is not None else None
        policy = await store.set_weights(name, body.weights, shadow=shadow, fallback=fallback)
        await on_change()
        return policy.to_json()

    @router.post("/canary", status_code=201)
    async def start_canary(name: str, body: _CanaryBody) -> dict[str, Any]:
        if body.max_error_rate is None and body.max_p99_ms is None and not body.unguarded:
            raise TrafficError(
                f"{name}: a canary needs a guard: give max_error_rate or max_p99_ms,"
                ' or "unguarded": true to let it promote on time alone'
            )
        policy = await store.start_canary(
            name,
            body.version,
            weight=body.weight,
            steps=body.steps,
            interval_s=body.interval_s,
            max_error_rate=body.max_error_rate,
            max_p99_ms=body.max_p99_ms,
            min_requests=body.min_requests,
            unguarded=body.unguarded,
        )
        await on_change()
        return policy.to_json()

    @router.delete("", status_code=204)
    async def clear(name: str) -> None:
        if await store.clear(name):
            await on_change()

    return router
