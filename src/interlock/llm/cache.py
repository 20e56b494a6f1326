"""The LLM answer cache: exact answers by request, close paraphrases by meaning.

**Exact.** :meth:`LLMCache.key` hashes the canonical request (sha256 of orjson with
sorted keys) together with its *scope*, the tenant's name and the model the client
asked for: tenants never see each other's answers. What is hashed is the whole body
except what does not change the answer: ``stream``, ``stream_options``, ``user``,
``metadata``, ``store``, ``service_tier``, ``prompt_cache_key`` and
``safety_identifier`` (:data:`IGNORED_FIELDS`). Two spellings are made one: ``n: 1``
is dropped, integral sampling parameters (``temperature: 0``) count as floats, and a
message content made of one plain text part equals that text as a string. A request
gets no key (it is not cached) when:

- it is *sampled* and nothing forces it: ``temperature`` is absent (the providers'
  default is 1) or above 0, and neither ``x-interlock-cache: force``, the caller, nor
  ``cache.cache_sampled`` says to cache it anyway;
- it asks for several choices (``n > 1``), or ``Cache-Control: no-store``;
- the cache is disabled (``cache.enabled = false``).

``Cache-Control: no-cache`` skips reading (the answer is fetched and stored again).

**Fresh and stale.** An answer is stored with the wall-clock time it was made and a TTL
of ``ttl_s + stale_ttl_s``. For ``ttl_s`` it is served *fresh*; after that only
:meth:`LLMCache.get_stale` returns it, for the gateway's last resort when every
deployment and fallback failed (the answer is then marked in a header).

**Semantic** (opt-in per model). Only the text of the *last message, which must be the
user's*, is compared by meaning; everything else (the system prompt, earlier turns,
tools and parameters) must be identical. So the index of a scope tags each vector with
a *context*: the hash of the canonical request with that last message's content
blanked. A lookup embeds the text, finds the nearest vector of the same scope and
context at or above the threshold (the model's ``semantic_threshold``, else the
cache's), and reads that entry's exact key from the byte store: only a fresh entry
answers, and one gone from the store is dropped from the index. An embedder that fails
makes a miss, never a failed request. See :mod:`interlock.llm.semantic` for the index.

**Storage.** Entries live in a :class:`~interlock.cache.Cache` byte store (memory,
bounded in bytes, or Redis, shared and failing open) under their own prefix
(:data:`LLM_PREFIX`). A value is one format byte, the creation time (float64), then the
completion as orjson, zlib-compressed (level 1) from 1 KiB: typical answers of 1-6 KiB
shrink to 50-60 % for ~0.1-0.2 ms of CPU per store and ~20 µs per read.

The canonical request is :mod:`interlock.llm.canonical`'s; streams are assembled and
replayed by :mod:`interlock.llm.chunks` (both re-exported here).
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import numpy as np
import orjson

from interlock.cache import Cache, open_cache
from interlock.llm.canonical import IGNORED_FIELDS, canonical_request, sampled, semantic_query
from interlock.llm.chunks import chunks_to_completion, completion_to_chunks
from interlock.llm.semantic import RedisVectorLog, VectorIndex
from interlock.llm.wire import ChatRequest

if TYPE_CHECKING:
    from interlock._core.clock import Clock
    from interlock.llm.semantic import Embedder, VectorLog, Vectors
    from interlock.settings import LLMCacheSettings

__all__ = [
    "IGNORED_FIELDS",
    "LLM_PREFIX",
    "CacheControl",
    "CachedAnswer",
    "LLMCache",
    "LLMCacheStats",
    "canonical_request",
    "chunks_to_completion",
    "completion_to_chunks",
    "open_llm_cache",
]

logger = logging.getLogger("interlock.llm.cache")

LLM_PREFIX = b"interlock:llm:"
"""Before every Redis key of the LLM cache (the prediction cache uses ``interlock:pc:``)."""

COMPRESS_MIN_BYTES = 1024
SEMANTIC_TRIES = 3
"""Nearest entries tried per semantic lookup when the nearest one's answer is gone."""
PENDING_VECTORS = 1024
PENDING_WRITES = 4096
"""Answers handed to :meth:`LLMCache.stage` whose write has not finished, at most."""
WARNING_INTERVAL_S = 10.0

_HEADER = struct.Struct(">Bd")  # format, creation time (unix seconds)
_RAW = 0
_ZLIB = 1


@dataclass(frozen=True, slots=True)
class CacheControl:
    """What a request asks of the cache.

    ``read`` is False for ``Cache-Control: no-cache`` (do not answer from the cache,
    but store the new answer) and ``no-store``; ``write`` is False for ``no-store``
    (neither store nor read). ``force`` caches a sampled request too.
    """

    read: bool = True
    write: bool = True
    force: bool = False

    @classmethod
    def from_headers(
        cls, cache_control: str | None, interlock_cache: str | None = None
    ) -> CacheControl:
        """From the ``Cache-Control`` and ``x-interlock-cache`` headers (``force``)."""
        directives = {
            part.split("=", 1)[0].strip().lower() for part in (cache_control or "").split(",")
        }
        no_store = "no-store" in directives
        no_cache = no_store or "no-cache" in directives
        force = (interlock_cache or "").strip().lower() == "force"
        return cls(read=not no_cache, write=not no_store, force=force)


_PLAIN = CacheControl()


@dataclass(slots=True)
class CachedAnswer:
    """A cached ``chat.completion`` and how it was found."""

    completion: dict[str, Any]
    stale: bool
    similarity: float | None  # None for an exact hit; the cosine for a semantic one
    age_s: float


@dataclass(slots=True)
class LLMCacheStats:
    """Counters of one :class:`LLMCache`, updated in place.

    ``hits`` are fresh exact hits and ``semantic_hits`` fresh paraphrase hits; a lookup
    that finds neither is a ``miss``. ``stale_hits`` counts what :meth:`LLMCache.get_stale`
    returned past its ``ttl_s``. ``errors`` counts failed embeddings and unreadable
    entries (the byte store keeps its own counters).
    """

    hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    stale_hits: int = 0
    stores: int = 0
    errors: int = 0


class LLMCache:
    """Exact and semantic answers over a byte store, for one event loop.

    ``embedder`` is needed for semantic lookups (without one they are exact only).
    ``vector_log`` shares the semantic index between nodes; without it each node
    indexes what it stores itself. The cache owns ``store`` and ``vector_log``:
    :meth:`aclose` closes both.
    """

    def __init__(
        self,
        settings: LLMCacheSettings,
        store: Cache,
        *,
        clock: Clock,
        embedder: Embedder | None = None,
        vector_log: VectorLog | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.vector_log = vector_log
        self.index = VectorIndex(settings.semantic_max_entries)
        self.stats = LLMCacheStats()
        self._clock = clock
        self._pending: OrderedDict[bytes, Vectors] = OrderedDict()  # key -> its question's
        self._writing: dict[bytes, tuple[dict[str, Any], float]] = {}  # key -> (answer, made)
        self._warned_at = -math.inf

    def __repr__(self) -> str:
        return f"LLMCache(store={self.store!r}, semantic={self.embedder is not None})"

    # -- keys ------------------------------------------------------------------------

    def key(
        self,
        body: ChatRequest,
        *,
        scope: str,
        control: CacheControl = _PLAIN,
        sampled_ok: bool = False,
    ) -> bytes | None:
        """The exact key of ``body`` in ``scope``, or None when it must not be cached.

        ``sampled_ok`` is the caller's own leave to cache a sampled request (a per-model
        setting, say), like ``control.force`` and ``cache_sampled``.
        """
        if not self.settings.enabled or not control.write:
            return None
        n = body.get("n")
        if n is not None and n != 1:
            return None
        if sampled(body) and not (control.force or sampled_ok or self.settings.cache_sampled):
            return None
        try:
            canonical = orjson.dumps([scope, canonical_request(body)], option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            return None
        return b"x:" + hashlib.sha256(canonical).hexdigest().encode()

    # -- reads -----------------------------------------------------------------------

    async def get(
        self,
        key: bytes,
        body: ChatRequest,
        *,
        scope: str,
        semantic: bool = False,
        threshold: float | None = None,
        control: CacheControl = _PLAIN,
    ) -> CachedAnswer | None:
        """A fresh answer: the exact entry, else (if ``semantic``) the nearest paraphrase's."""
        if not control.read:
            return None
        (value,) = await self.store.get_many([key])
        answer = self._answer(value, similarity=None)
        if answer is None or answer.stale:
            answer = self._staged(key)
        if answer is not None and not answer.stale:
            self.stats.hits += 1
            return answer
        if semantic and self.embedder is not None:
            answer = await self._semantic_get(self.embedder, key, body, scope, threshold)
            if answer is not None:
                self.stats.semantic_hits += 1
                return answer
        self.stats.misses += 1
        return None

    async def _semantic_get(
        self,
        embedder: Embedder,
        key: bytes,
        body: ChatRequest,
        scope: str,
        threshold: float | None,
    ) -> CachedAnswer | None:
        query = semantic_query(body)
        if query is None:
            return None
        text, context = query
        vector = await self._embed(embedder, text)
        if vector is None:
            return None
        if self.vector_log is not None:
            await self.vector_log.pull(scope, self.index)
        limit = self.settings.semantic_threshold if threshold is None else threshold
        for _ in range(SEMANTIC_TRIES):
            found = self.index.search(scope, vector, limit, context)
            if found is None:
                break
            other, similarity = found
            (value,) = await self.store.get_many([other])
            answer = self._answer(value, similarity=similarity)
            if answer is not None and not answer.stale:
                return answer
            self.index.discard(scope, other)
        self._pending[key] = vector  # put() will index the answer under it
        while len(self._pending) > PENDING_VECTORS:
            self._pending.popitem(last=False)
        return None

    async def get_stale(
        self,
        key: bytes,
        *,
        control: CacheControl = _PLAIN,
    ) -> CachedAnswer | None:
        """The exact entry, fresh or stale, for the last resort when nothing else answers."""
        if not control.read:
            return None
        (value,) = await self.store.get_many([key])
        answer = self._answer(value, similarity=None)
        if answer is not None and answer.stale:
            self.stats.stale_hits += 1
        return answer

    def _answer(self, value: bytes | None, *, similarity: float | None) -> CachedAnswer | None:
        if value is None:
            return None
        try:
            completion, created = _decode(value)
        except (ValueError, zlib.error, struct.error) as exc:
            self.stats.errors += 1
            logger.debug("unreadable LLM cache entry: %s", exc)
            return None
        age_s = max(0.0, self._clock.now().timestamp() - created)
        if age_s >= self.settings.ttl_s + self.settings.stale_ttl_s:
            return None
        return CachedAnswer(completion, age_s >= self.settings.ttl_s, similarity, age_s)

    def _staged(self, key: bytes) -> CachedAnswer | None:
        staged = self._writing.get(key)
        if staged is None:
            return None
        completion, created = staged
        age_s = max(0.0, self._clock.now().timestamp() - created)
        return CachedAnswer(completion, age_s >= self.settings.ttl_s, None, age_s)

    # -- writes ----------------------------------------------------------------------

    def stage(self, key: bytes, completion: dict[str, Any]) -> None:
        """Make ``completion`` the answer for ``key`` now; :meth:`put` stores it later.

        The gateway answers first and writes the store behind the answer (a loop turn or
        a Redis round trip later). A client that got its answer and repeats the call must
        hit all the same: until the write is done, :meth:`get` also finds the answer here.
        The cost is one dict insert per answer and one dict lookup per store miss. Other
        nodes see the answer once it is in the shared store.
        """
        writing = self._writing
        writing.pop(key, None)  # the newest answer last, so the oldest goes first
        writing[key] = (completion, self._clock.now().timestamp())
        if len(writing) > PENDING_WRITES:
            del writing[next(iter(writing))]

    async def put(
        self,
        key: bytes,
        body: ChatRequest,
        completion: dict[str, Any],
        *,
        scope: str,
        semantic: bool = False,
    ) -> None:
        """Store ``completion`` under ``key`` and, if ``semantic``, index its question.

        A :meth:`stage` of the same answer is over once the store has it (or failed to).
        """
        staged = self._writing.get(key)
        if staged is not None and staged[0] is not completion:
            staged = None  # a newer answer was staged since: it stays
        created = self._clock.now().timestamp() if staged is None else staged[1]
        try:
            value = _encode(completion, created)
            await self.store.set_many(
                [(key, value)], self.settings.ttl_s + self.settings.stale_ttl_s
            )
        finally:
            if staged is not None and self._writing.get(key) is staged:
                del self._writing[key]
        self.stats.stores += 1
        vector = self._pending.pop(key, None)
        embedder = self.embedder
        if not semantic or embedder is None:
            return
        query = semantic_query(body)
        if query is None:
            return
        text, context = query
        if vector is None:
            vector = await self._embed(embedder, text)
            if vector is None:
                return
        log = self.vector_log
        if log is None or not await log.append(scope, vector, key, context):
            self.index.add(scope, vector, key, context)

    async def _embed(self, embedder: Embedder, text: str) -> Vectors | None:
        try:
            rows = await embedder.embed([text])
        except Exception as exc:  # fail open: a semantic miss, never a failed request
            self.stats.errors += 1
            now = self._clock.monotonic()
            if now - self._warned_at >= WARNING_INTERVAL_S:
                self._warned_at = now
                logger.warning(
                    "semantic cache: embedding failed (%s: %s); serving misses",
                    type(exc).__name__,
                    exc,
                )
            return None
        return np.asarray(rows[0], np.float32)

    # -- lifetime --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the byte store and the vector log."""
        try:
            await self.store.aclose()
        finally:
            if self.vector_log is not None:
                await self.vector_log.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def open_llm_cache(
    settings: LLMCacheSettings,
    *,
    clock: Clock,
    embedder: Embedder | None = None,
    timeout_s: float = 0.5,
    prefix: bytes = LLM_PREFIX,
) -> LLMCache:
    """An :class:`LLMCache` on the backend of ``settings.url``; nothing is connected yet.

    ``memory://``: a :class:`~interlock.cache.MemoryCache` of ``max_bytes`` and a
    semantic index per node. ``redis://``: entries and, given an ``embedder``, the
    semantic index shared by every node, each Redis call bounded by ``timeout_s``.

    Raises:
        ConfigError: the URL cannot be used (see :func:`~interlock.cache.open_cache`).
    """
    store = open_cache(
        settings.url, max_bytes=settings.max_bytes, timeout_s=timeout_s, prefix=prefix, clock=clock
    )
    log = None
    if embedder is not None and urlsplit(settings.url).scheme.lower() != "memory":
        log = RedisVectorLog(
            settings.url,
            prefix=prefix,
            max_entries=settings.semantic_max_entries,
            timeout_s=timeout_s,
            clock=clock,
        )
    return LLMCache(settings, store, clock=clock, embedder=embedder, vector_log=log)


def _encode(completion: dict[str, Any], created: float) -> bytes:
    payload = orjson.dumps(completion)
    kind = _RAW
    if len(payload) >= COMPRESS_MIN_BYTES:
        packed = zlib.compress(payload, 1)
        if len(packed) < len(payload):
            payload, kind = packed, _ZLIB
    return _HEADER.pack(kind, created) + payload


def _decode(value: bytes) -> tuple[dict[str, Any], float]:
    kind, created = _HEADER.unpack_from(value)
    payload = value[_HEADER.size :]
    if kind == _ZLIB:
        payload = zlib.decompress(payload)
    elif kind != _RAW:
        raise ValueError(f"unknown entry format {kind}")
    completion = orjson.loads(payload)
    if not isinstance(completion, dict):
        raise ValueError("an entry that is not a JSON object")
    return completion, created
