"""Coalescing in the gateway: identical concurrent misses make one upstream call.

In process, against the fake upstream (which counts requests); the first request is held
upstream by ``Fault(hold=True)`` until the test releases it, so the others surely join.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from interlock.llm import ChatResult, Gateway, open_gateway
from interlock.settings import load_settings
from tests.llm.support import fake, llm_config, upstream
from tests.llm.upstream import FakeUpstream, Fault

__all__ = ["fake", "upstream"]  # fixtures

_ONLY_D1 = [{"name": "gpt", "deployments": ["d1"]}]


def _body(text: str) -> dict[str, Any]:
    return {"model": "gpt", "messages": [{"role": "user", "content": text}], "temperature": 0}


def _gateway(tmp_path: Path, fake: FakeUpstream) -> Gateway:
    settings = load_settings(None, home=tmp_path / "home", llm=llm_config(fake, models=_ONLY_D1))
    return open_gateway(settings)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.005)


def _chat(gateway: Gateway, text: str) -> asyncio.Task[ChatResult]:
    return asyncio.create_task(gateway.chat(_body(text)))


async def test_identical_concurrent_calls_make_one_upstream_call(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script("d1", Fault(hold=True))
    async with _gateway(tmp_path, fake) as gateway:
        leader = _chat(gateway, "same")
        await _until(lambda: fake.count("d1") == 1)
        followers = [_chat(gateway, "same") for _ in range(4)]
        await _until(lambda: gateway.coalescing() == 4)
        fake.release()
        first = await leader
        rest = await asyncio.gather(*followers)
    assert fake.count("d1") == 1
    assert first.info.cache == "miss"
    assert [r.info.cache for r in rest] == ["coalesced"] * 4
    assert all(r.completion == first.completion for r in rest)
    assert all(r.info.deployment == "d1" for r in rest)


async def test_a_cancelled_leader_hands_the_call_to_one_follower(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script("d1", Fault(hang=True))  # the leader's call never answers
    async with _gateway(tmp_path, fake) as gateway:
        leader = _chat(gateway, "same")
        await _until(lambda: fake.count("d1") == 1)
        followers = [_chat(gateway, "same") for _ in range(3)]
        await _until(lambda: gateway.coalescing() == 3)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        answers = await asyncio.gather(*followers)
    text = "echo: same"
    assert [a.completion["choices"][0]["message"]["content"] for a in answers] == [text] * 3
    assert sorted(a.info.cache for a in answers) == ["coalesced", "coalesced", "miss"]
    assert fake.count("d1") == 2  # the leader's call, then one for all three followers


async def test_a_cancelled_follower_leaves_the_others_alone(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script("d1", Fault(hold=True))
    async with _gateway(tmp_path, fake) as gateway:
        leader = _chat(gateway, "same")
        await _until(lambda: fake.count("d1") == 1)
        leaving, staying = _chat(gateway, "same"), _chat(gateway, "same")
        await _until(lambda: gateway.coalescing() == 2)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        fake.release()
        first, other = await leader, await staying
    assert other.completion == first.completion
    assert other.info.cache == "coalesced"
    assert fake.count("d1") == 1
