"""Applying traffic policies: which version answers, and the canary guard.

The router keeps the newest policy of every model in memory (one query per refresh, at
most every ``alias_refresh_s``) so a request's routing is one dictionary look-up and a
hash. Before a refreshed policy takes effect, every version it names is loaded and
warmed: a weight change never makes a request wait on a load.

Every request's outcome is recorded per version in a rolling window; at each refresh
the guard compares a running canary with its stable version and advances, promotes or
rolls it back. Nodes sharing a database evaluate their own windows and apply a step with
a compare-and-set on the policy revision, so a step is taken once.

The refresh (and with it the guard) runs as the ``traffic-refresh`` loop of a
:class:`~interlock.resilience.supervisor.Supervisor`: a refresh that raises is logged
once, retried with backoff, and makes the node report not ready until one succeeds.

A policy naming a version this node cannot load is never applied here: a running canary
of that version is rolled back, any other policy is reverted to the one before, with the
cause in the event log; the failure is logged once, not at every refresh. After each
refresh the node writes its heartbeat (the revision it applies per model), which
``traffic show`` reads.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from interlock._core.clock import Clock
from interlock.errors import InterlockError, StoreError
from interlock.registry import Registry
from interlock.resilience.supervisor import Supervised, Supervisor
from interlock.serving.models import ModelManager
from interlock.serving.nodes import NodeIdentity
from interlock.serving.policies import PolicyStore
from interlock.serving.traffic import (
    CanaryAction,
    CanaryDecision,
    CanaryStatus,
    TrafficPolicy,
    WindowStats,
    evaluate_canary,
)
from interlock.serving.window import RollingWindow, WindowSnapshot

__all__ = ["RouterObserver", "TrafficRouter"]

log = logging.getLogger("interlock.serving")

GUARD_WINDOW_S = 60.0


class RouterObserver(Protocol):
    def canary_changed(
        self, model: str, version: int, weight: float, action: str, reason: str = ""
    ) -> None: ...


class TrafficRouter:
    """Routes requests by policy and guards canaries; one per serving process."""

    def __init__(
        self,
        store: PolicyStore,
        manager: ModelManager,
        clock: Clock,
        *,
        registry: Registry | None = None,
        refresh_s: float = 1.0,
        observer: RouterObserver | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._manager = manager
        self._clock = clock
        self._refresh_s = refresh_s
        self._observer = observer
        self.policies: dict[str, TrafficPolicy] = {}  # read on every request: a plain dict
        self.watching = False  # whether any version keeps a canary window
        self._windows: dict[tuple[str, int], RollingWindow] = {}
        self._random = random.random
        self._supervisor = supervisor or Supervisor()
        self._loop: Supervised | None = None
        self._lock = asyncio.Lock()
        self._identity = NodeIdentity.current(clock.now())
        self._unloadable: dict[str, tuple[int, int, str]] = {}  # model: revision, version, why
        self._report_failing = False

    # -- the request path ---------------------------------------------------------------

    def policy(self, model: str) -> TrafficPolicy | None:
        return self.policies.get(model)

    def choose(self, policy: TrafficPolicy, route_key: bytes | None) -> int:
        return policy.choose(route_key, self._random())

    def record(self, model: str, version: int, latency_s: float, ok: bool) -> None:
        """Count an outcome; only versions in a running canary (and its stable) keep a window."""
        window = self._windows.get((model, version))
        if window is not None:
            window.record(latency_s, ok)

    def _watch_canaries(self) -> None:
        """Keep a window for each running canary and its stable version; drop the others."""
        watched: set[tuple[str, int]] = set()
        for policy in self.policies.values():
            plan = policy.canary
            if plan is not None and plan.status is CanaryStatus.RUNNING:
                watched.update(((policy.model, plan.version), (policy.model, plan.stable)))
        for key in watched - self._windows.keys():
            self._windows[key] = RollingWindow(self._clock, GUARD_WINDOW_S)
        for key in self._windows.keys() - watched:
            del self._windows[key]
        self.watching = bool(self._windows)

    def window(self, model: str, version: int) -> WindowSnapshot:
        window = self._windows.get((model, version))
        return window.snapshot() if window is not None else WindowSnapshot(0, 0, 0.0, 0.0)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Apply the policies, then refresh them (and guard canaries) in a supervised loop."""
        await self.refresh()
        self._loop = self._supervisor.spawn(
            "traffic-refresh", self.refresh, every_s=self._refresh_s
        )

    async def aclose(self) -> None:
        if self._loop is not None:
            await self._loop.stop()
        await self._forget()

    async def refresh(self) -> None:
        """Re-read the policies, warm every version they name, then apply them."""
        async with self._lock:
            snapshot = await self._store.snapshot()
            for name, policy in list(snapshot.items()):  # entries are replaced or dropped
                current = self.policies.get(name)
                if current is not None and current.revision == policy.revision:
                    snapshot[name] = current
                    continue
                if not await self._warm(policy):
                    if current is not None:
                        snapshot[name] = current  # keep routing the way that works
                    else:
                        del snapshot[name]
            self.policies = snapshot
            self._watch_canaries()
            for policy in list(snapshot.values()):
                if policy.canary is not None and policy.canary.status is CanaryStatus.RUNNING:
                    await self._guard(policy)
        await self._report()

    async def _warm(self, policy: TrafficPolicy) -> bool:
        """Load every version ``policy`` sends requests to; on a failure, undo the policy."""
        failed = self._unloadable.get(policy.model)
        if failed is not None and failed[0] == policy.revision:
            await self._undo(policy, failed[1], failed[2])  # retried until written; not reloaded
            return False
        versions = {v for v, w in policy.effective_weights().items() if w > 0}
        if policy.shadow is not None:
            versions.add(policy.shadow)
        if policy.canary is not None and policy.canary.running:
            versions.update((policy.canary.version, policy.canary.stable))
        for version in sorted(versions):
            try:
                await self._manager.get(policy.model, version)
            except StoreError as exc:  # transient: the database, not the version; retried
                log.warning(
                    "could not read a version of the new traffic policy",
                    extra={"model": policy.model, "version": version, "error": str(exc)},
                )
                return False
            except InterlockError as exc:
                await self._unloadable_version(policy, version, exc)
                return False
        return True

    @property
    def node_id(self) -> str:
        """This node's id in the heartbeat table (``traffic show`` lists it)."""
        return self._identity.node

    async def _unloadable_version(
        self, policy: TrafficPolicy, version: int, exc: InterlockError
    ) -> None:
        """Log once that ``version`` cannot load here, and undo the policy naming it."""
        lines = str(exc).strip().splitlines()
        cause = lines[0] if lines else type(exc).__name__
        who = self._identity
        reason = f"version {version} failed to load on node {who.node} ({who.host}): {cause}"
        self._unloadable[policy.model] = (policy.revision, version, reason)
        log.error(
            "a version of the new traffic policy failed to load on this node; rolling it back",
            extra={
                "model": policy.model,
                "version": version,
                "revision": policy.revision,
                "error": str(exc),
            },
        )
        await self._undo(policy, version, reason)

    async def _undo(self, policy: TrafficPolicy, version: int, reason: str) -> None:
        """Roll the canary of ``version`` back, else revert ``policy``; once across nodes."""
        plan = policy.canary
        try:
            if plan is not None and plan.running and plan.version == version:
                decision = CanaryDecision(CanaryAction.ROLLBACK, reason)
                if await self._store.update_canary(policy.model, decision, policy.revision):
                    log.warning(
                        "canary rollback",
                        extra={"model": policy.model, "version": version, "reason": reason},
                    )
                    if self._observer is not None:
                        self._observer.canary_changed(
                            policy.model, version, 0.0, "rollback", reason
                        )
            elif await self._store.revert(policy.model, policy.revision, reason) is not None:
                log.warning(
                    "traffic policy rolled back",
                    extra={"model": policy.model, "revision": policy.revision, "reason": reason},
                )
        except InterlockError as exc:  # the next refresh tries again; the policy is not applied
            log.debug("could not roll the policy back yet", extra={"error": str(exc)})

    async def _report(self) -> None:
        """Write this node's heartbeat: the revision it applies per model."""
        applied = {name: p.revision for name, p in self.policies.items()}
        try:
            await self._store.beat(self._identity, applied)
        except InterlockError as exc:
            if not self._report_failing:  # once per outage, not at every refresh
                log.warning("could not write the node heartbeat", extra={"error": str(exc)})
            self._report_failing = True
            return
        self._report_failing = False

    async def _forget(self) -> None:
        try:
            await self._store.nodes.forget(self._identity.node)
        except InterlockError as exc:
            log.warning("could not remove the node heartbeat", extra={"error": str(exc)})

    async def _guard(self, policy: TrafficPolicy) -> None:
        plan = policy.canary
        if plan is None:
            return
        stable = self.window(policy.model, plan.stable)
        canary = self.window(policy.model, plan.version)
        decision = evaluate_canary(plan, _stats(stable), _stats(canary), self._clock.now())
        if decision.action == "hold":
            return
        updated = await self._store.update_canary(policy.model, decision, policy.revision)
        if updated is None:
            return  # another node took this step first; the next refresh brings it
        if not await self._warm(updated):
            return
        self.policies[policy.model] = updated
        self._watch_canaries()
        if decision.action == "promote" and self._registry is not None:
            # A promoted canary is the new champion, so the promotion outlives the policy.
            await self._registry.set_alias(policy.model, "champion", plan.version)
        weight = 0.0
        if updated.canary is not None and updated.canary.status is CanaryStatus.RUNNING:
            weight = float(updated.canary.weight)
        level = logging.WARNING if decision.action == "rollback" else logging.INFO
        log.log(
            level,
            f"canary {decision.action}",
            extra={"model": policy.model, "version": plan.version, "reason": decision.reason},
        )
        if self._observer is not None:
            self._observer.canary_changed(
                policy.model, plan.version, weight, decision.action, decision.reason or ""
            )


def _stats(snapshot: WindowSnapshot) -> WindowStats:
    return WindowStats(requests=snapshot.requests, errors=snapshot.errors, p99_ms=snapshot.p99_ms)
