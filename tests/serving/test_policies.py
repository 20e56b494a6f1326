"""The policy store on real SQLite and PostgreSQL: round trips, revisions, CAS, events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from interlock.errors import ModelNotFoundError, TrafficError
from interlock.registry import Registry
from interlock.runtime.loaders import inspect_artifact
from interlock.serving.policies import PolicyStore, TrafficEventKind
from interlock.serving.traffic import (
    CanaryAction,
    CanaryDecision,
    CanaryStatus,
    Fallback,
    TrafficPolicy,
)
from interlock.store import ArtifactStore, Database
from interlock.store.tables import traffic_policies
from tests.registry.sample_models import SUM_MODEL

START = datetime(2025, 3, 4, 5, 0, 0, tzinfo=UTC)


class ManualClock:
    """Stands still until the test moves it."""

    def __init__(self) -> None:
        self.current = START

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return (self.current - START).total_seconds()

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with Database(database_url) as database:
        database.migrate()
        yield database


@pytest.fixture
def make_store(
    db: Database, tmp_path: Path, clock: ManualClock
) -> Callable[[], tuple[Registry, PolicyStore]]:
    """A registry and a policy store on the test database; each call is another 'node'."""

    def make() -> tuple[Registry, PolicyStore]:
        registry = Registry(db, ArtifactStore(tmp_path / "artifacts"), inspect_artifact, clock)
        return registry, PolicyStore(db, registry, clock)

    return make


@pytest.fixture
async def store(
    make_store: Callable[[], tuple[Registry, PolicyStore]], tmp_path: Path
) -> PolicyStore:
    """A store where ``fraud`` has versions 1–4 (champion 2) and ``other`` has 1."""
    registry, policies = make_store()
    source = tmp_path / "model.py"
    source.write_text(SUM_MODEL)
    for _ in range(4):
        await registry.register("fraud", source, "python", allow_duplicate=True)
    await registry.set_alias("fraud", "champion", 2)
    await registry.register("other", source, "python")
    return policies


async def test_set_get_and_snapshot_round_trip(store: PolicyStore, clock: ManualClock) -> None:
    assert await store.get("fraud") is None
    assert await store.snapshot() == {}

    fallback = Fallback({"score": 0.0, "why": ["degraded"]})
    policy = await store.set_weights("fraud", {1: 80, 2: 20}, shadow=3, fallback=fallback)
    expected = TrafficPolicy(
        "fraud", {1: 80, 2: 20}, shadow=3, fallback=fallback, revision=1, updated_at=START
    )
    assert policy == expected
    assert await store.get("fraud") == expected
    assert await store.get("other") is None

    clock.advance(5)
    await store.set_weights("other", {1: 1})
    snapshot = await store.snapshot()
    assert snapshot == {
        "fraud": expected,
        "other": TrafficPolicy("other", {1: 1}, revision=1, updated_at=clock.current),
    }
    again = await store.snapshot()
    assert again["fraud"] is snapshot["fraud"]  # unchanged revisions are not rebuilt


async def test_unknown_versions_and_models_are_refused(store: PolicyStore) -> None:
    missing = r"fraud: version 9 does not exist \(versions: 1, 2, 3, 4\)"
    with pytest.raises(TrafficError, match=missing):
        await store.set_weights("fraud", {1: 50, 9: 50})
    with pytest.raises(TrafficError, match="version 7 does not exist"):
        await store.set_weights("fraud", {1: 100}, shadow=7)
    with pytest.raises(TrafficError, match="weight for version 2 must be ≥ 0"):
        await store.set_weights("fraud", {1: 100, 2: -5})
    with pytest.raises(ModelNotFoundError, match="no model named 'nope'"):
        await store.set_weights("nope", {1: 100})
    with pytest.raises(TrafficError, match="version 9 does not exist"):
        await store.start_canary("fraud", 9)
    assert await store.get("fraud") is None
    assert await store.events("fraud") == []


async def test_revisions_only_grow_even_across_clear(store: PolicyStore) -> None:
    assert (await store.set_weights("fraud", {1: 100})).revision == 1
    assert (await store.set_weights("fraud", {1: 50, 2: 50})).revision == 2
    assert await store.clear("fraud") is True
    assert await store.get("fraud") is None
    assert await store.clear("fraud") is False
    assert (await store.set_weights("fraud", {1: 100})).revision == 4
    events = await store.events("fraud")
    assert [(e.kind, e.revision) for e in events] == [
        (TrafficEventKind.SET, 4),
        (TrafficEventKind.SET, 3),
        (TrafficEventKind.SET, 2),
        (TrafficEventKind.SET, 1),
    ]
    assert events[1].message == "policy cleared; requests follow the model's aliases"
    assert events[2].message == "weights 1=50 2=50"
    assert [e.revision for e in await store.events("fraud", limit=2)] == [4, 3]


async def test_a_canary_starts_against_the_champion(store: PolicyStore) -> None:
    policy = await store.start_canary(
        "fraud", 3, weight=10, interval_s=30, max_error_rate=0.05, max_p99_ms=250
    )
    assert policy.weights == {2: 100}
    assert policy.canary is not None
    assert (policy.canary.version, policy.canary.stable) == (3, 2)
    assert policy.canary.steps == (10, 25, 50, 100)
    assert policy.effective_weights() == {2: 90.0, 3: 10.0}
    assert await store.get("fraud") == policy
    (event,) = await store.events("fraud")
    assert event.kind is TrafficEventKind.CANARY_STARTED
    assert event.message == (
        "version 3 at 10% against version 2; steps 10%/25%/50%/100% every 30 s;"
        " error rate ≤ 0.05 and p99 ≤ 250 ms after 100 requests"
    )


async def test_a_canary_starts_against_the_heaviest_version(store: PolicyStore) -> None:
    await store.set_weights("fraud", {1: 30, 3: 60, 4: 10}, shadow=2)
    policy = await store.start_canary("fraud", 4, steps=[5, 50], unguarded=True)
    assert policy.canary is not None and policy.canary.stable == 3
    assert policy.weights == {1: 30, 3: 70}  # the canary's own weight went to stable
    assert policy.shadow == 2
    assert policy.effective_weights() == pytest.approx({1: 30, 3: 65, 4: 5})

    with pytest.raises(TrafficError, match="the canary of version 4 is still running"):
        await store.start_canary("fraud", 1, unguarded=True)
    # Setting weights ends the canary; a shadow can then become the canary.
    ended = await store.set_weights("fraud", {3: 100}, shadow=2)
    assert ended.canary is None
    assert "cancels the canary of version 4" in (await store.events("fraud"))[0].message
    promoted_shadow = await store.start_canary("fraud", 2, steps=[20], unguarded=True)
    assert promoted_shadow.shadow is None
    await store.set_weights("fraud", {3: 100})
    with pytest.raises(TrafficError, match="version 3 already takes the most traffic"):
        await store.start_canary("fraud", 3, unguarded=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": 10, "steps": [5, 50]}, "weight 10 must be the first step"),
        ({"steps": [50, 25], "unguarded": True}, "canary steps must rise"),
        ({"interval_s": 0, "unguarded": True}, "canary interval must be > 0 s"),
        ({"max_error_rate": 2.0}, "max error rate must be within 0..1"),
        ({"unguarded": False}, "a canary needs a guard"),
    ],
)
async def test_bad_canaries_are_refused(
    store: PolicyStore, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TrafficError, match=message):
        await store.start_canary("fraud", 3, **kwargs)  # type: ignore[arg-type]
    assert await store.get("fraud") is None


async def test_a_canary_advances_then_is_promoted(store: PolicyStore, clock: ManualClock) -> None:
    policy = await store.start_canary("fraud", 3, steps=[10, 100], unguarded=True)
    clock.advance(60)
    advance = CanaryDecision(CanaryAction.ADVANCE, "healthy at 10%")
    advanced = await store.update_canary("fraud", advance, policy.revision)
    assert advanced is not None and advanced.canary is not None
    assert (advanced.revision, advanced.canary.weight) == (policy.revision + 1, 100)
    assert advanced.canary.updated_at == clock.current
    assert await store.get("fraud") == advanced

    clock.advance(60)
    promote = CanaryDecision(CanaryAction.PROMOTE, "healthy at 100%: version 3 promoted")
    promoted = await store.update_canary("fraud", promote, advanced.revision)
    assert promoted is not None and promoted.canary is not None
    assert promoted.weights == {3: 100}
    assert promoted.canary.status is CanaryStatus.PROMOTED
    kinds = [(e.kind.value, e.message) for e in await store.events("fraud")]
    assert kinds[:2] == [
        ("canary_promoted", "healthy at 100%: version 3 promoted"),
        ("canary_advanced", "healthy at 10%"),
    ]
    # Nothing to decide any more.
    assert await store.update_canary("fraud", advance, promoted.revision) is None


async def test_hold_and_stale_decisions_change_nothing(store: PolicyStore) -> None:
    policy = await store.start_canary("fraud", 3, unguarded=True)
    hold = CanaryDecision(CanaryAction.HOLD, "waiting")
    assert await store.update_canary("fraud", hold, policy.revision) is None
    stale = CanaryDecision(CanaryAction.ROLLBACK, "too late")
    assert await store.update_canary("fraud", stale, policy.revision - 1) is None
    assert await store.update_canary("other", stale, 1) is None
    assert await store.get("fraud") == policy


async def test_two_nodes_deciding_the_same_window_apply_it_once(
    store: PolicyStore, make_store: Callable[[], tuple[Registry, PolicyStore]]
) -> None:
    policy = await store.start_canary("fraud", 3, max_error_rate=0.05)
    nodes = [make_store()[1] for _ in range(4)]
    why = "canary error rate 0.40 > max 0.05 over 120 requests (stable 0.00)"
    decision = CanaryDecision(CanaryAction.ROLLBACK, why)
    results = await asyncio.gather(
        *(node.update_canary("fraud", decision, policy.revision) for node in nodes)
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].revision == policy.revision + 1
    assert winners[0].canary is not None and winners[0].canary.reason == why
    events = await store.events("fraud")
    assert [e.kind for e in events] == [
        TrafficEventKind.CANARY_ROLLED_BACK,
        TrafficEventKind.CANARY_STARTED,
    ]


async def test_concurrent_writes_get_distinct_revisions(
    store: PolicyStore, make_store: Callable[[], tuple[Registry, PolicyStore]]
) -> None:
    nodes = [make_store()[1] for _ in range(6)]
    written = await asyncio.gather(
        *(node.set_weights("fraud", {1: 100 - i, 2: i}) for i, node in enumerate(nodes))
    )
    assert sorted(p.revision for p in written) == [1, 2, 3, 4, 5, 6]
    final = await store.get("fraud")
    assert final is not None and final.revision == 6
    assert final == next(p for p in written if p.revision == 6)


async def test_describe_shows_the_last_rollback_after_the_policy_moved_on(
    store: PolicyStore,
) -> None:
    policy = await store.start_canary("fraud", 3, max_p99_ms=250)
    why = "canary p99 812 ms > max 250 ms"
    await store.update_canary("fraud", CanaryDecision(CanaryAction.ROLLBACK, why), policy.revision)
    shown = await store.describe("fraud")
    assert shown["effective_weights"] == {"2": 100.0, "3": 0.0}
    assert shown["last_rollback"]["message"] == why  # type: ignore[index,call-overload]
    assert shown["policy"]["canary"]["status"] == "rolled_back"  # type: ignore[index,call-overload]

    await store.set_weights("fraud", {2: 100})
    shown = await store.describe("fraud", limit=1)
    assert shown["last_rollback"]["message"] == why  # type: ignore[index,call-overload]
    assert len(shown["events"]) == 1  # type: ignore[arg-type]
    assert (await store.describe("other"))["policy"] is None
    with pytest.raises(ModelNotFoundError):
        await store.describe("nope")


async def test_recorded_events_keep_the_revision(store: PolicyStore) -> None:
    await store.set_weights("fraud", {1: 100}, fallback=Fallback(0.0))
    event = await store.record("fraud", TrafficEventKind.FALLBACK, "12 rows answered by fallback")
    assert (event.kind, event.revision, event.at) == (TrafficEventKind.FALLBACK, 1, START)
    assert (await store.events("fraud"))[0] == event
    assert (await store.get("fraud")).revision == 1  # type: ignore[union-attr]


async def test_an_unreadable_row_is_skipped_by_the_poll(
    store: PolicyStore, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await store.set_weights("fraud", {1: 100})
    await store.set_weights("other", {1: 100})
    await db.run(
        lambda c: c.execute(
            sa.update(traffic_policies)
            .where(traffic_policies.c.model == "other")
            .values(policy={"weights": "broken"}, revision=99)
        )
    )
    snapshot = await store.snapshot()
    assert list(snapshot) == ["fraud"]
    assert "unreadable traffic policy" in caplog.text
    with pytest.raises(TrafficError, match="not a stored traffic policy"):
        await store.get("other")


async def test_setting_weights_keeps_the_shadow_and_fallback_unless_told(
    store: PolicyStore,
) -> None:
    fallback = Fallback({"score": 0.0})
    await store.set_weights("fraud", {1: 100}, shadow=3, fallback=fallback)
    kept = await store.set_weights("fraud", {1: 80, 2: 20})
    assert (kept.shadow, kept.fallback) == (3, fallback)
    promoted = await store.set_weights("fraud", {1: 50, 3: 50})  # the shadow takes traffic
    assert (promoted.shadow, promoted.fallback) == (None, fallback)
    replaced = await store.set_weights("fraud", {1: 100}, shadow=4, fallback=Fallback(1))
    assert (replaced.shadow, replaced.fallback) == (4, Fallback(1))
    cleared = await store.set_weights("fraud", {1: 100}, shadow=None, fallback=None)
    assert (cleared.shadow, cleared.fallback) == (None, None)
