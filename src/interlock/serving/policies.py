"""Traffic policies in the metadata database, shared by every serving node.

A :class:`PolicyStore` keeps one :class:`~interlock.serving.traffic.TrafficPolicy` per
model (table ``traffic_policies``) and a log of what changed it (``traffic_events``).
Every change bumps the model's revision, and revisions never repeat, even across
:meth:`PolicyStore.clear`: a node comparing revisions never mistakes a new policy for
one it holds. Serving nodes poll :meth:`PolicyStore.snapshot` (one query) every second.

Writes lock the model's row first (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's
``BEGIN IMMEDIATE`` already serialises writers), so concurrent changes queue instead
of interleaving. :meth:`PolicyStore.update_canary` is a compare-and-set on the
revision: when two nodes judge the same window, the step is applied once.

A store given a :class:`~interlock.serving.loadcheck.VersionLoader` loads and warms the
versions a change routes to before writing it, and refuses the change when one cannot
load. A policy that a node still cannot load is undone by :meth:`PolicyStore.revert`
(or, for a canary, rolled back), once, whichever node gets there first. Nodes report the
revision they apply through :attr:`PolicyStore.nodes`; :meth:`PolicyStore.describe`
says when no live node applies the stored one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from interlock._core.clock import Clock
from interlock.errors import ModelNotFoundError, TrafficError
from interlock.registry import ModelSummary, Registry
from interlock.serving.loadcheck import VersionLoader
from interlock.serving.nodes import NodeBoard, NodeIdentity
from interlock.serving.traffic import (
    CanaryAction,
    CanaryDecision,
    CanaryPlan,
    CanaryStatus,
    Fallback,
    JSONValue,
    TrafficPolicy,
    apply_decision,
)
from interlock.store.db import Database
from interlock.store.sql import upsert
from interlock.store.tables import models, traffic_events, traffic_policies

__all__ = ["DEFAULT_STEPS", "KEEP", "Keep", "PolicyStore", "TrafficEvent", "TrafficEventKind"]

log = logging.getLogger("interlock.serving")

DEFAULT_STEPS = (5, 25, 50, 100)
"""Canary steps, in percent of traffic, when none are given."""

_tp = traffic_policies
_te = traffic_events


class Keep(Enum):
    """The type of :data:`KEEP`."""

    KEEP = "keep"


KEEP: Final = Keep.KEEP
"""For :meth:`PolicyStore.set_weights`: keep the shadow or fallback the policy has."""


class TrafficEventKind(StrEnum):
    SET = "set"
    CANARY_STARTED = "canary_started"
    CANARY_ADVANCED = "canary_advanced"
    CANARY_PROMOTED = "canary_promoted"
    CANARY_ROLLED_BACK = "canary_rolled_back"
    ROLLED_BACK = "rolled_back"  # a policy no node could load, undone
    FALLBACK = "fallback"


_DECIDED = {
    CanaryAction.ADVANCE: TrafficEventKind.CANARY_ADVANCED,
    CanaryAction.PROMOTE: TrafficEventKind.CANARY_PROMOTED,
    CanaryAction.ROLLBACK: TrafficEventKind.CANARY_ROLLED_BACK,
}


@dataclass(frozen=True, slots=True)
class TrafficEvent:
    """One change to a model's traffic, at the policy revision it produced."""

    id: int
    model: str
    at: datetime
    kind: TrafficEventKind
    message: str
    revision: int

    def to_json(self) -> dict[str, JSONValue]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"at": self.at.isoformat()}


class PolicyStore:
    """Traffic policies and their events; every method is async and runs in one transaction."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        clock: Clock,
        *,
        loader: VersionLoader | None = None,
    ) -> None:
        self._db = db
        self._registry = registry
        self._clock = clock
        self._loader = loader
        self._cache: dict[str, TrafficPolicy] = {}
        self.nodes = NodeBoard(db)

    async def get(self, model: str) -> TrafficPolicy | None:
        """The model's policy, or ``None`` when its requests follow its aliases."""
        return await self._db.run(lambda conn: _read(conn, model), readonly=True)

    async def snapshot(self) -> dict[str, TrafficPolicy]:
        """Every policy, by model, in one query; unchanged policies are the same objects."""
        rows = await self._db.run(
            lambda conn: list(conn.execute(sa.select(_tp)).mappings()), readonly=True
        )
        fresh: dict[str, TrafficPolicy] = {}
        for row in rows:
            model = row["model"]
            cached = self._cache.get(model)
            if cached is not None and cached.revision == row["revision"]:
                fresh[model] = cached
                continue
            try:
                fresh[model] = _policy(row)
            except TrafficError as exc:  # written by hand or by a newer interlock
                log.error("unreadable traffic policy", extra={"model": model, "error": str(exc)})
        self._cache = fresh
        return dict(fresh)

    async def set_weights(
        self,
        model: str,
        weights: Mapping[int, int],
        *,
        shadow: int | Keep | None = KEEP,
        fallback: Fallback | Keep | None = KEEP,
    ) -> TrafficPolicy:
        """Replace the model's weights; a running canary is cancelled.

        The shadow and the fallback are kept unless given (``None`` removes them); a kept
        shadow that now takes traffic stops being a shadow. Every version that will get
        requests is loaded and warmed first (when the store has a loader).
        """
        given = [shadow] if isinstance(shadow, int) else []
        await self._check_versions(model, [*weights, *given])
        if self._loader is not None:
            copies = shadow
            if isinstance(copies, Keep):
                before = await self.get(model)
                copies = before.shadow if before is not None else None
            routed = [v for v, w in sorted(weights.items()) if w > 0]
            if copies is not None and copies not in routed:
                routed.append(copies)
            await self._loader(model, routed)
        now = self._now()

        def write(conn: Connection) -> TrafficPolicy:
            current = _lock(conn, model)
            kept_shadow = current.shadow if current is not None else None
            new_shadow = kept_shadow if isinstance(shadow, Keep) else shadow
            if isinstance(shadow, Keep) and new_shadow is not None and weights.get(new_shadow):
                new_shadow = None  # the shadow now takes traffic: it gets no more copies
            kept_fallback = current.fallback if current is not None else None
            policy = TrafficPolicy(
                model,
                dict(weights),
                shadow=new_shadow,
                fallback=kept_fallback if isinstance(fallback, Keep) else fallback,
                revision=_next_revision(conn, model),
                updated_at=now,
            )
            message = _describe(policy)
            if current is not None and current.canary is not None and current.canary.running:
                message += f"; cancels the canary of version {current.canary.version}"
            _save(conn, policy, TrafficEventKind.SET, message)
            return policy

        return await self._db.run(write)

    async def start_canary(
        self,
        model: str,
        version: int,
        *,
        weight: int | None = None,
        steps: Sequence[int] | None = None,
        interval_s: float = 60.0,
        max_error_rate: float | None = None,
        max_p99_ms: float | None = None,
        min_requests: int = 100,
        unguarded: bool = False,
    ) -> TrafficPolicy:
        """Start rolling ``version`` out against the version taking the most traffic.

        ``steps`` are the percents of traffic the canary takes in turn; ``weight`` alone
        is the first step, followed by the :data:`DEFAULT_STEPS` above it. With no
        policy yet, the stable version is the champion (else the newest version). A
        canary needs a guard (``max_error_rate`` or ``max_p99_ms``) unless ``unguarded``
        says it may promote itself on time alone. The version is loaded and warmed
        first (when the store has a loader).
        """
        ladder = _steps(weight, steps)
        summary = await self._check_versions(model, [version])
        if max_error_rate is None and max_p99_ms is None and not unguarded:
            raise TrafficError(
                f"{model}: a canary needs a guard (a max error rate or a max p99),"
                " or must be started unguarded explicitly"
            )
        if self._loader is not None:
            current = await self.get(model)
            if current is not None and current.canary is not None and current.canary.running:
                raise _still_running(model, current.canary.version)
            await self._loader(model, [version])
        champion = summary.routing.version_for(None) or summary.latest
        now = self._now()

        def write(conn: Connection) -> TrafficPolicy:
            current = _lock(conn, model)
            if current is not None and current.canary is not None and current.canary.running:
                raise _still_running(model, current.canary.version)
            shares = current.effective_weights() if current is not None else {champion: 100.0}
            stable = max(shares, key=lambda v: (shares[v], v))
            if stable == version:
                raise TrafficError(f"{model}: version {version} already takes the most traffic")
            weights = dict(current.weights) if current is not None else {stable: 100}
            weights[stable] = weights.get(stable, 0) + weights.pop(version, 0)
            plan = CanaryPlan(
                version=version,
                stable=stable,
                steps=ladder,
                step=0,
                interval_s=interval_s,
                max_error_rate=max_error_rate,
                max_p99_ms=max_p99_ms,
                min_requests=min_requests,
                status=CanaryStatus.RUNNING,
                reason=None,
                started_at=now,
                updated_at=now,
            )
            shadow = current.shadow if current is not None else None
            policy = TrafficPolicy(
                model,
                weights,
                shadow=None if shadow == version else shadow,
                canary=plan,
                fallback=current.fallback if current is not None else None,
                revision=_next_revision(conn, model),
                updated_at=now,
            )
            guard = _guard(plan)
            message = f"version {version} at {ladder[0]}% against version {stable}; {guard}"
            _save(conn, policy, TrafficEventKind.CANARY_STARTED, message)
            return policy

        return await self._db.run(write)

    async def update_canary(
        self, model: str, decision: CanaryDecision, expected_revision: int
    ) -> TrafficPolicy | None:
        """Apply an advance, promote or rollback decided at ``expected_revision``.

        ``None`` when nothing was applied: the decision holds, no canary is running, or
        the revision moved on (another node applied its decision first).
        """
        if decision.action is CanaryAction.HOLD:
            return None
        now = self._now()

        def write(conn: Connection) -> TrafficPolicy | None:
            current = _lock(conn, model)
            if current is None or current.revision != expected_revision:
                return None
            if current.canary is None or not current.canary.running:
                return None
            policy = apply_decision(current, decision, now)
            updated = conn.execute(
                sa.update(_tp)
                .where(_tp.c.model == model, _tp.c.revision == expected_revision)
                .values(policy=policy.to_json(), revision=policy.revision, updated_at=now)
            ).rowcount
            if updated != 1:
                return None
            kind = _DECIDED[decision.action]
            _event(conn, model, now, kind, decision.reason, policy.revision, policy)
            return policy

        return await self._db.run(write)

    async def clear(self, model: str) -> bool:
        """Remove the model's policy: its requests follow its aliases again.

        ``False`` when it had none. The event log is kept.
        """
        now = self._now()

        def write(conn: Connection) -> bool:
            if _lock(conn, model) is None:
                return False
            revision = _next_revision(conn, model)
            conn.execute(sa.delete(_tp).where(_tp.c.model == model))
            message = "policy cleared; requests follow the model's aliases"
            _event(conn, model, now, TrafficEventKind.SET, message, revision)
            return True

        return await self._db.run(write)

    async def revert(self, model: str, failed_revision: int, reason: str) -> TrafficPolicy | None:
        """Undo revision ``failed_revision``, which a node cannot load: a rollback.

        The model gets back the policy it had before (or none, so its requests follow
        its aliases) at a new revision, with ``reason`` in the event log. ``None`` when
        no policy is left, or nothing was undone: the policy moved on meanwhile (another
        node undid it first).
        """
        now = self._now()

        def write(conn: Connection) -> TrafficPolicy | None:
            current = _lock(conn, model)
            if current is None or current.revision != failed_revision:
                return None
            before = conn.execute(
                sa.select(_te.c.revision, _te.c.policy)
                .where(
                    _te.c.model == model,
                    _te.c.revision < failed_revision,
                    _te.c.kind != TrafficEventKind.FALLBACK.value,
                )
                .order_by(_te.c.id.desc())
                .limit(1)
            ).first()
            revision = _next_revision(conn, model)
            message = f"revision {failed_revision} rolled back: {reason}"
            if before is None or before.policy is None:
                conn.execute(sa.delete(_tp).where(_tp.c.model == model))
                message += "; no policy now, requests follow the model's aliases"
                _event(conn, model, now, TrafficEventKind.ROLLED_BACK, message, revision)
                return None
            data = dict(before.policy) | {"revision": revision, "updated_at": now.isoformat()}
            policy = TrafficPolicy.from_json(data)
            message += f"; back to revision {before.revision} ({_describe(policy)})"
            _save(conn, policy, TrafficEventKind.ROLLED_BACK, message)
            return policy

        return await self._db.run(write)

    async def beat(self, who: NodeIdentity, applied: Mapping[str, int]) -> None:
        """Record that node ``who`` applies ``applied`` (model → revision) now."""
        await self.nodes.beat(who, applied, self._now())

    async def describe(self, model: str, limit: int = 20) -> dict[str, JSONValue]:
        """What ``traffic show`` and the admin API print, read in one transaction.

        The policy, its effective weights (percent), the live nodes with the revision
        each applies, ``pending`` when no live node applies the stored revision, the
        last rollback (kept after the policy moved on) and the ``limit`` most recent
        events, newest first.
        """
        now = self._now()

        def read(conn: Connection) -> dict[str, JSONValue]:
            if conn.execute(sa.select(models.c.name).where(models.c.name == model)).first() is None:
                raise ModelNotFoundError(f"no model named {model!r}")
            policy = _read(conn, model)
            newest = sa.select(_te).where(_te.c.model == model).order_by(_te.c.id.desc())
            rollback = newest.where(_te.c.kind.in_(_ROLLBACKS))
            last = _events(conn, rollback.limit(1))
            shares = policy.effective_weights() if policy is not None else None
            nodes = self.nodes.live(conn, now)
            pending = None
            if policy is not None and all(n.applied.get(model) != policy.revision for n in nodes):
                pending = f"no node applies revision {policy.revision}"
            return {
                "model": model,
                "policy": policy.to_json() if policy is not None else None,
                "effective_weights": (
                    {str(v): round(p, 4) for v, p in shares.items()} if shares else None
                ),
                "nodes": [n.to_json(model) for n in nodes],
                "pending": pending,
                "last_rollback": last[0].to_json() if last else None,
                "events": [e.to_json() for e in _events(conn, newest.limit(limit))],
            }

        return await self._db.run(read, readonly=True)

    async def events(self, model: str, limit: int = 20) -> list[TrafficEvent]:
        """The model's most recent events, newest first."""
        stmt = sa.select(_te).where(_te.c.model == model).order_by(_te.c.id.desc()).limit(limit)
        return await self._db.run(lambda conn: _events(conn, stmt), readonly=True)

    async def record(self, model: str, kind: TrafficEventKind, message: str) -> TrafficEvent:
        """Log an event that changes no policy (say, answers served by the fallback)."""
        now = self._now()

        def write(conn: Connection) -> TrafficEvent:
            current = _lock(conn, model)
            revision = current.revision if current is not None else 0
            return _event(conn, model, now, kind, message, revision)

        return await self._db.run(write)

    async def _check_versions(self, model: str, versions: Sequence[int]) -> ModelSummary:
        summary = await self._registry.get_model(model)
        missing = [v for v in versions if v not in summary.versions]
        if missing:
            listed = ", ".join(map(str, summary.versions))
            raise TrafficError(f"{model}: version {missing[0]} does not exist (versions: {listed})")
        return summary

    def _now(self) -> datetime:
        return self._clock.now().astimezone(UTC)


_ROLLBACKS = (TrafficEventKind.CANARY_ROLLED_BACK.value, TrafficEventKind.ROLLED_BACK.value)


def _still_running(model: str, version: int) -> TrafficError:
    return TrafficError(
        f"{model}: the canary of version {version} is still running;"
        " set the weights to end it first"
    )


def _steps(weight: int | None, steps: Sequence[int] | None) -> tuple[int, ...]:
    if steps is None:
        if weight is None:
            return DEFAULT_STEPS
        return (weight, *(s for s in DEFAULT_STEPS if s > weight))
    ladder = tuple(steps)
    if weight is not None and (not ladder or ladder[0] != weight):
        first = ladder[0] if ladder else "nothing"
        raise TrafficError(f"weight {weight} must be the first step (the steps start at {first})")
    return ladder


def _guard(plan: CanaryPlan) -> str:
    limits = []
    if plan.max_error_rate is not None:
        limits.append(f"error rate ≤ {plan.max_error_rate:g}")
    if plan.max_p99_ms is not None:
        limits.append(f"p99 ≤ {plan.max_p99_ms:g} ms")
    steps = "/".join(f"{s}%" for s in plan.steps)
    guard = " and ".join(limits) or "no guard"
    return f"steps {steps} every {plan.interval_s:g} s; {guard} after {plan.min_requests} requests"


def _describe(policy: TrafficPolicy) -> str:
    text = "weights " + " ".join(f"{v}={w}" for v, w in policy.weights.items())
    if policy.shadow is not None:
        text += f", shadow {policy.shadow}"
    if policy.fallback is not None:
        text += ", static fallback"
    return text


def _policy(row: sa.RowMapping) -> TrafficPolicy:
    data = dict(row["policy"])
    data.update(revision=row["revision"], updated_at=row["updated_at"].isoformat())
    return TrafficPolicy.from_json(data)


def _read(conn: Connection, model: str) -> TrafficPolicy | None:
    row = conn.execute(sa.select(_tp).where(_tp.c.model == model)).mappings().one_or_none()
    return None if row is None else _policy(row)


def _lock(conn: Connection, model: str) -> TrafficPolicy | None:
    """Lock the model's row for this transaction; return its current policy."""
    locked = conn.execute(
        sa.select(models.c.name).where(models.c.name == model).with_for_update()
    ).scalar_one_or_none()
    if locked is None:
        raise ModelNotFoundError(f"no model named {model!r}")
    return _read(conn, model)


def _next_revision(conn: Connection, model: str) -> int:
    """One more than any revision the model had: revisions never repeat, even after clear."""
    stmt = sa.select(sa.func.max(_te.c.revision)).where(_te.c.model == model)
    return int(conn.execute(stmt).scalar_one() or 0) + 1


def _save(conn: Connection, policy: TrafficPolicy, kind: TrafficEventKind, message: str) -> None:
    values = {"model": policy.model, "policy": policy.to_json(), "revision": policy.revision}
    upsert(conn, _tp, {**values, "updated_at": policy.updated_at}, keys=("model",))
    _event(conn, policy.model, policy.updated_at, kind, message, policy.revision, policy)


def _event(
    conn: Connection,
    model: str,
    at: datetime,
    kind: TrafficEventKind,
    message: str,
    revision: int,
    policy: TrafficPolicy | None = None,
) -> TrafficEvent:
    """Log an event; ``policy`` is the policy it left (kept, so a rollback can restore it)."""
    values = {"model": model, "at": at, "kind": kind.value, "message": message}
    left = policy.to_json() if policy is not None else None
    stmt = sa.insert(_te).values(**values, revision=revision, policy=left).returning(_te.c.id)
    event_id: int = conn.execute(stmt).scalar_one()
    return TrafficEvent(event_id, model, at, kind, message, revision)


def _events(conn: Connection, stmt: sa.Select[tuple[object, ...]]) -> list[TrafficEvent]:
    rows = conn.execute(stmt).mappings()
    names = [f.name for f in fields(TrafficEvent)]
    return [
        TrafficEvent(**{**{n: row[n] for n in names}, "kind": TrafficEventKind(row["kind"])})
        for row in rows
    ]
