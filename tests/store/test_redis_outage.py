"""The outage policy of every Redis caller, on a hand-moved clock and a seeded jitter."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from interlock.errors import UnavailableError, describe
from interlock.store.redis import (
    BACKOFF_FIRST_S,
    Outage,
    check_url,
    is_redis_url,
    observe,
)
from tests.clock import ManualClock

logger = logging.getLogger("tests.store.outage")
URL = "redis://:hunter2@127.0.0.1:1/0"
REFUSED = RedisConnectionError("Connection refused")


def make(clock: ManualClock, *, fails_open: bool = True, seed: int = 7) -> Outage:
    return Outage(
        "test store",
        URL,
        clock=clock,
        logger=logger,
        fails_open=fails_open,
        rng=random.Random(seed),
    )


def window(outage: Outage, clock: ManualClock, step: float = 0.01) -> float:
    """How long after now ``may_call`` first says yes (it is then the probe)."""
    waited = 0.0
    while not outage.may_call():
        clock.advance(step)
        waited += step
    return waited


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool | None]] = []

    def redis_failed(self, what: str) -> None:
        self.events.append(("failed", what, None))

    def redis_down(self, what: str, down: bool) -> None:
        self.events.append(("down", what, down))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    observe(recorder)
    yield recorder
    observe(None)


def test_up_it_lets_every_call_through() -> None:
    outage = make(ManualClock())
    assert all(outage.may_call() for _ in range(100))
    assert not outage.down
    assert outage.probes == 0


def test_after_a_failure_calls_are_skipped_then_exactly_one_probes() -> None:
    clock = ManualClock()
    outage = make(clock)
    assert outage.may_call()
    left_alone_s = outage.failed("get", REFUSED)
    assert BACKOFF_FIRST_S / 2 <= left_alone_s <= BACKOFF_FIRST_S
    assert not any(outage.may_call() for _ in range(1000))  # within the backoff
    clock.advance(left_alone_s)
    assert outage.may_call()  # the probe
    assert not any(outage.may_call() for _ in range(1000))  # while it is in flight
    assert outage.probes == 1
    assert outage.skipped == 2000
    outage.succeeded()
    assert not outage.down
    assert all(outage.may_call() for _ in range(10))


def test_the_backoff_doubles_up_to_its_cap_each_wait_jittered_in_its_upper_half() -> None:
    clock = ManualClock()
    outage = make(clock)
    outage.may_call()
    outage.failed("get", REFUSED)
    waits = []
    for _ in range(8):
        waits.append(window(outage, clock))
        outage.failed("get", REFUSED)  # the probe fails
    caps = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    for waited, cap in zip(waits, caps, strict=True):
        assert cap / 2 - 0.011 <= waited <= cap + 0.011, waits
    assert len({round(w, 2) for w in waits[4:]}) > 1  # jittered, not a fixed 5 s


def test_two_outages_with_other_seeds_come_back_at_other_times() -> None:
    clock_a, clock_b = ManualClock(), ManualClock()
    a, b = make(clock_a, seed=1), make(clock_b, seed=2)
    for outage in (a, b):
        outage.may_call()
    assert a.failed("get", REFUSED) != b.failed("get", REFUSED)


def test_stragglers_of_the_same_backoff_do_not_lengthen_it() -> None:
    clock = ManualClock()
    outage = make(clock)
    first = outage.failed("get", REFUSED)
    second = outage.failed("get", REFUSED)  # a call that was in flight when Redis died
    assert second == pytest.approx(first)
    clock.advance(first)
    assert outage.may_call()


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    clock = ManualClock()
    outage = make(clock)
    clock.advance(outage.failed("get", REFUSED))
    assert outage.may_call()
    outage.cancelled()
    assert outage.may_call()
    assert outage.probes == 2


def test_a_recovery_starts_the_backoff_again_from_the_first_delay() -> None:
    clock = ManualClock()
    outage = make(clock)
    for _ in range(5):
        clock.advance(outage.failed("get", REFUSED))
        assert outage.may_call()
    outage.succeeded()
    assert outage.failed("get", REFUSED) <= BACKOFF_FIRST_S


def test_one_warning_per_outage_and_one_info_line_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    clock = ManualClock()
    outage = make(clock)
    for _ in range(20):
        clock.advance(outage.failed("get", REFUSED))
        outage.may_call()
    clock.advance(1.0)
    outage.succeeded()
    outage.succeeded()  # up already: nothing to say

    lines = [r for r in caplog.records if r.name == logger.name]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    warning, info = (r.getMessage() for r in lines)
    assert warning.startswith("test store redis://:***@127.0.0.1:1/0 failed (get: ")
    assert "Connection refused" in warning
    assert "failing open until it answers" in warning
    assert "answers again after" in info
    assert "20 failed calls" in info
    assert all("hunter2" not in m for m in (warning, info))
    assert lines[0].exc_info is None  # a Redis error is no bug: no traceback


def test_an_error_that_is_not_redis_s_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = make(ManualClock())
    outage.failed("get", TypeError("a str, not bytes"))
    (warning,) = [r for r in caplog.records if r.name == logger.name]
    assert warning.exc_info is not None
    assert warning.exc_info[0] is TypeError


def test_a_caller_that_fails_closed_gets_an_unavailable_error_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    outage = make(clock, fails_open=False)
    outage.failed("get", TimeoutError())
    error = outage.unavailable("get", TimeoutError())
    assert isinstance(error, UnavailableError)
    assert error.retryable
    assert str(error) == (
        "test store redis://:***@127.0.0.1:1/0: get failed: timed out (TimeoutError)"
    )
    assert error.retry_after_s >= BACKOFF_FIRST_S / 2
    skipped = outage.unavailable("get")
    assert "down, retried later" in str(skipped)
    assert "refusing calls until it answers" in caplog.records[0].getMessage()


def test_the_observer_hears_each_failure_and_each_change_of_state(recorder: Recorder) -> None:
    clock = ManualClock()
    outage = make(clock)
    clock.advance(outage.failed("get", REFUSED))
    outage.may_call()
    outage.failed("get", REFUSED)
    outage.succeeded()
    assert recorder.events == [
        ("failed", "test store", None),
        ("down", "test store", True),
        ("failed", "test store", None),
        ("down", "test store", False),
    ]


def test_backoff_delays_must_make_sense() -> None:
    with pytest.raises(ValueError, match="backoff delays"):
        Outage("x", URL, clock=ManualClock(), logger=logger, fails_open=True, first_s=2, max_s=1)


def test_urls() -> None:
    assert is_redis_url("redis://h:1/0")
    assert is_redis_url("rediss://h:1/0")
    assert is_redis_url("unix:///tmp/redis.sock")
    assert not is_redis_url("memory://")
    check_url("redis://127.0.0.1:6379/0", "test")
    from interlock.errors import ConfigError

    with pytest.raises(ConfigError, match=r"invalid test URL 'redis://:\*\*\*@h:x/0'"):
        check_url("redis://:hunter2@h:x/0", "test")


@pytest.mark.parametrize(
    ("exc", "with_type", "expected"),
    [
        (TimeoutError(), False, "timed out (TimeoutError)"),
        (TimeoutError(), True, "timed out (TimeoutError)"),
        (REFUSED, True, "ConnectionError: Connection refused"),
        (REFUSED, False, "Connection refused"),
        (KeyError(), True, "KeyError"),
    ],
)
def test_describe_is_never_empty(exc: BaseException, with_type: bool, expected: str) -> None:
    assert describe(exc, with_type=with_type) == expected
