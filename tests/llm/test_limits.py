"""Exact sliding-window RPM/TPM limits, in memory and on the real Redis.

The memory limiter reads a :class:`ManualClock`, so windows slide only when a test moves
it. The Redis limiter follows Redis's own clock: the tests that need its window to slide
use a short ``window_s`` and poll, bounded, until the limit admits again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio

from interlock._core.clock import SystemClock
from interlock.errors import ConfigError, RateLimitedError
from interlock.llm.limits import (
    Limit,
    MemoryLimiter,
    Quota,
    RateLimiter,
    RedisLimiter,
    Reservation,
    acquire_within,
    format_reset,
    open_limiter,
)
from interlock.llm.limits.redis import _ACQUIRE_SHA
from interlock.store.redis import BACKOFF_MAX_S
from tests.cache.conftest import RedisServer, free_port, require_binary
from tests.clock import ManualClock
from tests.conftest import REDIS_URL, require_service

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    """A way to make limiters of one kind; memory ones read ``clock``."""

    kind: str
    make: Callable[..., RateLimiter]
    clock: ManualClock
    prefix: str


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "redis":
        require_service("Redis", REDIS_URL)
    clock = ManualClock()
    prefix = f"test:rl:{uuid.uuid4().hex}:"
    made: list[RateLimiter] = []

    def make(window_s: float = 60.0) -> RateLimiter:
        limiter: RateLimiter
        if kind == "memory":
            limiter = MemoryLimiter(window_s=window_s, clock=clock)
        else:
            limiter = RedisLimiter(REDIS_URL, window_s=window_s, key_prefix=prefix, timeout_s=10.0)
        made.append(limiter)
        return limiter

    yield Backend(kind, make, clock, prefix)
    for limiter in made:
        await limiter.aclose()
    if kind == "redis":
        await delete_prefix(prefix)


async def delete_prefix(prefix: str) -> None:
    async with redis.asyncio.Redis.from_url(REDIS_URL) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)


async def refusal(limiter: RateLimiter, limits: list[Limit], tokens: int) -> RateLimitedError:
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire(limits, tokens)
    return info.value


async def acquire_eventually(
    limiter: RateLimiter, limits: list[Limit], tokens: int, *, timeout_s: float = 10.0
) -> tuple[Reservation, Quota]:
    """Try until admitted, waiting what each refusal says; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await limiter.acquire(limits, tokens)
        except RateLimitedError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"still refused after {timeout_s} s: {exc}") from exc
            await asyncio.sleep(min(exc.retry_after_s, 0.1))


# -- requests ---------------------------------------------------------------------------


async def test_rpm_admits_exactly_n_in_a_burst_then_refuses_with_headers(
    backend: Backend,
) -> None:
    limiter = backend.make()
    tenant = Limit("tenant:dashboards", rpm=5)
    quotas = [(await limiter.acquire([tenant], 10))[1] for _ in range(5)]
    assert [q.remaining_requests for q in quotas] == [4, 3, 2, 1, 0]
    assert quotas[-1].headers() == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": format_reset(quotas[-1].reset_requests_s),
    }
    assert 59 < quotas[-1].reset_requests_s <= 60

    exc = await refusal(limiter, [tenant], 10)
    assert exc.limit == "tenant:dashboards:rpm"
    assert 0 < exc.retry_after_s <= 60
    assert exc.headers["x-ratelimit-limit-requests"] == "5"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert "tenant:dashboards:rpm" in str(exc)
    assert limiter.stats.admitted == 5
    assert limiter.stats.refused == 1
    await refusal(limiter, [tenant], 0)  # still full: the refusal took nothing either


async def test_memory_window_slides_exactly_when_the_oldest_leaves() -> None:
    clock = ManualClock()
    limiter = MemoryLimiter(clock=clock)
    limit = Limit("deployment:primary", rpm=3)
    await limiter.acquire([limit], 0)
    clock.advance(10)
    await limiter.acquire([limit], 0)
    await limiter.acquire([limit], 0)

    exc = await refusal(limiter, [limit], 0)
    assert exc.retry_after_s == 50.0
    assert exc.headers["x-ratelimit-reset-requests"] == "50s"
    clock.advance(49.999)
    assert (await refusal(limiter, [limit], 0)).retry_after_s == pytest.approx(0.001)
    clock.advance(0.001)
    _, quota = await limiter.acquire([limit], 0)  # the first one has just left
    assert quota.remaining_requests == 0
    assert quota.reset_requests_s == pytest.approx(0.0 + 10 - 0.0)  # the next leaves in 10 s
    assert (await refusal(limiter, [limit], 0)).retry_after_s == pytest.approx(10.0)


async def test_redis_window_slides_and_a_late_reconcile_changes_nothing() -> None:
    require_service("Redis", REDIS_URL)
    prefix = f"test:rl:{uuid.uuid4().hex}:"
    limit = Limit("tenant:fast", rpm=2, tpm=1000)
    try:
        # The window follows Redis's clock; 2 s holds three calls on a loaded machine.
        async with RedisLimiter(REDIS_URL, window_s=2.0, key_prefix=prefix) as limiter:
            first, _ = await limiter.acquire([limit], 100)
            await limiter.acquire([limit], 100)
            exc = await refusal(limiter, [limit], 100)
            assert exc.limit == "tenant:fast:rpm"
            assert 0 < exc.retry_after_s <= 2.0

            await acquire_eventually(limiter, [limit], 100)
            # The first reservation has left the window: making it huge takes no room.
            await limiter.reconcile(first, 100_000)
            try:  # at once: the keys expire 1 s after the last request, hiding a leak
                _, quota = await limiter.acquire([limit], 100)
                remaining = quota.remaining_tokens
            except RateLimitedError as exc:  # the rpm may still be spent
                remaining = int(exc.headers["x-ratelimit-remaining-tokens"])
            assert remaining >= 1000 - 3 * 100
    finally:
        await delete_prefix(prefix)


async def test_a_requests_only_limit_keeps_limiting_after_the_window_slides() -> None:
    """Entries that leave the window free 0 tokens: the script must not send HINCRBY -0."""
    require_service("Redis", REDIS_URL)
    prefix = f"test:rl:{uuid.uuid4().hex}:"
    limit = Limit("deployment:d", rpm=1, tpm=None)
    try:
        async with RedisLimiter(REDIS_URL, window_s=0.5, key_prefix=prefix) as limiter:
            await limiter.acquire([limit], 0)
            await acquire_eventually(limiter, [limit], 0)  # the first one left the window
            assert (limiter.stats.errors, limiter.stats.unchecked) == (0, 0)
            exc = await refusal(limiter, [limit], 0)  # and the limit still holds
            assert exc.limit == "deployment:d:rpm"
    finally:
        await delete_prefix(prefix)


# -- tokens -----------------------------------------------------------------------------


async def test_tpm_counts_reservations_and_reconciling_moves_the_room(backend: Backend) -> None:
    limiter = backend.make()
    limit = Limit("tenant:t", tpm=1000)
    first, quota = await limiter.acquire([limit], 600)  # prompt + max_tokens
    assert (quota.limit_tokens, quota.remaining_tokens) == (1000, 400)
    assert quota.limit_requests is None
    assert "x-ratelimit-limit-requests" not in quota.headers()

    exc = await refusal(limiter, [limit], 500)
    assert exc.limit == "tenant:t:tpm"
    assert exc.headers["x-ratelimit-remaining-tokens"] == "400"
    assert 0 < exc.retry_after_s <= 60

    await limiter.reconcile(first, 300)  # the answer was shorter than max_tokens
    assert first.tokens == 300
    second, quota = await limiter.acquire([limit], 500)
    assert quota.remaining_tokens == 200

    await limiter.reconcile(second, 700)  # the upstream counted more than reserved
    exc = await refusal(limiter, [limit], 1)
    assert exc.headers["x-ratelimit-remaining-tokens"] == "0"
    await limiter.reconcile(second, 699)
    _, quota = await limiter.acquire([limit], 1)
    assert quota.remaining_tokens == 0


async def test_tpm_refusal_waits_for_enough_tokens_to_leave() -> None:
    clock = ManualClock()
    limiter = MemoryLimiter(clock=clock)
    limit = Limit("deployment:d", tpm=100)
    await limiter.acquire([limit], 30)
    clock.advance(5)
    await limiter.acquire([limit], 30)
    clock.advance(5)
    await limiter.acquire([limit], 30)
    # 90 taken; 70 more need the first two (60 tokens) to leave: at 65 s from the first.
    exc = await refusal(limiter, [limit], 70)
    assert exc.retry_after_s == 55.0
    clock.advance(54.5)
    await refusal(limiter, [limit], 70)
    clock.advance(0.5)
    await limiter.acquire([limit], 70)


async def test_memory_reconcile_after_the_window_changes_nothing() -> None:
    clock = ManualClock()
    limiter = MemoryLimiter(clock=clock)
    limit = Limit("tenant:t", tpm=1000)
    old, _ = await limiter.acquire([limit], 600)
    clock.advance(60)
    await limiter.acquire([limit], 1000)  # the old reservation has left the window
    await limiter.reconcile(old, 0)  # must not give back its 600 tokens
    assert old.tokens == 0
    exc = await refusal(limiter, [limit], 1)
    assert exc.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_request_larger_than_tpm_is_refused_as_never_passing(backend: Backend) -> None:
    limiter = backend.make()
    limit = Limit("tenant:small", rpm=10, tpm=100)
    exc = await refusal(limiter, [limit], 101)
    assert exc.limit == "tenant:small:tpm"
    assert "never pass" in str(exc)
    assert "101" in str(exc)
    _, quota = await limiter.acquire([limit], 100)  # nothing was taken
    assert (quota.remaining_requests, quota.remaining_tokens) == (9, 0)


# -- several limits ---------------------------------------------------------------------


async def test_all_or_nothing_across_limits(backend: Backend) -> None:
    limiter = backend.make()
    tenant = Limit("tenant:t", rpm=10, tpm=10_000)
    deployment = Limit("deployment:d", rpm=1)
    _, quota = await limiter.acquire([tenant, deployment], 100)
    assert (quota.limit_requests, quota.remaining_requests) == (1, 0)  # the tightest
    assert (quota.limit_tokens, quota.remaining_tokens) == (10_000, 9_900)

    exc = await refusal(limiter, [tenant, deployment], 100)
    assert exc.limit == "deployment:d:rpm"
    assert exc.headers["x-ratelimit-limit-requests"] == "1"

    _, quota = await limiter.acquire([tenant], 100)  # the refusal took nothing from it
    assert (quota.remaining_requests, quota.remaining_tokens) == (8, 9_800)


async def test_limits_without_rpm_or_tpm_are_ignored(backend: Backend) -> None:
    limiter = backend.make()
    reservation, quota = await limiter.acquire([Limit("tenant:free")], 10**9)
    assert reservation.limits == ()
    assert quota.headers() == {}
    await limiter.reconcile(reservation, 5)


async def test_concurrent_acquires_admit_exactly_rpm(backend: Backend) -> None:
    limiter = backend.make()
    limit = Limit("deployment:busy", rpm=50)

    async def one() -> bool:
        try:
            await limiter.acquire([limit], 1)
        except RateLimitedError:
            return False
        return True

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert sum(results) == 50
    assert (limiter.stats.admitted, limiter.stats.refused) == (50, 150)


# -- several processes ------------------------------------------------------------------


async def test_exact_across_two_processes_sharing_redis() -> None:
    require_service("Redis", REDIS_URL)
    prefix = f"test:rl:{uuid.uuid4().hex}:"
    argv = [REDIS_URL, prefix, "tenant:shared", "100", "150"]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.llm.limits_worker",
            *argv,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        # Above BLPOP's 60 s: redis-py's default socket timeout (5 s) is shorter than a
        # loaded machine takes to start the workers.
        async with redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=90) as control:
            for _ in workers:  # both are connected and waiting
                assert await control.blpop([f"{prefix}ready"], timeout=60) is not None
            await control.rpush(f"{prefix}go", 1, 1)
        outputs = [await asyncio.wait_for(w.communicate(), 60) for w in workers]
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()
        await delete_prefix(prefix)
    reports = []
    for (out, err), worker in zip(outputs, workers, strict=True):
        assert worker.returncode == 0, err.decode()
        reports.append(json.loads(out))
    assert [r["errors"] for r in reports] == [0, 0]
    assert [r["admitted"] + r["refused"] for r in reports] == [150, 150]
    assert sum(r["admitted"] for r in reports) == 100


# -- Redis unavailable ------------------------------------------------------------------


async def test_an_unavailable_redis_admits_and_counts_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    limit = Limit("tenant:t", rpm=1)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    async with RedisLimiter(url, clock=clock, timeout_s=5.0) as limiter:
        reservation, quota = await limiter.acquire([limit], 10)
        assert not reservation.recorded
        assert quota.headers() == {}
        assert (limiter.stats.errors, limiter.stats.unchecked) == (1, 1)

        await limiter.acquire([limit], 10)  # within the backoff: Redis is not tried
        assert (limiter.stats.errors, limiter.stats.unchecked) == (1, 2)
        clock.advance(0.5)
        await limiter.acquire([limit], 10)  # one probe, refused again
        assert (limiter.stats.errors, limiter.stats.admitted) == (2, 3)
        await limiter.reconcile(reservation, 5)
    warnings = [r for r in caplog.records if r.name == "interlock.llm.limits"]
    assert [r.levelno for r in warnings] == [logging.WARNING]  # once per outage
    assert "hunter2" not in warnings[0].getMessage()


async def test_a_restarted_redis_gets_the_script_again_and_limits_again(tmp_path: Path) -> None:
    server = RedisServer(require_binary("redis-server"), free_port(), tmp_path)
    await server.start()
    clock = ManualClock()
    limit = Limit("tenant:t", rpm=1)
    try:
        async with (
            RedisLimiter(server.url, clock=clock, timeout_s=5.0) as limiter,
            redis.asyncio.Redis.from_url(server.url) as control,
        ):
            assert await control.script_exists(_ACQUIRE_SHA) == [False]
            await limiter.acquire([limit], 0)  # NOSCRIPT, then EVAL, which loads it
            assert await control.script_exists(_ACQUIRE_SHA) == [True]
            await refusal(limiter, [limit], 0)

            server.kill()
            reservation, _ = await limiter.acquire([limit], 0)
            assert not reservation.recorded
            await server.start()  # empty: no keys, no scripts

            for _ in range(10):  # each try is a probe after the backoff
                clock.advance(BACKOFF_MAX_S)
                reservation, _ = await limiter.acquire([limit], 0)
                if reservation.recorded:
                    break
            assert reservation.recorded
            await refusal(limiter, [limit], 0)
    finally:
        server.kill()


# -- queueing, URLs and headers ---------------------------------------------------------


async def test_acquire_within_waits_for_room_or_refuses_at_once() -> None:
    limiter = MemoryLimiter(window_s=0.2, clock=SystemClock())
    limit = Limit("tenant:q", rpm=1, tpm=100)
    await limiter.acquire([limit], 10)
    with pytest.raises(RateLimitedError):  # room comes back later than the deadline
        await acquire_within(limiter, [limit], 10, timeout_s=0.001)
    reservation, _ = await acquire_within(limiter, [limit], 10, timeout_s=30.0)
    assert reservation.tokens == 10

    slow = MemoryLimiter(clock=ManualClock())  # a 60 s window that never slides
    with pytest.raises(RateLimitedError, match="never pass"):
        await acquire_within(slow, [limit], 101, timeout_s=600.0)


def test_open_limiter_picks_the_backend_by_scheme() -> None:
    assert isinstance(open_limiter("memory://"), MemoryLimiter)
    assert isinstance(open_limiter("redis://127.0.0.1:6379/0"), RedisLimiter)
    with pytest.raises(ConfigError, match="memory://") as info:
        open_limiter("kafka://user:secret@host/")
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigError):
        MemoryLimiter(window_s=0)
    with pytest.raises(ValueError, match="rpm"):
        Limit("tenant:t", rpm=0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.12, "120ms"),
        (0.0004, "1ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3725.25, "1h2m5.25s"),
    ],
)
def test_reset_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
