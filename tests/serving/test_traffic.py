"""Traffic policies as pure logic: rendezvous routing, shares, canary carving, JSON."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from interlock.errors import TrafficError
from interlock.serving.traffic import (
    CanaryAction,
    CanaryDecision,
    CanaryPlan,
    CanaryStatus,
    Fallback,
    TrafficPolicy,
    apply_decision,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
KEYS = [f"card-{i}" for i in range(10_000)]


def plan(version: int = 3, stable: int = 1, **changes: object) -> CanaryPlan:
    fields: dict[str, object] = {
        "version": version,
        "stable": stable,
        "steps": (5, 25, 50, 100),
        "step": 0,
        "interval_s": 60.0,
        "max_error_rate": 0.05,
        "max_p99_ms": 250.0,
        "min_requests": 100,
        "status": CanaryStatus.RUNNING,
        "reason": None,
        "started_at": NOW,
        "updated_at": NOW,
    }
    fields.update(changes)
    return CanaryPlan(**fields)  # type: ignore[arg-type]


def routes(policy: TrafficPolicy, keys: list[str] = KEYS) -> list[int]:
    return [policy.choose(key, 0.0) for key in keys]


def within_4_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


# -- sticky routing --------------------------------------------------------------------


def test_a_key_always_maps_to_the_same_version() -> None:
    policy = TrafficPolicy("fraud", {1: 80, 2: 20})
    first = routes(policy)
    assert routes(policy) == first
    rebuilt = TrafficPolicy.from_json(policy.to_json())  # another node, another process
    assert routes(rebuilt) == first
    assert [policy.choose(k, r) for k, r in zip(KEYS, (0.0, 0.99) * 5000, strict=True)] == first
    assert [policy.choose(k.encode(), 0.5) for k in KEYS] == first


def test_keys_split_by_weight() -> None:
    counts = Counter(routes(TrafficPolicy("fraud", {1: 80, 2: 20})))
    assert set(counts) == {1, 2}
    assert within_4_sigma(counts[2], len(KEYS), 0.2), counts


def test_a_model_name_decorrelates_routing() -> None:
    a = routes(TrafficPolicy("fraud", {1: 50, 2: 50}))
    b = routes(TrafficPolicy("onboarding", {1: 50, 2: 50}))
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert within_4_sigma(same, len(KEYS), 0.5)


def test_a_weight_change_moves_only_the_keys_that_must_move() -> None:
    before = routes(TrafficPolicy("fraud", {1: 80, 2: 20}))
    after = routes(TrafficPolicy("fraud", {1: 70, 2: 30}))
    moves = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    assert set(moves) == {(1, 2)}  # none from 2 to 1
    assert within_4_sigma(moves[(1, 2)], len(KEYS), 0.10), moves


def test_a_new_version_takes_keys_only_for_itself() -> None:
    before = routes(TrafficPolicy("fraud", {1: 80, 2: 20}))
    after = routes(TrafficPolicy("fraud", {1: 80, 2: 20, 3: 10}))
    moves = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    assert {to for _, to in moves} == {3}
    assert within_4_sigma(sum(moves.values()), len(KEYS), 10 / 110), moves


def test_advancing_a_canary_moves_keys_from_stable_to_canary_only() -> None:
    steps = [TrafficPolicy("fraud", {1: 100}, canary=plan(step=step)) for step in range(4)]
    for before, after in itertools.pairwise(steps):
        moved = Counter(
            (b, a) for b, a in zip(routes(before), routes(after), strict=True) if b != a
        )
        assert set(moved) == {(1, 3)}
        grew = after.effective_weights()[3] - before.effective_weights()[3]
        assert within_4_sigma(moved[(1, 3)], len(KEYS), grew / 100), moved


def test_with_more_versions_keys_move_only_towards_relatively_heavier_ones() -> None:
    steps = [TrafficPolicy("fraud", {1: 80, 2: 20}, canary=plan(step=step)) for step in range(4)]
    for before, after in itertools.pairwise(steps):
        moved = {(b, a) for b, a in zip(routes(before), routes(after), strict=True) if b != a}
        assert moved <= {(1, 2), (1, 3), (2, 3)}  # never back to stable, never off the canary


# -- unkeyed draws ---------------------------------------------------------------------


def test_draws_follow_the_weights() -> None:
    policy = TrafficPolicy("fraud", {1: 50, 2: 30, 3: 20, 4: 0})
    rng = random.Random(20250304)
    n = 100_000
    counts = Counter(policy.choose(None, rng.random()) for _ in range(n))
    assert set(counts) == {1, 2, 3}
    for version, share in ((1, 0.5), (2, 0.3), (3, 0.2)):
        assert within_4_sigma(counts[version], n, share), counts


def test_draws_at_the_edges_of_the_unit_interval() -> None:
    policy = TrafficPolicy("fraud", {1: 50, 2: 50})
    assert policy.choose(None, 0.0) == 1
    assert policy.choose(None, 0.5) == 2
    assert policy.choose(None, math.nextafter(1.0, 0.0)) == 2


def test_a_single_version_takes_everything() -> None:
    policy = TrafficPolicy("fraud", {7: 1, 8: 0})
    assert {policy.choose(k, 0.3) for k in KEYS[:100]} == {7}
    assert policy.choose(None, 0.99) == 7
    assert policy.versions == (7,)


# -- effective weights with a canary ---------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "canary", "expected"),
    [
        ({1: 100}, plan(), {1: 95, 3: 5}),
        ({1: 80, 2: 20}, plan(step=1), {1: 55, 2: 20, 3: 25}),
        # the stable share is too small: the rest comes from the others, in proportion
        ({1: 10, 2: 90}, plan(step=2), {1: 0, 2: 50, 3: 50}),
        ({1: 80, 2: 20}, plan(step=3), {1: 0, 2: 0, 3: 100}),
        ({1: 100}, plan(status=CanaryStatus.ROLLED_BACK, reason="r"), {1: 100, 3: 0}),
        ({3: 100}, plan(status=CanaryStatus.PROMOTED, reason="ok"), {3: 100}),
    ],
)
def test_effective_weights_carve_the_canary_out_of_stable(
    weights: dict[int, int], canary: CanaryPlan, expected: dict[int, float]
) -> None:
    policy = TrafficPolicy("fraud", weights, canary=canary)
    assert policy.effective_weights() == pytest.approx(expected)
    assert sum(policy.effective_weights().values()) == pytest.approx(100)
    assert policy.versions == tuple(v for v, p in expected.items() if p > 0)


def test_a_canary_takes_its_share_of_draws_and_keys() -> None:
    policy = TrafficPolicy("fraud", {1: 100}, canary=plan(step=1))
    rng = random.Random(7)
    draws = Counter(policy.choose(None, rng.random()) for _ in range(20_000))
    assert within_4_sigma(draws[3], 20_000, 0.25), draws
    assert within_4_sigma(Counter(routes(policy))[3], len(KEYS), 0.25)
    rolled_back = replace(policy, canary=plan(status=CanaryStatus.ROLLED_BACK, reason="r"))
    assert set(routes(rolled_back)) == {1}


# -- validation and JSON ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {1: 80, 3: -1}}, "weight for version 3 must be ≥ 0"),
        ({"weights": {1: 0, 2: 0}}, "at least one version needs a weight above 0"),
        ({"weights": {}}, "a policy needs weights"),
        ({"weights": {0: 100}}, "version number ≥ 1"),
        ({"weights": {1: 1.5}}, "weight for version 1 must be ≥ 0"),
        ({"weights": {1: 80, 2: 20}, "shadow": 2}, "shadow version 2 already takes traffic"),
        ({"weights": {1: 100}, "shadow": 3, "canary": plan()}, "shadow version 3 already"),
        ({"weights": {1: 90, 3: 10}, "canary": plan()}, "canary version 3 must not also have"),
        ({"weights": {2: 100}, "canary": plan()}, "canary stable version 1 has no weight"),
        ({"weights": {1: 100}, "updated_at": datetime(2025, 1, 1)}, "aware datetime"),
    ],
)
def test_invalid_policies_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TrafficError, match=message):
        TrafficPolicy("fraud", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": (5, 5, 50)}, "canary steps must rise strictly within 1..100"),
        ({"steps": (0, 50)}, "canary steps must rise"),
        ({"steps": (50, 101)}, "canary steps must rise"),
        ({"steps": ()}, "canary steps must rise"),
        ({"step": 4}, "canary step 4 is not in 0..3"),
        ({"interval_s": 0.0}, "canary interval must be > 0 s"),
        ({"max_error_rate": 1.5}, "max error rate must be within 0..1"),
        ({"max_p99_ms": -1.0}, "max p99 must be > 0 ms"),
        ({"min_requests": 0}, "min requests must be an integer ≥ 1"),
        ({"stable": 3}, "version 3 cannot be its own stable"),
    ],
)
def test_invalid_canary_plans_say_what_is_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(TrafficError, match=message):
        plan(**changes)


def test_json_round_trip() -> None:
    policy = TrafficPolicy(
        "fraud",
        {1: 80, 2: 20},
        shadow=4,
        canary=plan(version=3, stable=1, step=2, max_p99_ms=None),
        fallback=Fallback({"fraud_probability": 0.0, "labels": [None, "x"]}),
        revision=7,
        updated_at=NOW,
    )
    data = policy.to_json()
    assert data["weights"] == {"1": 80, "2": 20}
    assert data["canary"]["status"] == "running"  # type: ignore[call-overload,index]
    assert TrafficPolicy.from_json(data) == policy
    assert TrafficPolicy.from_json(TrafficPolicy("m", {1: 1}, updated_at=NOW).to_json()) == (
        TrafficPolicy("m", {1: 1}, updated_at=NOW)
    )
    static_null = TrafficPolicy("m", {1: 1}, fallback=Fallback(None), updated_at=NOW)
    assert TrafficPolicy.from_json(static_null.to_json()).fallback == Fallback(None)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("weights"),
        lambda d: d.update(weights={"one": 1}),
        lambda d: d.update(weights=[1, 2]),
        lambda d: d.update(updated_at="yesterday"),
        lambda d: d.update(updated_at="2025-01-01T00:00:00"),
        lambda d: d.update(revision="7"),
        lambda d: d["canary"].update(status="paused"),
        lambda d: d["canary"].update(interval_s="60s"),
        lambda d: d["canary"].pop("steps"),
        lambda d: d.update(fallback=3),
    ],
)
def test_malformed_json_is_a_traffic_error(damage: object) -> None:
    data = TrafficPolicy("fraud", {1: 100}, canary=plan(), updated_at=NOW).to_json()
    damage(data)  # type: ignore[operator]
    with pytest.raises(TrafficError):
        TrafficPolicy.from_json(data)


# -- applying canary decisions ---------------------------------------------------------


def test_apply_advance_promote_and_rollback() -> None:
    later = datetime(2025, 3, 4, 6, 0, 0, tzinfo=UTC)
    policy = TrafficPolicy("fraud", {1: 80, 2: 20}, shadow=4, canary=plan(), revision=3)

    advanced = apply_decision(policy, CanaryDecision(CanaryAction.ADVANCE, "ok"), later)
    assert advanced.canary is not None
    assert (advanced.canary.step, advanced.canary.weight, advanced.revision) == (1, 25, 4)
    assert advanced.canary.updated_at == later and advanced.updated_at == later

    last = replace(policy, canary=plan(step=3))
    promoted = apply_decision(last, CanaryDecision(CanaryAction.PROMOTE, "healthy"), later)
    assert promoted.weights == {3: 100} and promoted.shadow == 4
    assert promoted.canary is not None and promoted.canary.status is CanaryStatus.PROMOTED
    assert promoted.effective_weights() == {3: 100.0}

    why = "canary p99 812 ms > max 250 ms"
    rolled = apply_decision(policy, CanaryDecision(CanaryAction.ROLLBACK, why), later)
    assert rolled.canary is not None and rolled.canary.reason == why
    assert rolled.weights == {1: 80, 2: 20}
    assert rolled.effective_weights() == pytest.approx({1: 80, 2: 20, 3: 0})


def test_apply_refuses_what_cannot_be_applied() -> None:
    policy = TrafficPolicy("fraud", {1: 100}, canary=plan(step=3))
    with pytest.raises(TrafficError, match="last step"):
        apply_decision(policy, CanaryDecision(CanaryAction.ADVANCE, "ok"), NOW)
    with pytest.raises(TrafficError, match="no running canary"):
        apply_decision(policy, CanaryDecision(CanaryAction.HOLD, "wait"), NOW)
    with pytest.raises(TrafficError, match="no running canary"):
        apply_decision(
            TrafficPolicy("fraud", {1: 100}), CanaryDecision(CanaryAction.ROLLBACK, "x"), NOW
        )
