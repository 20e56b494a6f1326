"""The traffic refresher on real components: it keeps applying policies whatever fails.

A registry on SQLite with python models, the policy store, the model manager and the
router, as one serving node holds them, under one supervisor whose failures feed the real
ServingMetrics; the refreshers run every 10 ms.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection

from interlock._core.clock import SystemClock
from interlock.monitoring.metrics import ServingMetrics
from interlock.registry import Registry
from interlock.resilience.supervisor import Supervisor
from interlock.runtime.loaders import inspect_artifact
from interlock.serving.models import ModelManager
from interlock.serving.policies import PolicyStore
from interlock.serving.router import TrafficRouter
from interlock.settings import ServingSettings
from interlock.store import ArtifactStore, Database

CONSTANT = """
class Model:
    features = ["x"]

    def predict(self, rows):
        return [{value} for _ in rows]
"""

# Registration only reads the features; the warm-up that guards every load fails.
BROKEN = """
class Model:
    features = ["x"]

    def predict(self, rows):
        raise ValueError("this version cannot answer")
"""


@dataclass
class Node:
    database: Database
    registry: Registry
    policies: PolicyStore
    manager: ModelManager
    router: TrafficRouter
    supervisor: Supervisor
    metrics: ServingMetrics


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    clock = SystemClock()
    async with Database(f"sqlite:///{tmp_path / 'meta.db'}") as database:
        await asyncio.to_thread(database.migrate)
        artifacts = ArtifactStore(tmp_path / "artifacts")
        registry = Registry(database, artifacts, inspect_artifact, clock)
        for name, bodies in (
            ("a", [CONSTANT.format(value=1), BROKEN]),
            ("b", [CONSTANT.format(value=1), CONSTANT.format(value=2)]),
        ):
            for number, body in enumerate(bodies, start=1):
                source = tmp_path / f"{name}-v{number}.py"
                source.write_text(textwrap.dedent(body))
                await registry.register(name, source, "python")
        metrics = ServingMetrics()
        supervisor = Supervisor(observer=metrics, max_backoff_s=0.1)
        manager = ModelManager(
            registry, artifacts, ServingSettings(alias_refresh_s=0.01), supervisor=supervisor
        )
        policies = PolicyStore(database, registry, clock)
        router = TrafficRouter(
            policies, manager, clock, registry=registry, refresh_s=0.01, supervisor=supervisor
        )
        try:
            yield Node(database, registry, policies, manager, router, supervisor, metrics)
        finally:
            await router.aclose()
            await manager.aclose()
            await supervisor.aclose()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds; fail after 20 s."""
    try:
        async with asyncio.timeout(20):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def applies(router: TrafficRouter, model: str, revision: int) -> Callable[[], bool]:
    def check() -> bool:
        policy = router.policy(model)
        return policy is not None and policy.revision == revision

    return check


async def test_a_failed_warm_up_for_a_model_without_policy_leaves_it_on_its_aliases(
    node: Node,
) -> None:
    await node.policies.set_weights("a", {2: 100})  # version 2 fails its warm-up
    await node.router.refresh()  # it used to raise "dictionary changed size during iteration"
    assert node.router.policy("a") is None  # a's requests keep following its aliases


async def test_the_refresher_keeps_applying_policies_after_a_failed_warm_up(node: Node) -> None:
    await node.router.start()
    await node.policies.set_weights("a", {2: 100})  # fails on this node, which had no policy
    later = await node.policies.set_weights("b", {1: 50, 2: 50})
    await eventually(applies(node.router, "b", later.revision), "b's policy applied")
    assert node.router.policy("a") is None

    fixed = await node.policies.set_weights("a", {1: 100})
    await eventually(applies(node.router, "a", fixed.revision), "a's new policy applied")
    cleared = await node.policies.clear("b")
    await eventually(lambda: node.router.policy("b") is None, f"b cleared ({cleared})")
    assert node.supervisor.failing() == []


async def rename(database: Database, old: str, new: str) -> None:
    def run(conn: Connection) -> None:
        conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    await database.run(run)


def failures(node: Node, loop: str) -> float:
    sample = {"loop": loop}
    value = node.metrics.registry.get_sample_value(
        "interlock_background_loop_failures_total", sample
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("table", "loop"), [("traffic_policies", "traffic-refresh"), ("model_aliases", "alias-refresh")]
)
async def test_a_refresher_whose_database_fails_is_reported_then_recovers(
    node: Node, table: str, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    await node.router.start()
    await node.manager.start()
    with caplog.at_level(logging.INFO, logger="interlock.resilience"):
        await rename(node.database, table, "gone")
        await eventually(lambda: failures(node, loop) >= 3, f"{loop} failed three times")
        assert node.supervisor.failing() == [loop]
        await rename(node.database, "gone", table)
        await eventually(lambda: node.supervisor.failing() == [], f"{loop} recovered")
    records = [r for r in caplog.records if r.name == "interlock.resilience"]
    lines = [(r.levelname, r.getMessage()) for r in records]
    assert lines[0] == (
        "ERROR",
        f"background loop {loop!r} failed; it goes on, retrying with backoff",
    )
    assert lines[1][0] == "INFO" and lines[1][1].startswith(f"background loop {loop!r} recovered")
    assert len(lines) == 2  # once, however many tries failed
    assert f"no such table: {table}" in records[0].__dict__["error"]

    # And the refresher still applies what it is told.
    later = await node.policies.set_weights("b", {2: 100})
    await eventually(applies(node.router, "b", later.revision), "b's policy applied")


async def test_a_closed_policy_store_makes_the_refresher_fail_not_die(node: Node) -> None:
    await node.router.start()
    await node.database.aclose()
    await eventually(lambda: failures(node, "traffic-refresh") >= 2, "refresh failed twice")
    [status] = [s for s in node.supervisor.status() if s.name == "traffic-refresh"]
    assert status.failing and status.error is not None and "is closed" in status.error
