"""The canary guard: every branch of evaluate_canary, with the reasons an operator reads.

Then a serving node applying policies on a real database: a version that cannot load
there is rolled back once, with the reason in the event log, and every node reports the
revision it applies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from interlock.registry import Registry
from interlock.runtime.loaders import inspect_artifact
from interlock.serving.models import ModelManager
from interlock.serving.policies import PolicyStore
from interlock.serving.router import TrafficRouter
from interlock.serving.traffic import (
    CanaryAction,
    CanaryDecision,
    CanaryPlan,
    CanaryStatus,
    WindowStats,
    evaluate_canary,
)
from interlock.settings import ServingSettings
from interlock.store import ArtifactStore, Database
from tests.clock import ManualClock
from tests.registry.sample_models import SUM_MODEL

STARTED = datetime(2025, 3, 4, 5, 0, 0, tzinfo=UTC)
HEALTHY = WindowStats(requests=500, errors=1, p99_ms=120.0)
STABLE = WindowStats(requests=5000, errors=0, p99_ms=100.0)


def plan(**changes: object) -> CanaryPlan:
    fields: dict[str, object] = {
        "version": 3,
        "stable": 1,
        "steps": (5, 25, 50, 100),
        "step": 0,
        "interval_s": 60.0,
        "max_error_rate": 0.05,
        "max_p99_ms": 250.0,
        "min_requests": 100,
        "status": CanaryStatus.RUNNING,
        "reason": None,
        "started_at": STARTED,
        "updated_at": STARTED,
    }
    fields.update(changes)
    return CanaryPlan(**fields)  # type: ignore[arg-type]


def after(seconds: float) -> datetime:
    return STARTED + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("the_plan", "canary", "stable", "now", "expected"),
    [
        pytest.param(
            plan(), WindowStats(99, 60, 900.0), STABLE, after(600),
            CanaryDecision(CanaryAction.HOLD, "waiting for 100 canary requests (99 so far)"),
            id="too-few-requests-even-when-breaching",
        ),
        pytest.param(
            plan(), WindowStats(120, 48, 100.0), STABLE, after(1),
            CanaryDecision(
                CanaryAction.ROLLBACK,
                "canary error rate 0.40 > max 0.05 over 120 requests (stable 0.00)",
            ),
            id="error-rate-breach",
        ),
        pytest.param(
            plan(), WindowStats(120, 48, 100.0), WindowStats(0, 0), after(1),
            CanaryDecision(
                CanaryAction.ROLLBACK,
                "canary error rate 0.40 > max 0.05 over 120 requests (stable n/a)",
            ),
            id="error-rate-breach-without-stable-traffic",
        ),
        pytest.param(
            plan(max_error_rate=0.05), WindowStats(1000, 52, 100.0), STABLE, after(1),
            CanaryDecision(
                CanaryAction.ROLLBACK,
                "canary error rate 0.0520 > max 0.0500 over 1000 requests (stable 0.0000)",
            ),
            id="close-breach-shows-more-digits",
        ),
        pytest.param(
            plan(), WindowStats(300, 0, 812.4), STABLE, after(1),
            CanaryDecision(CanaryAction.ROLLBACK, "canary p99 812 ms > max 250 ms"),
            id="p99-breach",
        ),
        pytest.param(
            plan(max_error_rate=None, max_p99_ms=None), WindowStats(300, 300, 9000.0), STABLE,
            after(30),
            CanaryDecision(CanaryAction.HOLD, "healthy; next step in 30 s"),
            id="no-guard-never-breaches",
        ),
        pytest.param(
            plan(), HEALTHY, STABLE, after(59.4),
            CanaryDecision(CanaryAction.HOLD, "healthy; next step in 1 s"),
            id="healthy-interval-not-elapsed",
        ),
        pytest.param(
            plan(), HEALTHY, STABLE, after(60),
            CanaryDecision(
                CanaryAction.ADVANCE,
                "healthy at 5% over 500 requests (error rate 0.00, p99 120 ms): → 25%",
            ),
            id="advance",
        ),
        pytest.param(
            plan(step=2, updated_at=after(600)), HEALTHY, STABLE, after(630),
            CanaryDecision(CanaryAction.HOLD, "healthy; next step in 30 s"),
            id="interval-counts-from-the-last-step",
        ),
        pytest.param(
            plan(step=3), WindowStats(500, 0, None), STABLE, after(60),
            CanaryDecision(
                CanaryAction.PROMOTE,
                "healthy at 100% over 500 requests (error rate 0.00): version 3 promoted",
            ),
            id="promote-after-the-last-step",
        ),
        pytest.param(
            plan(status=CanaryStatus.ROLLED_BACK, reason="r"), HEALTHY, STABLE, after(600),
            CanaryDecision(CanaryAction.HOLD, "canary is rolled_back"),
            id="finished-canaries-hold",
        ),
        pytest.param(
            plan(status=CanaryStatus.PROMOTED, reason="r"), HEALTHY, STABLE, after(600),
            CanaryDecision(CanaryAction.HOLD, "canary is promoted"),
            id="promoted-canaries-hold",
        ),
    ],
)  # fmt: skip
def test_evaluate_canary(
    the_plan: CanaryPlan,
    canary: WindowStats,
    stable: WindowStats,
    now: datetime,
    expected: CanaryDecision,
) -> None:
    assert evaluate_canary(the_plan, stable, canary, now) == expected


def test_error_rate_is_checked_before_p99() -> None:
    decision = evaluate_canary(plan(), STABLE, WindowStats(200, 100, 5000.0), after(1))
    assert decision.action is CanaryAction.ROLLBACK
    assert decision.reason.startswith("canary error rate 0.50")


# -- a node applying policies: load failures, rollbacks, heartbeats ----------------------


@pytest.fixture
async def node(database_url: str, tmp_path: Path) -> AsyncIterator[Node]:
    """A serving node on a real database: ``fraud`` versions 1–3 (champion 1), no policy.

    Its policy store has no load check, as if the change had been accepted elsewhere.
    """
    clock = ManualClock()
    async with Database(database_url) as db:
        db.migrate()
        artifacts = ArtifactStore(tmp_path / "artifacts")
        registry = Registry(db, artifacts, inspect_artifact, clock)
        for number in range(1, 4):  # distinct bytes: each version has its own artifact
            source = tmp_path / f"v{number}" / "model.py"
            source.parent.mkdir()
            source.write_text(f"{SUM_MODEL}\n# version {number}\n")
            await registry.register("fraud", source, "python")
        await registry.set_alias("fraud", "champion", 1)
        store = PolicyStore(db, registry, clock)
        manager = ModelManager(registry, artifacts, ServingSettings())
        router = TrafficRouter(store, manager, clock, registry=registry)
        try:
            yield Node(clock, registry, store, router)
        finally:
            await router.aclose()
            await manager.aclose()


@dataclass
class Node:
    clock: ManualClock
    registry: Registry
    store: PolicyStore
    router: TrafficRouter

    async def break_version(self, version: int) -> None:
        """Make ``version`` unloadable on this node only: its artifact is gone here."""
        (await self.registry.get_version("fraud", version)).artifact_path.unlink()

    async def kinds(self) -> list[str]:
        return [e.kind.value for e in reversed(await self.store.events("fraud", 100))]


def _load_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and "load" in r.getMessage()]


async def test_a_canary_that_cannot_load_on_a_node_is_rolled_back_once(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    await node.store.set_weights("fraud", {1: 100})
    await node.router.refresh()
    await node.break_version(2)
    await node.store.start_canary("fraud", 2, weight=10, max_error_rate=0.05)
    with caplog.at_level(logging.INFO, logger="interlock.serving"):
        for _ in range(5):
            await node.router.refresh()
            node.clock.advance(1)
    policy = await node.store.get("fraud")
    assert policy is not None and policy.canary is not None
    assert policy.canary.status is CanaryStatus.ROLLED_BACK
    assert policy.canary.reason is not None
    assert "version 2 failed to load on node" in policy.canary.reason
    assert (await node.kinds()).count("canary_rolled_back") == 1
    assert len(_load_errors(caplog)) == 1, caplog.text  # once, not every refresh
    assert node.router.policies["fraud"].revision == policy.revision
    # The failed canary no longer blocks the next one.
    await node.store.start_canary("fraud", 3, weight=10, max_error_rate=0.05)


async def test_a_split_that_cannot_load_on_a_node_is_rolled_back_to_the_previous_policy(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    await node.store.set_weights("fraud", {1: 100})
    await node.router.refresh()
    await node.break_version(2)
    await node.store.set_weights("fraud", {1: 50, 2: 50})
    with caplog.at_level(logging.INFO, logger="interlock.serving"):
        for _ in range(5):
            await node.router.refresh()
    policy = await node.store.get("fraud")
    assert policy is not None
    assert (policy.weights, policy.revision) == ({1: 100}, 3)
    events = await node.store.events("fraud", 1)
    assert events[0].kind.value == "rolled_back"
    assert "revision 2 rolled back" in events[0].message
    assert "version 2 failed to load on node" in events[0].message
    assert len(_load_errors(caplog)) == 1, caplog.text
    shown = await node.store.describe("fraud")
    assert shown["last_rollback"] is not None
    assert shown["last_rollback"]["kind"] == "rolled_back"  # type: ignore[index, call-overload]


async def test_a_first_policy_that_cannot_load_leaves_the_refresher_working(node: Node) -> None:
    await node.break_version(2)
    await node.store.set_weights("fraud", {1: 50, 2: 50})
    await node.router.refresh()  # the node had no policy for the model yet
    assert await node.store.get("fraud") is None  # rolled back to no policy: the aliases
    await node.store.set_weights("fraud", {1: 70, 3: 30})
    await node.router.refresh()
    assert node.router.policies["fraud"].weights == {1: 70, 3: 30}


async def test_nodes_report_the_revision_they_apply(node: Node) -> None:
    await node.store.set_weights("fraud", {1: 100})
    shown = await node.store.describe("fraud")
    assert shown["nodes"] == []
    assert shown["pending"] == "no node applies revision 1"

    await node.router.refresh()
    shown = await node.store.describe("fraud")
    nodes: Any = shown["nodes"]
    assert [(n["node"], n["revision"]) for n in nodes] == [(node.router.node_id, 1)]
    assert nodes[0]["pid"] == os.getpid()
    assert shown["pending"] is None

    await node.store.set_weights("fraud", {1: 50, 3: 50})  # not refreshed yet
    shown = await node.store.describe("fraud")
    assert [n["revision"] for n in shown["nodes"]] == [1]  # type: ignore[union-attr, index]
    assert shown["pending"] == "no node applies revision 2"

    await node.router.refresh()
    assert (await node.store.describe("fraud"))["pending"] is None
    node.clock.advance(120)  # the node went silent
    shown = await node.store.describe("fraud")
    assert (shown["nodes"], shown["pending"]) == ([], "no node applies revision 2")

    await node.router.refresh()
    await node.router.aclose()  # a node that stops says so
    assert (await node.store.describe("fraud"))["nodes"] == []
