"""``describe`` never gives empty text; ``Backoff`` waits with jitter under a cap and logs
one warning per failure streak (and one line when it ends)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from interlock.bus import BusError
from interlock.bus.retry import Backoff, describe, quiet_repeats


class _SilentError(Exception):
    def __str__(self) -> str:
        return ""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), "timed out (TimeoutError)"),
        (ConnectionError(), "ConnectionError"),
        (BusError("cannot reach Kafka at h:1: refused"), "cannot reach Kafka at h:1: refused"),
        (_SilentError(7), "_SilentError: _SilentError(7)"),
        (ValueError("   "), "ValueError: ValueError('   ')"),
    ],
)
def test_a_description_is_never_empty(exc: BaseException, expected: str) -> None:
    assert describe(exc) == expected


def test_delays_grow_to_the_cap_with_jitter() -> None:
    backoff = Backoff("x", logging.getLogger("t"), first_s=0.1, max_s=1.0, rng=random.Random(1))
    delays = [backoff.failed(BusError("down")) for _ in range(8)]
    caps = [min(1.0, 0.1 * 2**i) for i in range(8)]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert max(delays) <= 1.0


def test_one_warning_per_streak_and_one_line_at_recovery(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("interlock.test.retry")
    backoff = Backoff("joining the group 'g'", logger, rng=random.Random(1))
    with caplog.at_level(logging.DEBUG, logger.name):
        for _ in range(5):
            backoff.failed(BusError("cannot reach Kafka at h:1: refused"))
        backoff.succeeded()
        backoff.succeeded()  # no streak: nothing to say
        backoff.failed(TimeoutError())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [r.getMessage().split(";")[0] for r in warnings] == [
        "joining the group 'g' failed: cannot reach Kafka at h:1: refused",
        "joining the group 'g' failed: timed out (TimeoutError)",
    ]
    assert len(infos) == 1 and "works again after 5 failure(s)" in infos[0].getMessage()


async def test_a_wait_ends_when_stop_is_set() -> None:
    backoff = Backoff("x", logging.getLogger("t"), first_s=60.0, max_s=60.0)
    stop = asyncio.Event()
    stop.set()
    async with asyncio.timeout(10):  # a bound on a hang, not a measure
        await backoff.wait(BusError("down"), stop)
    assert backoff.failures == 1


def test_a_librarys_repeated_lines_come_through_once(caplog: pytest.LogCaptureFixture) -> None:
    quiet_repeats("interlock_test_lib")
    noisy = logging.getLogger("interlock_test_lib.conn")
    quiet_repeats("interlock_test_lib")  # made after the first call: filtered from now on
    with caplog.at_level(logging.WARNING, "interlock_test_lib"):
        for attempt in range(20):
            noisy.error("Unable connect to node with id %s: %s", 1, f"refused #{attempt}")
        noisy.error("Unable to update metadata from %s", [1])
    assert [r.getMessage() for r in caplog.records] == [
        "Unable connect to node with id 1: refused #0",
        "Unable to update metadata from [1]",
    ]
