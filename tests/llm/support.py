"""What the gateway tests share: the fake upstream, a config builder, an SDK client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from tests.llm.upstream import FakeUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream


def deployment(fake: FakeUpstream, name: str, **extra: Any) -> dict[str, Any]:
    """An OpenAI-compatible deployment served by ``fake`` under ``name``."""
    return {
        "name": name,
        "base_url": fake.base_url(name),
        "model": f"up-{name}",
        "input_cost_per_1k": 1.0,
        "output_cost_per_1k": 2.0,
        "timeout_s": 5.0,
        **extra,
    }


def llm_config(fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    """Two deployments behind ``gpt`` (primary d1, then d2) and ``mini`` (d3) as its fallback.

    Retries wait 1-5 ms so that tests stay quick; the breaker needs 4 calls to judge.
    """
    config: dict[str, Any] = {
        "deployments": [deployment(fake, "d1"), deployment(fake, "d2"), deployment(fake, "d3")],
        "models": [
            {
                "name": "gpt",
                "deployments": ["d1", "d2"],
                "strategy": "latency",
                "fallbacks": ["mini"],
            },
            {"name": "mini", "deployments": ["d3"]},
        ],
        "retry": {"base_delay_ms": 1, "max_delay_ms": 5, "max_attempts": 2},
        "breaker": {"window_calls": 4, "min_calls": 4, "open_s": 60, "failure_rate": 0.5},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def client(url: str, key: str = "none", **kwargs: Any) -> openai.OpenAI:
    """The official SDK pointed at a gateway, with its own retries off."""
    return openai.OpenAI(base_url=f"{url}/llm/v1", api_key=key, max_retries=0, **kwargs)


def chat(sdk: openai.OpenAI, text: str = "hello there", model: str = "gpt", **kwargs: Any) -> Any:
    """A chat completion with its raw response (for the headers); temperature 0 unless given,
    since a sampled request (the default temperature is 1) is not cached."""
    kwargs.setdefault("temperature", 0)
    return sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs
    )


ServerFor = Callable[..., Any]
