"""The LLM answer cache: keys, freshness, paraphrases, two nodes on Redis, stream replay."""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

from interlock.cache import MemoryCache
from interlock.llm.cache import (
    CacheControl,
    LLMCache,
    chunks_to_completion,
    completion_to_chunks,
    open_llm_cache,
)
from interlock.llm.semantic import CallableEmbedder, RedisVectorLog
from interlock.settings import LLMCacheSettings
from tests.clock import ManualClock
from tests.conftest import REDIS_URL, require_service

TTL_S = 60.0
STALE_TTL_S = 600.0
SCOPE = "acme/gpt-test"


def chat(
    question: str, *, system: str = "You answer in one line.", **params: Any
) -> dict[str, Any]:
    """A cacheable chat request (temperature 0) asking ``question``."""
    body: dict[str, Any] = {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
    }
    body.update(params)
    return body


def completion(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
        **extra,
    }


class BagOfWords:
    """A deterministic embedder: hashed word counts, so shared words mean closeness."""

    dims = 512

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.failing = False

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(texts)
        if self.failing:
            raise ConnectionError("the embeddings deployment is down")
        rows = []
        for text in texts:
            row = [0.0] * self.dims
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                row[int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dims] += 1.0
            rows.append(row)
        return rows


QUESTION = "What is the capital city of France?"
PARAPHRASE = "Tell me, what is the capital city of France?"  # cosine 7/sqrt(7*9) = 0.88
UNRELATED = "How long should sourdough bread rest before baking?"

MakeCache = Callable[..., LLMCache]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_700_000_000.0)


@contextlib.asynccontextmanager
async def caches(url: str, clock: ManualClock) -> AsyncIterator[MakeCache]:
    """``make(embedder=None, **settings)``: caches on ``url``; each one is a node.

    On Redis the caches share a fresh prefix, as the nodes of one deployment do; their
    keys are deleted afterwards.
    """
    if url != "memory://":
        require_service("Redis", url)
    prefix = f"interlock-test:{uuid.uuid4().hex[:12]}:".encode()
    made: list[LLMCache] = []

    def make(embedder: BagOfWords | None = None, **settings: Any) -> LLMCache:
        options = {"ttl_s": TTL_S, "stale_ttl_s": STALE_TTL_S, "semantic_threshold": 0.8}
        options.update(settings)
        cache = open_llm_cache(
            LLMCacheSettings(url=url, **options),
            clock=clock,
            embedder=None if embedder is None else CallableEmbedder(embedder),
            timeout_s=2.0,
            prefix=prefix,
        )
        made.append(cache)
        return cache

    try:
        yield make
    finally:
        for cache in made:
            await cache.aclose()
        if url != "memory://":
            raw = redis.asyncio.Redis.from_url(url)
            names = [name async for name in raw.scan_iter(match=prefix + b"*")]
            if names:
                await raw.delete(*names)
            await raw.aclose()


@pytest.fixture(params=["memory://", REDIS_URL], ids=["memory", "redis"])
async def make_cache(
    request: pytest.FixtureRequest, clock: ManualClock
) -> AsyncIterator[MakeCache]:
    """Caches on each backend in turn."""
    async with caches(request.param, clock) as make:
        yield make


def plain_cache(**settings: Any) -> LLMCache:
    """A memory cache for the key rules, which need no backend."""
    return open_llm_cache(LLMCacheSettings(**settings), clock=ManualClock())


# -- keys ---------------------------------------------------------------------------------


def test_the_same_request_gets_the_same_key_whatever_the_order_of_its_fields() -> None:
    cache = plain_cache()
    body = chat(QUESTION, max_tokens=50)
    reordered = dict(reversed(list(body.items())))

    key = cache.key(body, scope=SCOPE)

    assert key is not None
    assert cache.key(reordered, scope=SCOPE) == key


@pytest.mark.parametrize(
    "change",
    [
        {"messages": chat(UNRELATED)["messages"]},
        {"max_tokens": 10},
        {"seed": 7},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"temperature": 0.2},
        {"model": "gpt-other"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_what_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    cache = plain_cache()
    forced = CacheControl(force=True)

    before = cache.key(chat(QUESTION), scope=SCOPE, control=forced)
    after = cache.key({**chat(QUESTION), **change}, scope=SCOPE, control=forced)

    assert before is not None and after is not None
    assert after != before


@pytest.mark.parametrize(
    "change",
    [
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"user": "someone"},
        {"metadata": {"trace": "x"}},
        {"n": 1},
        {"temperature": 0.0},
        {
            "messages": [
                chat(QUESTION)["messages"][0],
                {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
            ]
        },
    ],
    ids=lambda change: next(iter(change)) + ("" if "messages" not in change else "_as_parts"),
)
def test_what_does_not_change_the_answer_keeps_the_key(change: dict[str, Any]) -> None:
    cache = plain_cache()

    assert cache.key({**chat(QUESTION), **change}, scope=SCOPE) == cache.key(
        chat(QUESTION), scope=SCOPE
    )


def test_sampled_requests_are_cached_only_when_something_says_so() -> None:
    cache = plain_cache()
    sampled = chat(QUESTION, temperature=0.7)
    default = {k: v for k, v in chat(QUESTION).items() if k != "temperature"}  # provider: 1

    assert cache.key(sampled, scope=SCOPE) is None
    assert cache.key(default, scope=SCOPE) is None
    assert cache.key(sampled, scope=SCOPE, control=CacheControl(force=True)) is not None
    assert cache.key(sampled, scope=SCOPE, sampled_ok=True) is not None
    assert plain_cache(cache_sampled=True).key(sampled, scope=SCOPE) is not None


def test_no_store_several_choices_and_a_disabled_cache_get_no_key() -> None:
    cache = plain_cache()

    assert (
        cache.key(chat(QUESTION), scope=SCOPE, control=CacheControl(read=False, write=False))
        is None
    )
    assert cache.key(chat(QUESTION, n=2), scope=SCOPE) is None
    assert plain_cache(enabled=False).key(chat(QUESTION), scope=SCOPE) is None


def test_each_tenant_and_model_has_its_own_keys() -> None:
    cache = plain_cache()
    body = chat(QUESTION)

    keys = {
        cache.key(body, scope=scope) for scope in ("acme/gpt-test", "globex/gpt-test", "acme/x")
    }

    assert len(keys) == 3


@pytest.mark.parametrize(
    ("cache_control", "interlock_cache", "expected"),
    [
        (None, None, CacheControl()),
        ("no-cache", None, CacheControl(read=False)),
        ("No-Store", None, CacheControl(read=False, write=False)),
        ("max-age=0, no-store", None, CacheControl(read=False, write=False)),
        ("private", "force", CacheControl(force=True)),
        ("no-cache", " FORCE ", CacheControl(read=False, force=True)),
        (None, "whatever", CacheControl()),
    ],
)
def test_cache_control_comes_from_the_headers(
    cache_control: str | None, interlock_cache: str | None, expected: CacheControl
) -> None:
    assert CacheControl.from_headers(cache_control, interlock_cache) == expected


# -- exact entries on each backend --------------------------------------------------------


async def stored(
    cache: LLMCache, body: dict[str, Any], text: str, *, semantic: bool = False
) -> bytes:
    """Put an answer ``text`` to ``body`` in ``cache``; return its key."""
    key = cache.key(body, scope=SCOPE)
    assert key is not None
    await cache.put(key, body, completion(text), scope=SCOPE, semantic=semantic)
    return key


@pytest.mark.parametrize("size", [10, 20_000], ids=["small", "compressed"])
async def test_a_stored_answer_is_served_fresh(make_cache: MakeCache, size: int) -> None:
    cache = make_cache()
    text = ("Paris. " * size)[: size * 7]
    key = await stored(cache, chat(QUESTION), text)

    answer = await cache.get(key, chat(QUESTION), scope=SCOPE)

    assert answer is not None
    assert answer.completion == completion(text)
    assert (answer.stale, answer.similarity, answer.age_s) == (False, None, 0.0)
    assert cache.stats.hits == 1


async def test_a_staged_answer_hits_until_its_write_is_done(
    make_cache: MakeCache, clock: ManualClock
) -> None:
    cache = make_cache()
    body = chat(QUESTION)
    key = cache.key(body, scope=SCOPE)
    assert key is not None
    older, newer = completion("Paris (older)."), completion("Paris.")

    cache.stage(key, older)
    staged = await cache.get(key, body, scope=SCOPE)
    cache.stage(key, newer)  # a second answer to the same question, before the first write
    await cache.put(key, body, older, scope=SCOPE)  # the older write does not end the newer
    clock.advance(TTL_S)
    assert await cache.get(key, body, scope=SCOPE) is None  # past its TTL, staged or not
    await cache.put(key, body, newer, scope=SCOPE)

    assert staged is not None and staged.completion == older
    assert not cache._writing  # nothing left pending once the writes are done
    stale = await cache.get_stale(key)
    assert stale is not None and stale.completion == newer and stale.age_s == TTL_S


async def test_an_unknown_request_is_a_miss(make_cache: MakeCache) -> None:
    cache = make_cache()
    key = cache.key(chat(QUESTION), scope=SCOPE)
    assert key is not None

    assert await cache.get(key, chat(QUESTION), scope=SCOPE) is None
    assert await cache.get_stale(key) is None
    assert cache.stats.misses == 1


async def test_past_its_ttl_an_answer_is_only_a_last_resort(
    make_cache: MakeCache, clock: ManualClock
) -> None:
    cache = make_cache()
    key = await stored(cache, chat(QUESTION), "Paris.")

    clock.advance(TTL_S)
    stale = await cache.get_stale(key)

    assert await cache.get(key, chat(QUESTION), scope=SCOPE) is None
    assert stale is not None and stale.stale
    assert stale.age_s == TTL_S
    assert stale.completion == completion("Paris.")

    clock.advance(STALE_TTL_S)
    assert await cache.get_stale(key) is None


async def test_no_cache_skips_the_read_but_the_new_answer_is_stored(make_cache: MakeCache) -> None:
    cache = make_cache()
    no_cache = CacheControl.from_headers("no-cache", None)
    body = chat(QUESTION)
    await stored(cache, body, "Paris (old).")
    key = cache.key(body, scope=SCOPE, control=no_cache)
    assert key is not None

    assert await cache.get(key, body, scope=SCOPE, control=no_cache) is None
    assert await cache.get_stale(key, control=no_cache) is None
    await cache.put(key, body, completion("Paris (new)."), scope=SCOPE)
    answer = await cache.get(key, body, scope=SCOPE)
    assert answer is not None
    assert answer.completion == completion("Paris (new).")


# -- semantic -----------------------------------------------------------------------------


async def test_a_paraphrase_is_answered_and_an_unrelated_question_is_not(
    make_cache: MakeCache,
) -> None:
    cache = make_cache(BagOfWords())
    await stored(cache, chat(QUESTION), "Paris.", semantic=True)

    hit = await ask(cache, chat(PARAPHRASE), semantic=True)
    miss = await ask(cache, chat(UNRELATED), semantic=True)

    assert hit is not None
    assert hit.completion == completion("Paris.")
    assert hit.similarity == pytest.approx(7 / 63**0.5, abs=1e-5)
    assert not hit.stale
    assert miss is None
    assert (cache.stats.semantic_hits, cache.stats.misses) == (1, 1)


async def ask(
    cache: LLMCache,
    body: dict[str, Any],
    *,
    scope: str = SCOPE,
    semantic: bool = True,
    threshold: float | None = None,
) -> Any:
    key = cache.key(body, scope=scope)
    assert key is not None
    return await cache.get(key, body, scope=scope, semantic=semantic, threshold=threshold)


async def test_a_paraphrase_hits_only_when_the_rest_of_the_request_is_the_same(
    make_cache: MakeCache,
) -> None:
    cache = make_cache(BagOfWords())
    await stored(cache, chat(QUESTION), "Paris.", semantic=True)

    assert await ask(cache, chat(PARAPHRASE, system="You answer in French.")) is None
    assert await ask(cache, chat(PARAPHRASE, max_tokens=5)) is None
    earlier_turn = chat(PARAPHRASE)
    earlier_turn["messages"][1:1] = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
    ]
    assert await ask(cache, earlier_turn) is None
    assert await ask(cache, chat(PARAPHRASE)) is not None


async def test_a_paraphrase_never_crosses_tenants(make_cache: MakeCache) -> None:
    cache = make_cache(BagOfWords())
    await stored(cache, chat(QUESTION), "Paris.", semantic=True)

    assert await ask(cache, chat(PARAPHRASE), scope="globex/gpt-test") is None
    assert await ask(cache, chat(QUESTION), scope="globex/gpt-test") is None


async def test_only_semantic_lookups_above_their_threshold_hit(make_cache: MakeCache) -> None:
    cache = make_cache(BagOfWords())
    await stored(cache, chat(QUESTION), "Paris.", semantic=True)

    assert await ask(cache, chat(PARAPHRASE), semantic=False) is None
    assert await ask(cache, chat(PARAPHRASE), threshold=0.95) is None  # the model's own
    assert await ask(cache, chat(PARAPHRASE), threshold=0.85) is not None


async def test_a_paraphrase_of_an_answer_past_its_ttl_is_a_miss(
    make_cache: MakeCache, clock: ManualClock
) -> None:
    cache = make_cache(BagOfWords())
    await stored(cache, chat(QUESTION), "Paris.", semantic=True)

    clock.advance(TTL_S)

    assert await ask(cache, chat(PARAPHRASE)) is None
    assert cache.index.size(SCOPE) == 0  # dropped once found gone


async def test_only_a_final_text_question_of_the_user_is_compared_by_meaning(
    make_cache: MakeCache,
) -> None:
    embedder = BagOfWords()
    cache = make_cache(embedder)
    await stored(cache, chat(QUESTION), "Paris.", semantic=True)
    with_image = chat("")
    with_image["messages"][1]["content"] = [
        {"type": "text", "text": PARAPHRASE},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    assistant_last = chat(PARAPHRASE)
    assistant_last["messages"].append({"role": "assistant", "content": "The capital is"})
    embedded = len(embedder.calls)

    assert await ask(cache, with_image) is None
    assert await ask(cache, assistant_last) is None
    assert len(embedder.calls) == embedded


async def test_a_question_is_embedded_once_between_its_miss_and_its_answer(
    make_cache: MakeCache,
) -> None:
    embedder = BagOfWords()
    cache = make_cache(embedder)
    body = chat(QUESTION)

    assert await ask(cache, body) is None
    await stored(cache, body, "Paris.", semantic=True)

    assert embedder.calls == [[QUESTION]]
    assert await ask(cache, chat(PARAPHRASE)) is not None


async def test_a_failing_embedder_makes_misses_not_errors(make_cache: MakeCache) -> None:
    embedder = BagOfWords()
    cache = make_cache(embedder)
    embedder.failing = True

    key = await stored(cache, chat(QUESTION), "Paris.", semantic=True)

    assert await ask(cache, chat(PARAPHRASE)) is None
    assert await ask(cache, chat(QUESTION)) is not None  # the exact entry was stored
    assert cache.stats.errors == 2
    embedder.failing = False
    await cache.put(key, chat(QUESTION), completion("Paris."), scope=SCOPE, semantic=True)
    assert await ask(cache, chat(PARAPHRASE)) is not None


async def test_two_nodes_on_redis_share_exact_and_semantic_answers(clock: ManualClock) -> None:
    async with caches(REDIS_URL, clock) as make:
        node_a, node_b = make(BagOfWords()), make(BagOfWords())
        assert isinstance(node_b.vector_log, RedisVectorLog)
        await stored(node_a, chat(QUESTION), "Paris.", semantic=True)

        exact = await ask(node_b, chat(QUESTION))
        paraphrase = await ask(node_b, chat(PARAPHRASE))

        assert exact is not None and exact.similarity is None
        assert paraphrase is not None and paraphrase.similarity is not None
        assert paraphrase.completion == completion("Paris.")
        assert await ask(node_b, chat(UNRELATED)) is None


async def test_nodes_on_memory_keep_their_answers_to_themselves(clock: ManualClock) -> None:
    async with caches("memory://", clock) as make:
        node_a, node_b = make(BagOfWords()), make(BagOfWords())
        assert isinstance(node_a.store, MemoryCache) and node_a.vector_log is None
        await stored(node_a, chat(QUESTION), "Paris.", semantic=True)

        assert await ask(node_b, chat(QUESTION)) is None
        assert await ask(node_b, chat(PARAPHRASE)) is None
        assert await ask(node_a, chat(PARAPHRASE)) is not None


# -- streams ------------------------------------------------------------------------------

TOOL_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-2",
    "object": "chat.completion",
    "created": 1_700_000_001,
    "model": "gpt-test",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "time", "arguments": '{"tz": "CET"}'},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50},
}


@pytest.mark.parametrize(
    "whole",
    [
        completion("Paris is the capital of France.\n\n  It sits on the Seine.  "),
        completion(""),
        TOOL_ANSWER,
    ],
    ids=["text", "empty", "tool_calls"],
)
def test_a_cached_answer_replays_as_a_stream_that_assembles_back(whole: dict[str, Any]) -> None:
    chunks = completion_to_chunks(whole)

    assert chunks_to_completion(chunks) == whole
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == whole["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_a_long_text_replays_in_pieces() -> None:
    text = " ".join(f"word{i}" for i in range(40))

    pieces = [
        c["choices"][0]["delta"]["content"]
        for c in completion_to_chunks(completion(text))[1:]
        if c["choices"] and "content" in c["choices"][0]["delta"]
    ]

    assert len(pieces) == 10
    assert "".join(pieces) == text


def test_an_upstream_stream_assembles_into_the_completion_it_spells() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-3",
            "object": "chat.completion.chunk",
            "created": 1_700_000_002,
            "model": "gpt-test",
            "system_fingerprint": "fp_2",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    call = {"index": 0, "id": "call_9", "type": "function"}
    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{**call, "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
        chunk({}, finish="tool_calls"),
        {**chunk({}), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]

    assert chunks_to_completion(chunks) == {
        "id": "chatcmpl-3",
        "object": "chat.completion",
        "created": 1_700_000_002,
        "model": "gpt-test",
        "system_fingerprint": "fp_2",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4},
    }


async def test_a_streamed_answer_once_cached_serves_a_plain_request(
    make_cache: MakeCache,
) -> None:
    cache = make_cache()
    whole = completion("Paris, on the Seine.")
    streamed = chunks_to_completion(completion_to_chunks(whole))
    body = chat(QUESTION, stream=True)
    key = cache.key(body, scope=SCOPE)
    assert key is not None
    await cache.put(key, body, streamed, scope=SCOPE)

    answer = await ask(cache, chat(QUESTION), semantic=False)

    assert answer is not None and answer.completion == whole
