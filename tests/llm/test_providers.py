"""The upstream providers against the fake upstream, over real HTTP on loopback.

A few shapes the fake cannot send (SSE with ``\\r\\n`` and comments, error events inside
a stream, odd headers) come from a small raw aiohttp server in this file.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from aiohttp import web

from interlock.errors import UpstreamError
from interlock.llm.providers import AnthropicProvider, OpenAIProvider, make_provider
from interlock.llm.providers._http import SSEParser, retry_after_s
from interlock.llm.types import Chunk, Provider
from interlock.settings import LLMDeployment
from tests.llm.upstream import FakeUpstream, Fault

KEY = "sk-test-4f9a0c1d2e3b"
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hello world"}]}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}

MakeProvider = Callable[..., Any]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def dep() -> str:
    """A deployment name of the test's own: the fake keeps scripts per name."""
    return f"d{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make(fake: FakeUpstream) -> AsyncIterator[MakeProvider]:
    """``make(dep, "openai" | "anthropic", key=..., **deployment fields)``; all closed after."""
    made: list[OpenAIProvider | AnthropicProvider] = []

    def build(
        name: str, provider: str = "openai", *, key: str | None = KEY, **fields: Any
    ) -> OpenAIProvider | AnthropicProvider:
        url = fake.anthropic_url(name) if provider == "anthropic" else fake.base_url(name)
        fields.setdefault("base_url", url)
        deployment = LLMDeployment(name=name, provider=provider, model="m", **fields)
        cls = AnthropicProvider if provider == "anthropic" else OpenAIProvider
        made.append(cls(deployment, api_key=key))
        return made[-1]

    yield build
    for provider in made:
        await provider.aclose()


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def collect_until_error(stream: AsyncIterator[Chunk]) -> tuple[list[Chunk], UpstreamError]:
    chunks: list[Chunk] = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks, caught.value


def content(chunks: Sequence[Chunk]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- OpenAI ----------------------------------------------------------------------------


async def test_openai_chat_returns_the_completion_and_its_usage(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    fake.require_key(dep, KEY)
    reply = await make(dep).chat(HELLO, timeout_s=5)

    assert reply.body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "echo: hello world",
    }
    assert reply.body["object"] == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 3)
    sent = fake.requests(dep)[-1]
    assert sent.path == f"/{dep}/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.json == HELLO


async def test_openai_stream_asks_for_usage_without_touching_the_callers_body(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    body = {**HELLO, "stream_options": {"custom": 1}}
    before = orjson.dumps(body)

    chunks = await collect(make(dep).stream_chat(body, timeout_s=5))

    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content(chunks) == "echo: hello world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    sent = fake.requests(dep)[-1]
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"custom": 1, "include_usage": True}
    assert sent.headers["accept"] == "text/event-stream"
    assert orjson.dumps(body) == before


async def test_openai_embeddings_pass_the_encoding_through(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    provider = make(dep)
    floats = await provider.embeddings({"model": "m", "input": ["a b", "c"]}, timeout_s=5)
    encoded = await provider.embeddings(
        {"model": "m", "input": ["a b"], "encoding_format": "base64"}, timeout_s=5
    )

    assert [len(item["embedding"]) for item in floats.body["data"]] == [64, 64]
    assert floats.usage.prompt_tokens == 3
    assert fake.requests(dep)[-1].json["encoding_format"] == "base64"
    assert len(base64.b64decode(encoded.body["data"][0]["embedding"])) == 64 * 4
    assert encoded.body["data"][0]["embedding"] != floats.body["data"][0]["embedding"]


# -- Anthropic -------------------------------------------------------------------------


async def test_anthropic_chat_translates_the_request_and_the_answer(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    fake.require_key(dep, KEY)
    body = {
        "model": "claude-x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello world"},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": "never",
        "seed": 7,
        "user": "u1",
    }
    reply = await make(dep, "anthropic").chat(body, timeout_s=5)

    sent = fake.requests(dep)[-1]
    assert sent.path == f"/{dep}/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.json == {
        "model": "claude-x",
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}],
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["never"],
        "metadata": {"user_id": "u1"},
    }
    answer = reply.body
    assert answer["id"].startswith("msg_")
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "claude-x"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello world"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (10, 3)


async def test_anthropic_limits_and_stops_map_to_openai_finish_reasons(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    provider = make(dep, "anthropic", api_version="2024-01-01")
    words = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}]}

    cut = await provider.chat({**words, "max_completion_tokens": 2}, timeout_s=5)
    stopped = await provider.chat({**words, "stop": ["three"]}, timeout_s=5)

    assert fake.requests(dep)[0].json["max_tokens"] == 2
    assert fake.requests(dep)[0].headers["anthropic-version"] == "2024-01-01"
    assert cut.body["choices"][0]["finish_reason"] == "length"
    assert stopped.body["choices"][0]["finish_reason"] == "stop"
    assert stopped.body["choices"][0]["message"]["content"] == "echo: one two"


async def test_anthropic_stream_comes_as_openai_chunks(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    chunks = await collect(make(dep, "anthropic").stream_chat(HELLO, timeout_s=5))

    assert fake.requests(dep)[-1].json["stream"] is True
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["id"].startswith("msg_")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content(chunks) == "echo: hello world"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


async def test_anthropic_tool_call_both_ways(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "call: rain in Paris"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    reply = await make(dep, "anthropic").chat(body, timeout_s=5)

    sent = fake.requests(dep)[-1].json
    assert sent["tools"] == [
        {
            "name": "weather",
            "description": "The weather in a city",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        }
    ]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    choice = reply.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("toolu_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "weather"
    assert orjson.loads(call["function"]["arguments"]) == {"q": "rain in Paris"}


async def test_anthropic_streamed_tool_call_arrives_as_tool_call_deltas(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "call: rain in Paris"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
    }
    chunks = await collect(make(dep, "anthropic").stream_chat(body, timeout_s=5))

    assert fake.requests(dep)[-1].json["tool_choice"] == {"type": "tool", "name": "weather"}
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-2]]
    first = deltas[0]
    assert (first["index"], first["type"], first["function"]["name"]) == (0, "function", "weather")
    assert first["id"].startswith("toolu_")
    assert all(d["index"] == 0 for d in deltas)
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert orjson.loads(arguments) == {"q": "rain in Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_anthropic_history_with_tools_and_images_is_translated(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"q":"Paris"}'},
        },
        {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": ""}},
    ]
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
            {"role": "system", "content": "Rule two."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [WEATHER_TOOL],
        "max_tokens": 50,
    }
    await make(dep, "anthropic").chat(body, timeout_s=5)

    sent = fake.requests(dep)[-1].json
    assert sent["system"] == [
        {"type": "text", "text": "Rule one."},
        {"type": "text", "text": "Rule two."},
    ]
    assert sent["max_tokens"] == 50
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "c1", "name": "weather", "input": {"q": "Paris"}},
                {"type": "tool_use", "id": "c2", "name": "weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "c2",
                    "content": [{"type": "text", "text": "rain"}],
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


async def test_anthropic_refuses_what_it_cannot_translate_without_sending(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    provider = make(dep, "anthropic")
    bad_arguments = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{nope"}}],
            },
        ],
    }
    with pytest.raises(UpstreamError) as caught:
        await provider.chat(bad_arguments, timeout_s=5)
    assert (caught.value.status, caught.value.transient) == (400, False)
    assert "'c1'" in str(caught.value)

    with pytest.raises(UpstreamError) as caught:
        await provider.chat({**HELLO, "n": 2}, timeout_s=5)
    assert (caught.value.status, caught.value.transient) == (400, False)
    assert fake.count(dep) == 0


async def test_anthropic_has_no_embeddings(make: MakeProvider, dep: str) -> None:
    with pytest.raises(UpstreamError, match="no embeddings API") as caught:
        await make(dep, "anthropic").embeddings({"model": "m", "input": "x"}, timeout_s=5)
    assert (caught.value.status, caught.value.transient) == (400, False)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("fault", "transient", "retry_after"),
    [
        (Fault(status=500), True, None),
        (Fault(status=503, retry_after="2"), True, 2.0),
        (Fault(status=529), True, None),
        (Fault(status=429, retry_after="0.5"), True, 0.5),
        (Fault(status=408), True, None),
        (Fault(status=409), True, None),
        (Fault(status=400), False, None),
        (Fault(status=404), False, None),
    ],
)
async def test_error_statuses_are_classified(
    fake: FakeUpstream,
    make: MakeProvider,
    dep: str,
    provider: str,
    fault: Fault,
    transient: bool,
    retry_after: float | None,
) -> None:
    fake.script(dep, fault, fault)
    client = make(dep, provider)

    with pytest.raises(UpstreamError) as caught:
        await client.chat(HELLO, timeout_s=5)
    with pytest.raises(UpstreamError) as streamed:
        await collect(client.stream_chat(HELLO, timeout_s=5))

    for error in (caught.value, streamed.value):
        assert (error.kind, error.status, error.transient) == ("http", fault.status, transient)
        assert error.retry_after_s == retry_after
        assert "injected fault" in str(error)
        assert dep in str(error)


async def test_retry_after_as_an_http_date(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    fake.script(dep, Fault(status=429, retry_after=format_datetime(when, usegmt=True)))

    with pytest.raises(UpstreamError) as caught:
        await make(dep).chat(HELLO, timeout_s=5)

    assert caught.value.retry_after_s is not None
    assert 100 < caught.value.retry_after_s <= 120


def test_retry_after_hints() -> None:
    now = 1_700_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}, now) == 1.5
    assert retry_after_s({"retry-after": "3"}, now) == 3.0
    assert retry_after_s({"retry-after": date}, now) == 30.0
    assert retry_after_s({"retry-after": "-5"}, now) == 0.0
    assert retry_after_s({"retry-after": "soon"}, now) is None
    spent = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m2.5s",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_after_s(spent, now) == 62.5
    assert retry_after_s({**spent, "x-ratelimit-remaining-requests": "3"}, now) is None
    assert retry_after_s({}, now) is None


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_the_key_is_sent_but_never_shown_in_errors(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str
) -> None:
    live_key = "sk-live-0123456789abcdef"
    echoed = {"error": {"type": "authentication_error", "message": f"Bad key {live_key}."}}
    fake.script(dep, Fault(status=401, error_body=echoed))
    client = make(dep, provider, key=live_key)

    with pytest.raises(UpstreamError) as caught:
        await client.chat(HELLO, timeout_s=5)

    sent = fake.requests(dep)[-1].headers
    assert live_key in (
        sent.get("x-api-key"),
        sent.get("authorization", "").removeprefix("Bearer "),
    )
    assert (caught.value.status, caught.value.transient) == (401, False)
    assert live_key not in str(caught.value)
    assert "authentication_error: Bad key ***." in str(caught.value)
    assert live_key not in repr(client)


async def test_long_error_messages_are_cut(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    fake.script(dep, Fault(status=400, error_body={"error": {"message": "x" * 5000}}))
    with pytest.raises(UpstreamError) as caught:
        await make(dep).chat(HELLO, timeout_s=5)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_hanging_upstream_times_out(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str
) -> None:
    fake.script(dep, Fault(hang=True), Fault(hang=True))
    client = make(dep, provider)

    with pytest.raises(UpstreamError) as caught:
        await client.chat(HELLO, timeout_s=0.1)
    with pytest.raises(UpstreamError) as streamed:
        await collect(client.stream_chat(HELLO, timeout_s=0.1))

    for error in (caught.value, streamed.value):
        assert (error.kind, error.status, error.transient) == ("timeout", None, True)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_that_stalls_times_out_after_the_chunks_that_came(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str
) -> None:
    fake.script(dep, Fault(first_token_delay_ms=30_000))

    chunks, error = await collect_until_error(make(dep, provider).stream_chat(HELLO, timeout_s=0.5))

    assert [c["choices"][0]["delta"].get("role") for c in chunks] == ["assistant"]
    assert (error.kind, error.transient) == ("timeout", True)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_timeout_bounds_each_wait_not_the_whole_stream(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str
) -> None:
    # 6+ gaps of 300 ms: longer than 1.5 s in all, and each gap 1.2 s inside the bound, so
    # that a loaded machine's stalls do not end the stream.
    fake.script(dep, Fault(chunk_delay_ms=300))

    chunks = await collect(make(dep, provider).stream_chat(HELLO, timeout_s=1.5))

    assert content(chunks) == "echo: hello world"


async def test_a_refused_connection_is_a_transient_connect_error(
    make: MakeProvider, dep: str
) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make(dep, base_url=f"http://127.0.0.1:{port}/v1")

    with pytest.raises(UpstreamError) as caught:
        await client.chat(HELLO, timeout_s=5)
    with pytest.raises(UpstreamError) as streamed:
        await collect(client.stream_chat(HELLO, timeout_s=5))

    for error in (caught.value, streamed.value):
        assert (error.kind, error.status, error.transient) == ("connect", None, True)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_body_that_is_not_the_protocol_is_malformed(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str
) -> None:
    fake.script(dep, Fault(malformed=True), Fault(malformed=True))
    client = make(dep, provider)

    with pytest.raises(UpstreamError) as caught:
        await client.chat(HELLO, timeout_s=5)
    with pytest.raises(UpstreamError) as streamed:
        await collect(client.stream_chat(HELLO, timeout_s=5))

    for error in (caught.value, streamed.value):
        assert (error.kind, error.status, error.transient) == ("malformed", None, True)


@pytest.mark.parametrize(("provider", "events", "chunks"), [("openai", 3, 3), ("anthropic", 4, 2)])
async def test_a_cut_stream_raises_after_the_chunks_that_came(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str, events: int, chunks: int
) -> None:
    fake.script(dep, Fault(cut_after_chunks=events))

    came, error = await collect_until_error(make(dep, provider).stream_chat(HELLO, timeout_s=5))

    assert len(came) == chunks
    assert content(came) == ("echo: " if provider == "anthropic" else "echo: hello ")
    assert (error.kind, error.transient) == ("stream_cut", True)


# -- connections -----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_dropped_stream_gives_its_connection_back(
    fake: FakeUpstream, make: MakeProvider, dep: str, provider: str
) -> None:
    """With one connection allowed, a leaked one would leave the next call waiting."""
    fake.script(dep, Fault(chunk_delay_ms=30_000), Fault(chunk_delay_ms=30_000))
    client = make(dep, provider, max_connections=1)
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream_chat(HELLO, timeout_s=5):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await first_chunk.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    stream = client.stream_chat(HELLO, timeout_s=5)
    assert (await anext(stream))["choices"][0]["delta"]["role"] == "assistant"
    await stream.aclose()  # the client stops reading mid-stream

    reply = await client.chat(HELLO, timeout_s=5)
    assert reply.body["choices"]


async def test_many_calls_share_a_small_pool(
    fake: FakeUpstream, make: MakeProvider, dep: str
) -> None:
    client = make(dep, max_connections=2)

    async def one(i: int) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": f"n{i}"}]}
        if i % 2:
            return content(await collect(client.stream_chat(body, timeout_s=5)))
        reply = await client.chat(body, timeout_s=5)
        text: str = reply.body["choices"][0]["message"]["content"]
        return text

    answers = await asyncio.gather(*(one(i) for i in range(20)))

    assert answers == [f"echo: n{i}" for i in range(20)]


# -- make_provider ---------------------------------------------------------------------


async def test_make_provider_reads_the_key_from_the_named_variable(
    fake: FakeUpstream, dep: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLOCK_TEST_LLM_KEY", KEY + "\n")
    fake.require_key(dep, KEY)
    openai = LLMDeployment(
        name=dep, base_url=fake.base_url(dep), model="m", api_key_env="INTERLOCK_TEST_LLM_KEY"
    )
    anthropic = openai.model_copy(
        update={"provider": "anthropic", "base_url": fake.anthropic_url(dep)}
    )
    local = LLMDeployment(name=dep, base_url=fake.base_url(dep), model="m")

    providers: list[Provider] = [make_provider(d, d.api_key()) for d in (openai, anthropic, local)]
    try:
        assert [type(p) for p in providers] == [OpenAIProvider, AnthropicProvider, OpenAIProvider]
        assert all(p.deployment == dep for p in providers)
        await providers[0].chat(HELLO, timeout_s=5)
        await providers[1].chat(HELLO, timeout_s=5)
    finally:
        for provider in providers:
            await provider.aclose()
    assert fake.requests(dep)[0].headers["authorization"] == f"Bearer {KEY}"
    assert fake.requests(dep)[1].headers["x-api-key"] == KEY


# -- SSE as upstreams really write it --------------------------------------------------


@pytest.fixture
async def raw() -> AsyncIterator[
    Callable[[Sequence[bytes], dict[str, str] | None, int], Awaitable[str]]
]:
    """``await raw(pieces, headers, status)``: a loopback URL that answers every POST
    with the pieces, each written and drained on its own."""
    runners: list[web.AppRunner] = []

    async def serve(
        pieces: Sequence[bytes], headers: dict[str, str] | None = None, status: int = 200
    ) -> str:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(status=status, headers=headers)
            response.content_type = "text/event-stream"
            await response.prepare(request)
            for piece in pieces:
                await response.write(piece)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def _openai_event(text: str) -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"


async def test_openai_stream_with_crlf_comments_and_split_lines(
    raw: Any, make: MakeProvider, dep: str
) -> None:
    usage = b'{"id":"c","choices":[],\r\ndata: "usage":{"prompt_tokens":2,"completion_tokens":1}}'
    whole = (
        b": keep-alive\r\n\r\n"
        + _openai_event("h\u00e9llo")
        + b"event: message\r\nid: 7\r\ndata:"
        + usage
        + b"\r\n\r\n"
        + b"data: [DONE]\r\n\r\n"
    )
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]  # splits lines and the é
    url = await raw(pieces)

    chunks = await collect(make(dep, base_url=f"{url}/v1").stream_chat(HELLO, timeout_s=5))

    assert content(chunks) == "h\u00e9llo"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 1}


async def test_openai_error_event_inside_a_stream(raw: Any, make: MakeProvider, dep: str) -> None:
    failure = b'data: {"error": {"message": "The server had an error", "type": "server_error"}}\n\n'
    url = await raw([_openai_event("a"), failure])

    came, error = await collect_until_error(
        make(dep, base_url=f"{url}/v1").stream_chat(HELLO, timeout_s=5)
    )

    assert content(came) == "a"
    assert (error.kind, error.transient) == ("http", True)
    assert "The server had an error" in str(error)


@pytest.mark.parametrize(
    ("kind", "status", "transient"),
    [
        ("overloaded_error", 529, True),
        ("rate_limit_error", 429, True),
        ("invalid_request_error", 400, False),
    ],
)
async def test_anthropic_error_event_inside_a_stream(
    raw: Any, make: MakeProvider, dep: str, kind: str, status: int, transient: bool
) -> None:
    start = {
        "type": "message_start",
        "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 3}},
    }
    failure = {"type": "error", "error": {"type": kind, "message": "Overloaded"}}
    url = await raw(
        [
            b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n",
            b"event: error\ndata: " + orjson.dumps(failure) + b"\n\n",
        ]
    )

    came, error = await collect_until_error(
        make(dep, "anthropic", base_url=url).stream_chat(HELLO, timeout_s=5)
    )

    assert [c["choices"][0]["delta"] for c in came] == [{"role": "assistant", "content": ""}]
    assert (error.kind, error.status, error.transient) == ("http", status, transient)
    assert f"{kind}: Overloaded" in str(error)


async def test_should_retry_header_overrides_the_status(
    raw: Any, make: MakeProvider, dep: str
) -> None:
    url = await raw([b'{"error": {"message": "conflict"}}'], {"x-should-retry": "false"}, 409)
    with pytest.raises(UpstreamError) as caught:
        await make(dep, base_url=f"{url}/v1").chat(HELLO, timeout_s=5)
    assert (caught.value.status, caught.value.transient) == (409, False)


async def test_a_stream_answer_without_the_end_marker_is_cut(
    raw: Any, make: MakeProvider, dep: str
) -> None:
    url = await raw([_openai_event("a"), _openai_event("b")])
    came, error = await collect_until_error(
        make(dep, base_url=f"{url}/v1").stream_chat(HELLO, timeout_s=5)
    )
    assert content(came) == "ab"
    assert error.kind == "stream_cut"


# -- the SSE parser --------------------------------------------------------------------


def test_sse_parser_gives_the_same_events_however_the_bytes_are_cut() -> None:
    stream = (
        ": ping\r\n\r\n"
        'data: {"a": "\u00e9\u4e2d"}\r\n\r\n'
        "event: x\rdata: one\rdata:two\r\r"
        "data\n\n"
        "id: 3\nretry: 10\n\n"
        "data: last"
    ).encode()
    expected = [b'{"a": "\xc3\xa9\xe4\xb8\xad"}', b"one\ntwo", b"last"]

    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            parser = SSEParser()
            events = parser.feed(stream[:i]) + parser.feed(stream[i:j]) + parser.feed(stream[j:])
            assert events + parser.close() == expected, (i, j)
