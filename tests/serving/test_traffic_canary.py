"""The canary guard: every branch of evaluate_canary, with the reasons an operator reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from interlock.serving.traffic import (
    CanaryAction,
    CanaryDecision,
    CanaryPlan,
    CanaryStatus,
    WindowStats,
    evaluate_canary,
)

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
