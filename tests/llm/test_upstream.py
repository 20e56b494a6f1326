"""The fake upstream: what the gateway's tests and benchmark rely on it to do.

The OpenAI routes are driven with the official ``openai`` SDK, so every answer and fault
is checked as a real client sees it; Anthropic's routes with plain httpx.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.llm.upstream import FakeUpstream, Fault, embed

USER: Any = [{"role": "user", "content": "hello there world"}]
ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> Iterator[FakeUpstream]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url("d1"), api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
async def http(fake: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5.0) as c:
        yield c


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of an Anthropic event stream."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], orjson.loads(lines["data"])))
    return events


# -- chat completions ------------------------------------------------------------------
async def test_completion_echoes_the_last_user_message_and_counts_words(
    client: openai.AsyncOpenAI,
) -> None:
    messages: Any = [{"role": "system", "content": "be brief"}, *USER]
    reply = await client.chat.completions.create(model="gpt-x", messages=messages)
    assert reply.object == "chat.completion"
    assert reply.model == "gpt-x"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "echo: hello there world"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2 + 3 + 3 + 3, 4)
    assert reply.usage.total_tokens == 15


async def test_max_tokens_truncates_the_answer_to_that_many_words(
    client: openai.AsyncOpenAI,
) -> None:
    reply = await client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert reply.choices[0].message.content == "echo: hello"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 2


async def test_a_stream_sends_role_then_one_word_per_chunk_then_finish_and_usage(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:5]] == [
        "echo: ",
        "hello ",
        "there ",
        "world",
    ]
    assert chunks[5].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 4)
    assert len(chunks) == 7
    assert {c.id for c in chunks} == {chunks[0].id}


async def test_a_stream_without_include_usage_has_no_usage_chunk(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_fault_text_replaces_the_echo(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.script("d1", Fault(text="forty two"), Fault(text="a b c"))
    reply = await client.chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].message.content == "forty two"
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "a b c"


TOOLS: Any = [{"type": "function", "function": {"name": "search", "parameters": {}}}]


async def test_call_prefix_with_tools_answers_a_tool_call(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "call: weather in Paris"}]
    reply = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call: Any = choice.message.tool_calls[0]
    assert call.function.name == "search"
    assert orjson.loads(call.function.arguments) == {"q": "weather in Paris"}

    stream = await client.chat.completions.create(
        model="m", messages=messages, tools=TOOLS, stream=True
    )
    chunks = [c async for c in stream]
    first = chunks[0].choices[0].delta.tool_calls
    assert first is not None and first[0].function is not None
    assert first[0].function.name == "search"
    deltas: Any = [c.choices[0].delta.tool_calls for c in chunks[1:-1]]
    arguments = "".join(d[0].function.arguments for d in deltas)
    assert orjson.loads(arguments) == {"q": "weather in Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_same_call_prefix_without_tools_is_echoed(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "call: weather"}]
    reply = await client.chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == "echo: call: weather"


# -- embeddings and models ---------------------------------------------------------------
async def test_embeddings_over_the_sdks_default_base64(client: openai.AsyncOpenAI) -> None:
    texts = [
        "What is the capital of France?",
        "What is the capital of France?",
        "what is the capital city of France",
        "Recommend a good pasta recipe for dinner",
    ]
    reply = await client.embeddings.create(model="emb", input=texts)
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [64] * 4
    assert vectors[0] == vectors[1]
    assert cosine(vectors[0], vectors[2]) > 0.8
    assert cosine(vectors[0], vectors[3]) < 0.5
    assert reply.usage.prompt_tokens == 6 + 6 + 7 + 7


async def test_float_embeddings_are_embed_and_base64_is_little_endian_float32(
    fake: FakeUpstream, http: httpx.AsyncClient
) -> None:
    floats = await http.post("/d1/v1/embeddings", json={"model": "e", "input": "a cat"})
    assert floats.json()["data"][0]["embedding"] == embed("a cat")
    packed = await http.post(
        "/d1/v1/embeddings", json={"model": "e", "input": "a cat", "encoding_format": "base64"}
    )
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert list(struct.unpack("<64f", raw)) == pytest.approx(embed("a cat"), abs=1e-6)
    assert math.isclose(sum(v * v for v in embed("a cat")), 1.0)


async def test_models_lists_the_model_ids(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == ["fake-model"]


# -- faults as the SDK sees them ---------------------------------------------------------
async def test_a_500_is_an_internal_server_error(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(status=500))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="m", messages=USER)
    assert caught.value.status_code == 500
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"


async def test_a_429_carries_retry_after(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.script("d1", Fault(status=429, retry_after="7"))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="m", messages=USER)
    assert caught.value.response.headers["retry-after"] == "7"


async def test_error_body_replaces_the_error(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(status=400, error_body={"error": {"message": "too long"}}))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=USER)
    assert caught.value.body == {"message": "too long"}


async def test_hang_never_answers_so_the_client_times_out(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(hang=True))
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=USER, timeout=0.2)
    reply = await client.chat.completions.create(model="m", messages=USER)  # the next one answers
    assert reply.choices[0].message.content == "echo: hello there world"


async def test_malformed_bodies_fail_to_parse(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(malformed=True), Fault(malformed=True))
    with pytest.raises(ValueError, match="Expecting value"):
        await client.chat.completions.create(model="m", messages=USER)
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    with pytest.raises(ValueError, match="Expecting value"):
        [c async for c in stream]


async def test_a_cut_stream_raises_after_the_chunks_it_sent(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(cut_after_chunks=3))
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    seen = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "echo: ", "hello "]


async def test_a_cut_longer_than_the_stream_still_withholds_done(
    fake: FakeUpstream, http: httpx.AsyncClient
) -> None:
    fake.script("d1", Fault(cut_after_chunks=100))
    body = {"model": "m", "messages": USER, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", "/d1/v1/chat/completions", json=body) as response:
            [line async for line in response.aiter_lines()]


async def test_delays_hold_back_the_first_content_chunk_not_the_role_chunk(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(first_token_delay_ms=60_000))
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = aiter(stream)
    assert (await anext(chunks)).choices[0].delta.role == "assistant"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(chunks), 0.2)
    await stream.close()


async def test_small_delays_still_deliver_the_whole_stream(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(latency_ms=1, first_token_delay_ms=1, chunk_delay_ms=1))
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "echo: hello there world"


# -- scripts, defaults, keys -------------------------------------------------------------
async def test_scripts_are_consumed_in_order_then_the_default_applies(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.script("d1", Fault(status=500), Fault.ok(), Fault(text="third"))
    fake.set_default("d1", Fault(status=503))
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=USER)
    ok = await client.chat.completions.create(model="m", messages=USER)
    assert ok.choices[0].message.content == "echo: hello there world"
    third = await client.chat.completions.create(model="m", messages=USER)
    assert third.choices[0].message.content == "third"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m", messages=USER)
        assert caught.value.status_code == 503


async def test_faults_belong_to_their_deployment(fake: FakeUpstream) -> None:
    fake.set_default("d1", Fault(status=500))
    async with openai.AsyncOpenAI(base_url=fake.base_url("d2"), api_key="k", max_retries=0) as d2:
        reply = await d2.chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].message.content == "echo: hello there world"
    assert (fake.count("d1"), fake.count("d2")) == (0, 1)


async def test_a_required_key_refuses_others_without_consuming_a_fault(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.require_key("d1", "sk-right")
    fake.script("d1", Fault(text="scripted"))
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="m", messages=USER)
    assert "sk-right" not in str(caught.value)
    assert caught.value.body == {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    async with openai.AsyncOpenAI(
        base_url=fake.base_url("d1"), api_key="sk-right", max_retries=0
    ) as right:
        reply = await right.chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].message.content == "scripted"


# -- observation -------------------------------------------------------------------------
async def test_requests_are_recorded_with_lowercased_headers_and_counted(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    await client.chat.completions.create(model="m", messages=USER)
    await client.embeddings.create(model="e", input="x")
    first, second = fake.requests("d1")
    assert (first.method, first.path) == ("POST", "/d1/v1/chat/completions")
    assert first.headers["authorization"] == "Bearer k"
    assert first.json == {"model": "m", "messages": USER}
    assert second.at >= first.at
    assert fake.count("d1") == 2
    assert fake.count("d1", "/embeddings") == 1
    fake.reset()
    assert (fake.count("d1"), fake.requests("d1")) == (0, [])


async def test_wait_for_count_sees_a_request_the_upstream_holds(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.set_default("d1", Fault(hang=True))
    held = asyncio.create_task(client.chat.completions.create(model="m", messages=USER))
    assert await asyncio.to_thread(fake.wait_for_count, "d1", 1)
    assert not held.done()
    assert not fake.wait_for_count("d1", 2, timeout=0.01)
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


def test_stop_releases_a_hanging_request() -> None:
    with FakeUpstream() as fake:
        fake.set_default("d1", Fault(hang=True))

        async def call() -> None:
            async with httpx.AsyncClient(timeout=30.0) as http:
                body = {"model": "m", "messages": USER}
                await http.post(f"{fake.base_url('d1')}/chat/completions", json=body)

        async def scenario() -> None:
            held = asyncio.create_task(call())
            assert await asyncio.to_thread(fake.wait_for_count, "d1", 1)
            await asyncio.to_thread(fake.stop)
            with pytest.raises(httpx.RemoteProtocolError):
                await held

        asyncio.run(scenario())


# -- Anthropic ---------------------------------------------------------------------------
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 100,
    "system": "be brief",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there world"}]}],
}


async def test_anthropic_message(http: httpx.AsyncClient) -> None:
    response = await http.post("/a1/v1/messages", json=ANTHROPIC_BODY, headers=ANTHROPIC_HEADERS)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("msg_")
    assert {k: body[k] for k in ("type", "role", "model", "stop_reason", "stop_sequence")} == {
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    assert body["content"] == [{"type": "text", "text": "echo: hello there world"}]
    assert body["usage"] == {"input_tokens": 2 + 3 + 3 + 3, "output_tokens": 4}


async def test_anthropic_max_tokens_and_stop_sequences(http: httpx.AsyncClient) -> None:
    short = {**ANTHROPIC_BODY, "max_tokens": 1}
    body = (await http.post("/a1/v1/messages", json=short, headers=ANTHROPIC_HEADERS)).json()
    assert (body["content"][0]["text"], body["stop_reason"]) == ("echo:", "max_tokens")
    stopped = {**ANTHROPIC_BODY, "stop_sequences": ["there"]}
    body = (await http.post("/a1/v1/messages", json=stopped, headers=ANTHROPIC_HEADERS)).json()
    assert body["content"][0]["text"] == "echo: hello"
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "there")


async def test_anthropic_stream(http: httpx.AsyncClient) -> None:
    body = {**ANTHROPIC_BODY, "stream": True}
    response = await http.post("/a1/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 11
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "echo: hello there world"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"] == {"output_tokens": 4}


async def test_anthropic_tool_use(http: httpx.AsyncClient) -> None:
    body = {
        **ANTHROPIC_BODY,
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "call: the answer"}],
    }
    reply = (await http.post("/a1/v1/messages", json=body, headers=ANTHROPIC_HEADERS)).json()
    assert reply["stop_reason"] == "tool_use"
    block = reply["content"][0]
    assert (block["type"], block["name"], block["input"]) == (
        "tool_use",
        "lookup",
        {"q": "the answer"},
    )
    streamed = await http.post(
        "/a1/v1/messages", json={**body, "stream": True}, headers=ANTHROPIC_HEADERS
    )
    events = sse(streamed.text)
    assert events[1][1]["content_block"]["name"] == "lookup"
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert orjson.loads(partial) == {"q": "the answer"}


@pytest.mark.parametrize(
    ("headers", "status", "kind"),
    [
        ({"anthropic-version": "2023-06-01"}, 401, "authentication_error"),
        ({"x-api-key": "k"}, 400, "invalid_request_error"),
    ],
)
async def test_anthropic_requires_its_headers(
    http: httpx.AsyncClient, headers: dict[str, str], status: int, kind: str
) -> None:
    response = await http.post("/a1/v1/messages", json=ANTHROPIC_BODY, headers=headers)
    assert response.status_code == status
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == kind


async def test_anthropic_faults_use_anthropics_error_shape(
    fake: FakeUpstream, http: httpx.AsyncClient
) -> None:
    fake.script("a1", Fault(status=529, retry_after="2"), Fault(cut_after_chunks=4))
    response = await http.post("/a1/v1/messages", json=ANTHROPIC_BODY, headers=ANTHROPIC_HEADERS)
    assert response.status_code == 529
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "overloaded_error"
    body = {**ANTHROPIC_BODY, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream(
            "POST", "/a1/v1/messages", json=body, headers=ANTHROPIC_HEADERS
        ) as r:
            [line async for line in r.aiter_lines()]


# -- driven from another process ---------------------------------------------------------
async def test_the_control_api(fake: FakeUpstream, http: httpx.AsyncClient) -> None:
    faults = [Fault(status=503).to_dict(), Fault(text="second").to_dict()]
    assert (
        await http.post("/_fake/script", json={"deployment": "d1", "faults": faults})
    ).is_success
    default = {"deployment": "d1", "fault": {"status": 418}}
    assert (await http.post("/_fake/default", json=default)).is_success
    chat = {"model": "m", "messages": USER}
    statuses = [(await http.post("/d1/v1/chat/completions", json=chat)).status_code for _ in "abc"]
    assert statuses == [503, 200, 418]
    count = await http.get("/_fake/count", params={"deployment": "d1"})
    assert count.json() == {"count": 3}
    bad = await http.post("/_fake/script", json={"deployment": "d1", "faults": [{"nope": 1}]})
    assert bad.status_code == 400
    assert (await http.post("/_fake/reset")).is_success
    assert fake.count("d1") == 0


def test_the_command_line_serves_and_says_where() -> None:
    script = Path(__file__).with_name("upstream.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--latency-ms", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("ready http://127.0.0.1:")
        url = line.removeprefix("ready ")
        reply = httpx.post(f"{url}/x/v1/chat/completions", json={"model": "m", "messages": USER})
        assert reply.json()["choices"][0]["message"]["content"] == "echo: hello there world"
        assert httpx.get(f"{url}/_fake/count", params={"deployment": "x"}).json() == {"count": 1}
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()
