"""The gateway in-process (``interlock.llm``): the Python API, and the rules that need
a hand on the clock or many calls: breaker recovery, the retry budget, the strategies."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from interlock.errors import UnavailableError
from interlock.llm import ChatStream, StreamFailure, open_gateway
from interlock.settings import load_settings
from tests.clock import ManualClock
from tests.llm.support import deployment, fake, llm_config, upstream
from tests.llm.upstream import FakeUpstream, Fault

__all__ = ["fake", "upstream"]  # fixtures


def _body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt", "messages": [{"role": "user", "content": text}], **extra}


def _gateway(tmp_path: Path, fake: FakeUpstream, clock: Any = None, **llm: Any) -> Any:
    settings = load_settings(None, home=tmp_path / "home", llm=llm_config(fake, **llm))
    return open_gateway(settings, clock=clock)


async def test_the_python_api_answers_and_streams(tmp_path: Path, fake: FakeUpstream) -> None:
    async with _gateway(tmp_path, fake) as gateway:
        result = await gateway.chat(_body("in process"))
        assert result.completion["choices"][0]["message"]["content"] == "echo: in process"
        assert result.info.deployment == "d1"
        stream = await gateway.stream(_body("a b"))
        assert isinstance(stream, ChatStream)
        pieces = [c async for c in stream]
        assert not any(isinstance(p, StreamFailure) for p in pieces)
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in pieces
            if isinstance(c, dict) and c["choices"]
        )
        assert text == "echo: a b"


async def test_an_open_breaker_probes_after_open_s_and_closes_on_success(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    clock = ManualClock()
    only_d1 = [{"name": "gpt", "deployments": ["d1"]}]
    async with _gateway(
        tmp_path,
        fake,
        clock,
        models=only_d1,
        retry={"max_attempts": 1},
        breaker={"window_calls": 4, "min_calls": 4, "open_s": 30, "half_open_calls": 1},
    ) as gateway:
        fake.set_default("d1", Fault(status=500))
        for i in range(4):
            with pytest.raises(UnavailableError):
                await gateway.chat(_body(f"q{i}"))
        assert gateway.deployment_states()["d1"].breaker.state == "open"
        fake.set_default("d1", None)
        with pytest.raises(UnavailableError, match="open"):
            await gateway.chat(_body("while open"))  # refused without a call
        assert fake.count("d1") == 4
        clock.advance(30)
        result = await gateway.chat(_body("probe"))  # the half-open probe goes through
        assert result.info.deployment == "d1"
        assert gateway.deployment_states()["d1"].breaker.state == "closed"


async def test_the_retry_budget_caps_retries(tmp_path: Path, fake: FakeUpstream) -> None:
    async with _gateway(
        tmp_path,
        fake,
        ManualClock(),  # the budget's floor never refills
        models=[{"name": "gpt", "deployments": ["d1"]}],
        retry={"max_attempts": 5, "budget_ratio": 0.5, "budget_min_per_s": 0},
        breaker={"window_calls": 100, "min_calls": 100},
    ) as gateway:
        fake.set_default("d1", Fault(status=503))
        for i in range(10):
            with pytest.raises(UnavailableError):
                await gateway.chat(_body(f"q{i}"))
        # 10 requests deposit 0.5 retry each: 5 retries in all, not 10 · 4
        assert fake.count("d1") == 10 + 5


async def test_the_weighted_strategy_spreads_by_weight(tmp_path: Path, fake: FakeUpstream) -> None:
    async with _gateway(
        tmp_path,
        fake,
        deployments=[deployment(fake, "d1", weight=3), deployment(fake, "d2", weight=1)],
        models=[{"name": "gpt", "deployments": ["d1", "d2"], "strategy": "weighted"}],
        cache={"enabled": False},
    ) as gateway:
        n = 800
        for i in range(n):
            await gateway.chat(_body(f"q{i}"))
    share = fake.count("d1") / n
    # binomial(800, 0.75): sd 0.0153; five sd either side
    assert 0.75 - 0.077 < share < 0.75 + 0.077


async def test_least_busy_sends_to_the_idle_deployment(tmp_path: Path, fake: FakeUpstream) -> None:
    import asyncio

    async with _gateway(
        tmp_path,
        fake,
        models=[{"name": "gpt", "deployments": ["d1", "d2"], "strategy": "least-busy"}],
        cache={"enabled": False},
    ) as gateway:
        fake.script("d1", Fault(latency_ms=10_000))
        slow = asyncio.ensure_future(gateway.chat(_body("slow")))
        await asyncio.to_thread(fake.wait_for_count, "d1", 1)
        answers = [await gateway.chat(_body(f"q{i}")) for i in range(5)]
        assert {a.info.deployment for a in answers} == {"d2"}
        slow.cancel()


async def test_logs_hold_no_prompt_and_no_key(
    tmp_path: Path, fake: FakeUpstream, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-very-secret")
    fake.require_key("d1", "sk-other")  # the upstream refuses the key: errors get logged
    caplog.set_level(logging.DEBUG)
    async with _gateway(
        tmp_path,
        fake,
        deployments=[deployment(fake, "d1", api_key_env="UPSTREAM_KEY")],
        models=[{"name": "gpt", "deployments": ["d1"]}],
    ) as gateway:
        with pytest.raises(UnavailableError) as caught:
            await gateway.chat(_body("my confidential prompt"))
    text = caplog.text + str(caught.value)
    assert "sk-very-secret" not in text
    assert "confidential" not in text


async def test_an_answer_repeated_at_once_is_a_cache_hit(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """What a client may rely on: once it has the answer, the same call hits the cache.

    The store itself is written behind the answer; the second call here runs without
    giving the loop a turn in between, so it can only hit through the pending write.
    """
    async with _gateway(tmp_path, fake) as gateway:
        first = await gateway.chat(_body("at once", temperature=0))
        again = await gateway.chat(_body("at once", temperature=0))
        streamed = await gateway.stream(_body("streamed", temperature=0))
        _ = [piece async for piece in streamed]
        after_stream = await gateway.chat(_body("streamed", temperature=0))
    assert first.info.cache == "miss"
    assert again.info.cache == "hit"
    assert again.completion == first.completion
    assert after_stream.info.cache == "hit"
    assert len(fake.requests("d1")) + len(fake.requests("d2")) == 2  # one per question
