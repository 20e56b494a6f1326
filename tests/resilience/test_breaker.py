"""CircuitBreaker: every transition, the sliding window, and the config."""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest

from interlock.errors import ConfigError
from interlock.resilience import BreakerConfig, BreakerState, BreakerStats, CircuitBreaker
from interlock.settings import BreakerSettings
from tests.clock import ManualClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

Transition = tuple[str, BreakerState, BreakerState]


def make(**config: Any) -> tuple[CircuitBreaker, ManualClock, list[Transition]]:
    """A breaker on a manual clock, with its transitions collected in a list."""
    clock = ManualClock()
    seen: list[Transition] = []
    breaker = CircuitBreaker(
        "m:1", BreakerConfig(**config), clock, lambda *t: seen.append((t[0], t[1], t[2]))
    )
    return breaker, clock, seen


def call(breaker: CircuitBreaker, ok: bool = True, duration_s: float = 0.01) -> None:
    """One admitted call with its verdict."""
    assert breaker.allow()
    breaker.record(duration_s, ok)


def trip(breaker: CircuitBreaker) -> None:
    """Open a closed breaker with failures."""
    while breaker.state is CLOSED:
        call(breaker, ok=False)


# -- config --------------------------------------------------------------------------
def test_config_defaults_match_the_settings_defaults() -> None:
    assert BreakerConfig.from_settings(BreakerSettings()) == BreakerConfig()


def test_from_settings_turns_milliseconds_into_seconds() -> None:
    settings = BreakerSettings(slow_call_ms=250, window_calls=20, min_calls=5, open_s=2)
    assert BreakerConfig.from_settings(settings) == BreakerConfig(
        slow_call_s=0.25, window_calls=20, min_calls=5, open_s=2.0
    )


def test_from_settings_reports_an_unusable_combination_as_config_error() -> None:
    with pytest.raises(ConfigError, match="min_calls"):
        BreakerConfig.from_settings(BreakerSettings(window_calls=5, min_calls=10))


BAD_VALUES = {
    "failure_rate": (0.0, 1.5, float("nan")),
    "slow_call_rate": (0.0, 1.01),
    "slow_call_s": (0.0,),
    "window_calls": (0,),
    "min_calls": (0, 51),
    "open_s": (-1.0,),
    "half_open_calls": (0,),
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD_VALUES.items() for v in vs])
def test_config_refuses_a_bad_value_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**{field: value})


# -- closed → open -------------------------------------------------------------------
@pytest.mark.parametrize("last_ok", [False, True])
def test_no_decision_before_min_calls(last_ok: bool) -> None:
    breaker, _, seen = make(min_calls=10)
    for _ in range(9):
        call(breaker, ok=False)
    assert breaker.state is CLOSED
    assert (breaker.failure_rate(), breaker.retry_after_s()) == (1.0, 0.0)
    call(breaker, ok=last_ok)  # the 10th call decides, even a success (9 of 10 failed)
    assert breaker.state is OPEN
    assert seen == [("m:1", CLOSED, OPEN)]


def test_opens_when_the_failure_rate_reaches_the_threshold() -> None:
    breaker, _, _ = make(failure_rate=0.5, window_calls=4, min_calls=4)
    for ok in (False, True, True):
        call(breaker, ok=ok)
    call(breaker, ok=True)  # 1 of 4 failed
    assert breaker.state is CLOSED
    call(breaker, ok=False)  # the first failure falls out: 1 of 4 again
    assert breaker.state is CLOSED
    call(breaker, ok=False)  # 2 of 4: exactly the threshold
    assert breaker.state is OPEN


def test_opens_when_the_slow_call_rate_reaches_the_threshold() -> None:
    breaker, _, seen = make(slow_call_rate=0.5, slow_call_s=1.0, window_calls=4, min_calls=4)
    call(breaker, duration_s=0.99)
    call(breaker, duration_s=0.2)
    call(breaker, duration_s=1.0)  # at slow_call_s counts as slow
    assert breaker.state is CLOSED
    call(breaker, duration_s=3.0)
    assert breaker.state is OPEN
    assert breaker.failure_rate() == 0.0
    assert breaker.slow_call_rate() == 0.5
    assert seen == [("m:1", CLOSED, OPEN)]


def test_slow_call_rate_of_one_never_opens_on_slow_calls_alone() -> None:
    breaker, _, _ = make(slow_call_rate=1.0, window_calls=5, min_calls=5)
    for _ in range(20):
        call(breaker, duration_s=60.0)
    assert breaker.state is CLOSED
    assert breaker.stats == BreakerStats(CLOSED, 5, 0, 5, 0)


# -- the sliding window --------------------------------------------------------------
def test_rates_follow_the_window_as_old_calls_fall_out() -> None:
    breaker, _, _ = make(failure_rate=1.0, window_calls=4, min_calls=1, slow_call_s=1.0)
    call(breaker, ok=True)
    call(breaker, ok=False, duration_s=2.0)
    call(breaker, ok=True, duration_s=2.0)
    call(breaker, ok=True)
    assert (breaker.failure_rate(), breaker.slow_call_rate()) == (0.25, 0.5)
    call(breaker)  # drops the first call (good, fast)
    assert (breaker.failure_rate(), breaker.slow_call_rate()) == (0.25, 0.5)
    call(breaker)  # drops the failed slow one
    assert (breaker.failure_rate(), breaker.slow_call_rate()) == (0.0, 0.25)
    call(breaker)  # drops the last slow one
    assert breaker.stats == BreakerStats(CLOSED, 4, 0, 0, 0)


def test_window_counts_match_a_rescan_over_many_random_calls() -> None:
    rng = random.Random(7)
    config = {"failure_rate": 0.6, "slow_call_rate": 0.7, "window_calls": 9, "min_calls": 5}
    breaker, clock, _ = make(**config, slow_call_s=1.0, half_open_calls=1)
    window: deque[tuple[bool, bool]] = deque(maxlen=9)
    opened = 0
    for _ in range(5000):
        ok, duration_s = rng.random() > 0.35, rng.choice((0.1, 0.5, 1.0, 2.0))
        call(breaker, ok=ok, duration_s=duration_s)
        window.append((not ok, duration_s >= 1.0))
        failed = sum(f for f, _ in window)
        slow = sum(s for _, s in window)
        expect_open = len(window) >= 5 and (
            failed / len(window) >= 0.6 or slow / len(window) >= 0.7
        )
        if breaker.state is OPEN:
            assert expect_open
            opened += 1
            clock.advance(5.0)
            call(breaker)  # one good probe closes it with an empty window
            window.clear()
            continue
        assert expect_open is False
        assert breaker.stats == BreakerStats(CLOSED, len(window), failed, slow, 0)
    assert opened > 10  # the run crossed both ways many times


# -- open → half_open ----------------------------------------------------------------
def test_open_refuses_until_open_s_has_passed() -> None:
    breaker, clock, seen = make(open_s=5.0)
    trip(breaker)
    assert breaker.retry_after_s() == 5.0
    clock.advance(4.5)
    assert breaker.allow() is False
    assert breaker.retry_after_s() == 0.5
    assert breaker.state is OPEN
    clock.advance(0.5)
    assert breaker.retry_after_s() == 0.0
    assert breaker.allow() is True
    assert breaker.state is HALF_OPEN
    assert breaker.stats.not_permitted_calls == 1
    assert seen == [("m:1", CLOSED, OPEN), ("m:1", OPEN, HALF_OPEN)]


def test_reading_the_state_applies_the_open_timeout() -> None:
    breaker, clock, seen = make(open_s=1.0)
    trip(breaker)
    clock.advance(3.0)
    assert breaker.retry_after_s() == 0.0
    assert breaker.state is HALF_OPEN
    assert breaker.state is HALF_OPEN
    assert seen == [("m:1", CLOSED, OPEN), ("m:1", OPEN, HALF_OPEN)]


# -- half_open → closed or open ------------------------------------------------------
def test_good_probes_close_it_with_an_empty_window() -> None:
    breaker, clock, seen = make(half_open_calls=3, failure_rate=0.5)
    trip(breaker)
    clock.advance(5.0)
    call(breaker, ok=False)
    call(breaker)
    assert breaker.state is HALF_OPEN
    assert breaker.stats == BreakerStats(HALF_OPEN, 2, 1, 0, 0)
    assert (breaker.failure_rate(), breaker.slow_call_rate()) == (0.5, 0.0)
    call(breaker)  # 1 of 3 failed: under 0.5
    assert breaker.state is CLOSED
    assert breaker.stats == BreakerStats(CLOSED, 0, 0, 0, 0)
    assert breaker.failure_rate() == 0.0
    assert seen == [
        ("m:1", CLOSED, OPEN),
        ("m:1", OPEN, HALF_OPEN),
        ("m:1", HALF_OPEN, CLOSED),
    ]


@pytest.mark.parametrize(("ok", "duration_s"), [(False, 0.1), (True, 1.5)], ids=["failed", "slow"])
def test_bad_probes_open_it_again_with_a_new_timer(ok: bool, duration_s: float) -> None:
    breaker, clock, seen = make(half_open_calls=2, failure_rate=0.5, slow_call_rate=0.5)
    trip(breaker)
    clock.advance(7.0)
    call(breaker)
    call(breaker, ok=ok, duration_s=duration_s)  # 1 of 2: at the threshold
    assert breaker.state is OPEN
    assert breaker.retry_after_s() == 5.0
    assert breaker.allow() is False
    assert seen[-2:] == [("m:1", OPEN, HALF_OPEN), ("m:1", HALF_OPEN, OPEN)]


def test_half_open_admits_at_most_half_open_calls_probes() -> None:
    breaker, clock, _ = make(half_open_calls=2)
    trip(breaker)
    clock.advance(5.0)
    assert [breaker.allow() for _ in range(3)] == [True, True, False]
    breaker.record(0.01, True)  # a result does not give its permit back
    assert breaker.allow() is False
    assert breaker.stats == BreakerStats(HALF_OPEN, 1, 0, 0, 2)


def test_release_frees_a_probe_slot_without_counting() -> None:
    breaker, clock, _ = make(half_open_calls=2)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.allow() and breaker.allow()
    breaker.release()  # e.g. cancelled before reaching the model
    assert breaker.stats.calls == 0
    assert breaker.allow() is True
    assert breaker.allow() is False
    breaker.record(0.01, True)
    breaker.record(0.01, True)
    assert breaker.state is CLOSED


def test_release_without_an_outstanding_probe_does_nothing() -> None:
    breaker, clock, _ = make(half_open_calls=1)
    breaker.release()  # closed: nothing to give back
    assert breaker.stats == BreakerStats(CLOSED, 0, 0, 0, 0)
    trip(breaker)
    breaker.release()  # open
    clock.advance(5.0)
    assert breaker.state is HALF_OPEN
    breaker.release()  # half-open, no permit handed out yet
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_results_recorded_while_open_are_ignored() -> None:
    breaker, clock, seen = make(window_calls=10, min_calls=2, half_open_calls=1)
    assert breaker.allow() and breaker.allow()  # two calls in flight
    trip(breaker)
    before = breaker.stats
    breaker.record(0.01, True)  # their verdicts arrive late
    breaker.record(0.01, False)
    assert breaker.stats == before
    clock.advance(10.0)  # even past open_s, until a probe is admitted
    breaker.record(0.01, False)
    assert breaker.state is HALF_OPEN
    assert breaker.stats.calls == 0
    assert seen == [("m:1", CLOSED, OPEN), ("m:1", OPEN, HALF_OPEN)]


def test_works_without_a_transition_hook() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("plain", BreakerConfig(min_calls=1, window_calls=1), clock)
    call(breaker, ok=False)
    assert breaker.state is OPEN
    assert repr(breaker) == "CircuitBreaker('plain', state=open)"
