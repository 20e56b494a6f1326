"""The traffic refresher on real components: it keeps applying policies whatever fails.

A registry on SQLite with python models, the policy store, the model manager and the
router, as one serving node holds them; the refresher runs every 10 ms.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from interlock._core.clock import SystemClock
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
        supervisor = Supervisor()
        manager = ModelManager(
            registry, artifacts, ServingSettings(alias_refresh_s=3600), supervisor=supervisor
        )
        policies = PolicyStore(database, registry, clock)
        router = TrafficRouter(
            policies, manager, clock, registry=registry, refresh_s=0.01, supervisor=supervisor
        )
        try:
            yield Node(database, registry, policies, manager, router, supervisor)
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
